"""Deprecated path of :mod:`tta.accel.kernels` (removed in tta 0.3)."""
from tta.accel import deprecated_module

deprecated_module("tta.native", "tta.accel.kernels")
from tta.accel.kernels import *  # noqa: F401,F403,E402
from tta.accel.kernels import library, status  # noqa: F401,E402
