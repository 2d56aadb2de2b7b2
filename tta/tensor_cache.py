"""Deprecated path of :mod:`tta.accel.tensor_cache` (removed in tta 0.3)."""
from tta.accel import deprecated_module

deprecated_module("tta.tensor_cache", "tta.accel.tensor_cache")
from tta.accel.tensor_cache import *  # noqa: F401,F403,E402
from tta.accel.tensor_cache import counters, install, installed, release, status, uninstall  # noqa: F401,E402
