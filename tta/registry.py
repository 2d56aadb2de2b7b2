"""The registry of adaptation methods: ``@register("name")`` on an :class:`~tta.base.Adapted` subclass."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)
_METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a method available to ``tta.adapt(model, name)`` and the CLI."""

    def decorate(cls: T) -> T:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        if not hasattr(cls, "Options"):
            raise TypeError(f"{cls.__qualname__} must define an Options dataclass")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_METHODS)


def method_class(name: str) -> type:
    """The class registered under ``name``; a clear error listing the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(_METHODS)}") from None
