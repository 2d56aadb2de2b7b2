"""Build any registered method on a test model from what its class declares, so tests enumerate
``tta.methods()`` instead of keeping lists of names: source data through ``source_options``, sample filters
opened with ``select_all_options``, the parameters an update may move read from ``updates``."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

import tta
from tta.base import PARAMETER_FREE
from tta.norm_layers import PER_SAMPLE_NORMS

BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


def method_class(name: str) -> type:
    return tta.registry.method_class(name)


def methods_where(predicate: Callable[[type], bool]) -> list[str]:
    """The registered methods whose class satisfies ``predicate``."""
    return [name for name in tta.methods() if predicate(method_class(name))]


def option_names(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(tta.method_options(name))}


def takes_vectors(name: str) -> bool:
    """Whether the method runs on (N, D) batches (it does not augment or shuffle image patches)."""
    return method_class(name).inputs != "images"


def source_options(name: str, model: nn.Module, input_shape: tuple[int, ...] = (3, 8, 8), classes: int = 4,
                   seed: int = 0, **options: Any) -> dict[str, Any]:
    """What the method computes from (random, labelled) source batches; {} for source-free methods."""
    cls = method_class(name)
    if not cls.source_data:
        return {}
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(40, *input_shape, generator=g), torch.arange(40) % classes) for _ in range(2)]
    known = {k: v for k, v in options.items() if k in option_names(name)}
    return cls.source_options(model, batches, tta.method_options(name)(**known))


def adapt_case(name: str, model: nn.Module, input_shape: tuple[int, ...] = (3, 8, 8), classes: int = 4,
               **options: Any) -> tta.Adapted:
    """``tta.adapt`` with the method's filters opened, its source data computed, and those of ``options`` the
    method takes (others are dropped, so one call serves every method)."""
    names = option_names(name)
    chosen = {**method_class(name).select_all_options, **{k: v for k, v in options.items() if k in names}}
    chosen.update(source_options(name, model, input_shape, classes, **chosen))
    return tta.adapt(model, name, **chosen)


def classifier_parameters(model: nn.Module) -> set[str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {f"{linears[-1]}.{p}" for p, _ in model.get_submodule(linears[-1]).named_parameters()} if linears else set()


def trains(name: str) -> bool:
    """Whether the method takes gradient steps on some parameters."""
    return method_class(name).updates not in PARAMETER_FREE


def declared_parameters(name: str, model: nn.Module) -> set[str]:
    """Names of the model parameters the method's ``updates`` declaration allows an update to change."""
    updates = method_class(name).updates
    everything = {n for n, _ in model.named_parameters()}
    if updates in PARAMETER_FREE:
        return set()
    if updates == "norm affine":
        norms = BATCH_NORMS + PER_SAMPLE_NORMS
        return {f"{m}.{p}" if m else p for m, module in model.named_modules() if isinstance(module, norms)
                for p, _ in module.named_parameters(recurse=False)}
    if updates == "all":
        return everything
    if updates == "all but the classifier":
        return everything - classifier_parameters(model)
    raise AssertionError(f"{name}: unknown `updates` declaration {updates!r} (nothing, norm affine, all, "
                         "all but the classifier)")
