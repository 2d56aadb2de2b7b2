"""shot_im: the information-maximisation part of SHOT (Liang, Hu and Feng, ICML 2020, "Do We Really Need to Access
the Source Data? Source Hypothesis Transfer for Unsupervised Domain Adaptation"), online, one step per batch.

The source hypothesis (the classifier head) is frozen and the feature extractor (every other parameter) is trained
to make the predictions individually certain and globally diverse: the paper's information-maximisation loss
L_ent + L_div of its Sec. 3.2 (L_div = sum_c p_bar_c log p_bar_c, i.e. KL(p_bar || uniform) - log C):

    L_IM = mean_i H(p_i) - H(p_bar),  p_i = softmax(f(x_i)),  p_bar = mean_i p_i,
    H(p_bar) = -sum_c p_bar_c log(p_bar_c + eps),  eps = 1e-5 (``epsilon``; SHOT's and TTAB's constant).

The per-sample entropy is exact (log-softmax, as TTAB; SHOT adds eps there too). SHOT's third term, self-supervised
pseudo-labels from feature-space clustering (weight 0.3), is not part of this method (TTAB's online variant
replaces it by a cross-entropy on predictions above confidence 0.9; neither is here).

Defaults: TTAB's shot configuration (LINs-lab/ttab ``configs/algorithms.py``, ``model_adaptation/utils.py``
define_optimizer, ``parameters.py``): SGD, lr 1e-3, momentum 0.9, Nesterov, dampening 0, no weight decay, one step
per batch. (SHOT's own offline UDA runs use SGD lr 1e-2 with the backbone at x0.1, momentum 0.9, Nesterov, weight
decay 1e-3 and a decaying schedule over epochs, which does not transfer to online adaptation.)
The head is the last ``nn.Linear`` (``classifier_layer`` names another); TTAB freezes the children named fc,
classifier or head.

Deliberate differences from TTAB: the model stays in eval mode (TTAB puts it in train mode: dropout on and
BatchNorm running statistics updated). BatchNorm normalises with the current batch's statistics, as our tent does
(and as TTAB's train mode does), and the source running statistics are kept; reset() restores every trained
parameter and the optimizer state bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tta.base import GradientAdapter
from tta.options import GradientOptions, option
from tta.registry import register
from tta.source_stats import classifier_layer


def information_maximisation_loss(logits: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """mean_i H(p_i) - H(p_bar), with H(p_bar) = -sum_c p_bar_c log(p_bar_c + epsilon)."""
    probs = logits.softmax(1)
    entropy = -(probs * logits.log_softmax(1)).sum(1).mean()
    mean = probs.mean(0)
    return entropy + (mean * torch.log(mean + epsilon)).sum()


@dataclass
class ShotImOptions(GradientOptions):
    """shot_im's options; defaults are TTAB's shot configuration (SGD, lr 1e-3, momentum 0.9, Nesterov)."""

    optimizer: Literal["adam", "sgd"] = option("sgd", "optimizer for the feature extractor: sgd (TTAB) or adam")
    lr: float = option(1e-3, "learning rate (TTAB's shot default: 1e-3 with SGD)")
    epsilon: float = option(1e-5, "added inside the log of the mean prediction's entropy (SHOT, TTAB: 1e-5)")
    classifier_layer: str = option("", "the frozen head: a module name (empty: the last nn.Linear)")


@register("shot_im")
class ShotIm(GradientAdapter):
    """Minimise mean entropy minus the entropy of the mean prediction; every parameter but the head's."""

    Options = ShotImOptions
    default_alpha = 0.0
    updates = "all but the classifier"
    layers = "any"
    uses_classifier = True

    def _trainable_parameters(self) -> list[nn.Parameter]:
        self.classifier_name, head = classifier_layer(self.model, self.options.classifier_layer or None)
        frozen = {id(p) for p in head.parameters()}
        if not frozen:
            raise ValueError(f"shot_im: the classifier layer {self.classifier_name!r} has no parameters; name the "
                             "head with classifier_layer=")
        return [p for p in self.model.parameters() if id(p) not in frozen]

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return information_maximisation_loss(logits, self.options.epsilon)
