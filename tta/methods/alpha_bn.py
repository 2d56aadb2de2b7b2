"""alpha_bn: mix source and test-batch statistics in every BatchNorm (You, Li, Zhao 2021).

    mu  = alpha * mu_source  + (1 - alpha) * mu_batch
    var = alpha * var_source + (1 - alpha) * var_batch          (batch variance: biased)

In this library ``alpha`` is the weight of the SOURCE statistics, in words: alpha = 1 is the source model,
alpha = 0 is test-time BN (``norm``). (Some public code, e.g. one popular benchmark's "BN-alpha", weights the
test side instead.) No training. Works at batch size 1 when alpha > 0.

The paper's default alpha is [reconstructed] (METHODS.md): ours is chosen by measurement on the held-out
validation corruptions only (speckle_noise, gaussian_blur, spatter, saturate), never on the 15 test corruptions;
see ``ALPHA_SELECTION`` below and ``benchmarks/select_alpha.toml`` (``tta select``).
"""
from __future__ import annotations

from dataclasses import dataclass

from tta.base import BatchNormAdapter
from tta.options import MethodOptions, option
from tta.registry import register

DEFAULT_ALPHA = 0.5
ALPHA_SELECTION = (
    "0.5: lowest error averaged over the 4 validation corruptions (severity 5) and batch sizes 16, 64 and 200, "
    "CIFAR-10 ResNet-20 on 1,000 JPEG CIFAR-10 test images (benchmarks/select_alpha.py, 2026-11-22, now "
    "benchmarks/select_alpha.toml; docs/defaults.md, docs/alpha_selection.json)"
)


@dataclass
class SourceWeightOption:
    """The ``alpha`` option shared by the methods that mix statistics (alpha_bn, core)."""

    alpha: float = option(DEFAULT_ALPHA, "weight of the SOURCE statistics in [0, 1]: 1 = source model, 0 = norm. "
                                         "Default chosen on the validation corruptions (docs/defaults.md)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha (weight of the source statistics) must be in [0, 1], got {self.alpha}")


@dataclass
class AlphaBNOptions(MethodOptions, SourceWeightOption):
    """alpha_bn's options: the common ones and ``alpha``."""


@register("alpha_bn")
class AlphaBN(BatchNormAdapter):
    """BatchNorm with ``alpha * source + (1 - alpha) * batch`` statistics; forward only."""

    Options = AlphaBNOptions
    batch_statistics = "alpha < 1"
