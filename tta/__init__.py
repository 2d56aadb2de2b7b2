"""Test-time adaptation runtime: ``adapted = tta.adapt(model, "tent"); logits = adapted(x); adapted.reset()``."""
from tta import methods as _methods  # noqa: F401  (registers the built-in methods)
from tta.api import adapt, method_options
from tta.base import Adapted, BatchNormAdapter, GradientAdapter
from tta import accel
from tta.accel import retain_freed_memory  # deprecated alias of tta.accel.enable(), removed in 0.3
from tta.fisher import FisherInfo, fisher
from tta.guard import CollapseGuard
from tta.options import GradientOptions, MethodOptions
from tta.registry import methods, register
from tta.source_stats import SourceStats, source_stats

__all__ = ["adapt", "methods", "method_options", "register", "source_stats", "SourceStats", "fisher", "FisherInfo",
           "Adapted", "BatchNormAdapter", "GradientAdapter", "CollapseGuard", "MethodOptions", "GradientOptions",
           "accel", "retain_freed_memory"]
__version__ = "0.2.0"
