"""norm: test-time BatchNorm (Schneider et al. 2020; Nado et al. 2020).

Every BatchNorm normalises with the statistics of the current batch (biased variance) instead of the running
ones; no gradients, nothing is updated. METHODS.md [verified]. Published anchor (CIFAR-10-C severity 5,
WRN-28-10, reset per corruption): source 43.5 % error, norm 20.4 %.
"""
from __future__ import annotations

from dataclasses import dataclass

from tta.base import BatchNormAdapter
from tta.options import MethodOptions
from tta.registry import register


@dataclass
class NormOptions(MethodOptions):
    """Test-time BN has no hyper-parameters."""


@register("norm")
class Norm(BatchNormAdapter):
    """BatchNorm with test-batch statistics (alpha = 0). A batch of 1 is refused: use alpha_bn."""

    Options = NormOptions
    default_alpha = 0.0
