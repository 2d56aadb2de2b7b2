"""Data for adaptation: datasets, the corruption generator, and stream protocols (plain data).

Names are resolved lazily so that ``import streams`` is cheap and each submodule is imported only when used.
"""
from __future__ import annotations

import importlib
from typing import Any


_EXPORTS: dict[str, str] = {
    # corruption generator
    "CORRUPTIONS": "streams.corruptions",
    "EXTRA_CORRUPTIONS": "streams.corruptions",
    "corrupt": "streams.corruptions",
    # datasets
    "ImageDataset": "streams.datasets",
    "LazyImageDataset": "streams.datasets",
    "DataFormatError": "streams.datasets",
    "random_subset": "streams.datasets",
    "class_balanced_subset": "streams.datasets",
    "load_dataset": "streams.datasets",
    "load_imagefolder": "streams.datasets",
    "load_cifar": "streams.datasets",
    "load_digits": "streams.datasets",
    "load_cifar_c": "streams.datasets",
    "load_imagenet_c": "streams.datasets",
    "load_domains": "streams.datasets",
    # protocols and streams
    "Domain": "streams.protocols",
    "Protocol": "streams.protocols",
    "make_protocol": "streams.protocols",
    "Stream": "streams.stream",
    "Batch": "streams.stream",
    "Segment": "streams.stream",
    "make_stream": "streams.stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'streams' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
