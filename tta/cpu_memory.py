"""Deprecated path of :mod:`tta.accel.allocator` (removed in tta 0.3)."""
from tta.accel import deprecated_module

deprecated_module("tta.cpu_memory", "tta.accel.allocator")
from tta.accel import retain_freed_memory  # noqa: F401,E402
from tta.accel.allocator import release_free_memory as return_free_memory  # noqa: F401,E402


def malloc_settings() -> None:
    """The glibc settings applied in this process: always None, as glibc's malloc is no longer configured (the
    tensor cache made it pointless; docs/performance.md)."""
    return None
