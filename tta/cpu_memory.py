"""Deprecated path of :mod:`tta.accel.allocator` (removed in tta 0.3)."""
from tta.accel import deprecated_module

deprecated_module("tta.cpu_memory", "tta.accel.allocator")
from tta.accel import retain_freed_memory  # noqa: F401,E402
from tta.accel.allocator import malloc_settings  # noqa: F401,E402
from tta.accel.allocator import release_free_memory as return_free_memory  # noqa: F401,E402
