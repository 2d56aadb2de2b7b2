"""The public entry point: ``tta.adapt(model, method, **options)``."""
from __future__ import annotations

from typing import Any

from torch import nn

from tta.base import Adapted
from tta.options import options_from_kwargs
from tta.registry import method_class


def method_options(method: str) -> type:
    """The options dataclass of a registered method (its fields are the method's options and defaults)."""
    return method_class(method).Options


def adapt(model: nn.Module, method: str = "tent", options: Any = None, **kwargs: Any) -> Adapted:
    """Wrap ``model`` so that ``adapted(x)`` predicts and adapts online; ``adapted.reset()`` restores the source.

    ``options``: an instance of the method's options dataclass; or pass the options as keyword arguments
    (``tta.adapt(model, "tent", lr=1e-3)``). The model is adapted in place (its BatchNorm layers are swapped for
    layers sharing the same tensors); ``adapted.release()`` gives it back unchanged.
    """
    cls = method_class(method)
    if options is None:
        options = options_from_kwargs(cls.Options, method, kwargs)
    elif kwargs:
        raise TypeError("pass either options=<dataclass> or keyword options, not both")
    elif not isinstance(options, cls.Options):
        raise TypeError(f"options for {method!r} must be a {cls.Options.__name__}, got {type(options).__name__}")
    return cls(model, options)
