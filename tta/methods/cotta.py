"""cotta: continual test-time domain adaptation (Wang, Fink, Van Gool, Dai, CVPR 2022, arXiv 2203.13591).

Three copies of the network: the student (the adapted model, trained), a teacher (its exponential moving
average) and an anchor (the source model, frozen). Per batch x, in the paper's numbering:

- teacher prediction (eq. 1): y' = teacher(x);
- augmentation-averaged prediction (eq. 4): y~' = 1/N sum_i teacher(aug_i(x)), N = ``n_augmentations`` (32);
- which one is the pseudo-label (eq. 5): y~' when the anchor's confidence is below ``confidence_threshold``
  (p_th 0.92), y' otherwise;
- consistency loss (eq. 2): L = mean over the batch of -sum_c softmax(y')_c log softmax(student(x))_c, with
  ``symmetric_loss`` the average of both directions (the reference's ImageNet loss);
- one gradient step on ALL the student's parameters (eq. 6), then the teacher update (eq. 3)
  theta' <- m theta' + (1 - m) theta, m = ``teacher_momentum`` (0.999);
- stochastic restore (eqs. 7-8): every element of every parameter independently returns to its source value with
  probability ``restore_probability`` (0.01).

The prediction returned is the pseudo-label y' (or y~'), computed before the update, as in the reference.

Reference: MD ``classification/methods/cotta.py`` (after qinenergy/cotta), ``cfgs/cifar10_c/cotta.yaml`` and
``conf.py``: Adam, lr 1e-3, beta1 0.9, weight decay 0, one step, batch 200, M_TEACHER.MOMENTUM 0.999, COTTA.RST
0.01, COTTA.AP 0.92, TEST.N_AUGMENTATIONS 32, the non-symmetric loss on CIFAR. Choices that follow the reference:
the confidence is that of the anchor (the source weights, with test-batch BatchNorm statistics like the other
two), averaged over the batch, so the choice of eq. 5 is made per batch, not per sample; the augmentation-average
is a mean of logits; the augmentations are the reference's CIFAR transform (:class:`tta.augment.CottaAugment`,
strong variant, one parameter draw per augmented batch; images in [0, 1]); each of the N augmented batches is a
separate forward pass, so BatchNorm normalises each with its own statistics; student, teacher and anchor
normalise BatchNorm with the test batch's statistics (the reference drops the running statistics of BatchNorm2d).

Deliberate differences: the model stays in eval mode (dropout off; the reference puts BatchNorm1d layers in train
mode, which also updates running statistics that its batch-statistics forward never reads: ours are left
untouched); the reference trains and restores the parameters named ``weight`` or ``bias`` (all of a CNN's), ours
trains and restores every parameter (a ViT's class token and position embedding as well); the reference's teacher
update also touches parameters that never train (ours trains them all, so there are none); the random draws
(augmentation parameters and noise, restore masks) come from generators the adapter owns, seeded with ``seed``
(default -1: ``torch.initial_seed()``), re-seeded by ``reset()``; on a GPU the noise and masks come from a generator on
that device, so CPU and GPU runs draw different (each reproducible) numbers. Any model and normalisation layer
works (all parameters train); the inputs must be (N, C, H, W) images with 1 or 3 channels in [0, 1].

State: the student's parameters, the teacher, Adam's moments and the generators; ``reset()`` copies the anchor's
values (the source) back into student and teacher, so no other snapshot of the weights is kept.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from tta.augment import CottaAugment, RandomDraws, check_images, resolve_seed
from tta.base import GradientAdapter
from tta.options import GradientOptions, option
from tta.registry import register
from tta.snapshot import Snapshot


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample -sum_c softmax(teacher)_c log softmax(student)_c (CoTTA eq. 2)."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)


def cotta_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """Mean consistency loss of eq. 2; ``symmetric``: the mean of both directions (the reference on ImageNet)."""
    if symmetric:
        return (0.5 * soft_cross_entropy(student_logits, teacher_logits)
                + 0.5 * soft_cross_entropy(teacher_logits, student_logits)).mean()
    return soft_cross_entropy(student_logits, teacher_logits).mean()


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """theta' <- m theta' + (1 - m) theta (CoTTA eq. 3)."""
    for t, s in zip(teacher, student):
        t.copy_(momentum * t + (1.0 - momentum) * s)


@dataclass
class CottaOptions(GradientOptions):
    """CoTTA's options; defaults are the reference's CIFAR-10-C configuration (Adam, lr 1e-3, beta1 0.9)."""

    teacher_momentum: float = option(0.999, "momentum m of the teacher's moving average (M_TEACHER.MOMENTUM)")
    confidence_threshold: float = option(
        0.92, "augment when the anchor's mean max-softmax over the batch is below this (COTTA.AP; CIFAR-10 0.92)")
    n_augmentations: int = option(32, "augmented copies averaged for the teacher's prediction (TEST.N_AUGMENTATIONS)")
    restore_probability: float = option(0.01, "probability that a weight returns to its source value (COTTA.RST)")
    symmetric_loss: bool = option(False, "symmetric cross-entropy (the reference's ImageNet loss; CIFAR: False)")
    soft_augmentations: bool = option(False, "milder augmentation ranges (the reference's 'soft'; CIFAR: False)")
    seed: int = option(-1, "seed of the augmentations and restore masks (negative: torch.initial_seed(), which "
                           "torch.manual_seed sets)")


@register("cotta")
class Cotta(GradientAdapter):
    """Student trained on an EMA teacher's (augmentation-averaged) soft labels; stochastic restore to the source."""

    Options = CottaOptions
    updates = "all"
    layers = "any"
    multi_pass = True
    inputs = "images"
    default_alpha = 0.0

    def _setup(self) -> None:
        o = self.options
        if not 0.0 <= o.teacher_momentum <= 1.0:
            raise ValueError(f"cotta: teacher_momentum must be in [0, 1], got {o.teacher_momentum}")
        if not 0.0 <= o.restore_probability <= 1.0:
            raise ValueError(f"cotta: restore_probability must be in [0, 1], got {o.restore_probability}")
        if o.n_augmentations < 1:
            raise ValueError(f"cotta: n_augmentations must be at least 1, got {o.n_augmentations}")
        if self._input_ndim not in (None, 4):
            raise ValueError(f"cotta augments images: it needs a model taking (N, C, H, W) batches; this one takes "
                             f"{self._input_ndim}-dimensional input")
        super()._setup()
        # Teacher and anchor: copies of the prepared student (the same test-batch BatchNorm), never trained.
        self.teacher = self._frozen_copy()
        self.anchor = self._frozen_copy()
        self.random = RandomDraws(resolve_seed(o.seed))
        self._transform = CottaAugment(soft=o.soft_augmentations)
        # Test hooks (replaceable): the augmentation of a batch, and the restore mask of a parameter.
        self.augment: Callable[[torch.Tensor], torch.Tensor] = self._random_augment
        self.restore_mask: Callable[[torch.Tensor], torch.Tensor] = self._random_mask

    def _frozen_copy(self) -> nn.Module:
        with torch.no_grad():
            clone = copy.deepcopy(self.model)
        for p in clone.parameters():
            p.requires_grad_(False)
        return clone.eval()

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def _make_snapshot(self) -> Snapshot:
        # The weights are restored from the anchor (the source values); only the optimizer needs a copy.
        return Snapshot([], self.optimizer)

    def reset(self) -> None:
        with torch.no_grad():
            for student, source in zip(self.params, self.anchor.parameters()):
                student.copy_(source)
            for teacher, source in zip([*self.teacher.parameters(), *self.teacher.buffers()],
                                       [*self.anchor.parameters(), *self.anchor.buffers()]):
                teacher.copy_(source)
        self.random.reseed()
        super().reset()

    # -- random draws --------------------------------------------------------------------------------------------
    def _random_augment(self, x: torch.Tensor) -> torch.Tensor:
        return self._transform(x, self.random.cpu, self.random.on(x.device))

    def _random_mask(self, p: torch.Tensor) -> torch.Tensor:
        """Bernoulli(restore_probability) per element (eq. 7)."""
        return torch.rand(p.shape, generator=self.random.on(p.device), device=p.device) \
            < self.options.restore_probability

    # -- the step ------------------------------------------------------------------------------------------------
    def _check_method_input(self, x: torch.Tensor) -> None:
        check_images(x, self.name)

    def pseudo_label(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``x``: augmentation-averaged (eq. 4) when the anchor is unsure (eq. 5)."""
        with torch.no_grad():
            confidence = self.anchor(x).softmax(1).max(1).values.mean()
            if bool(confidence < self.options.confidence_threshold):
                total = self.teacher(self.augment(x))
                for _ in range(self.options.n_augmentations - 1):
                    total = total + self.teacher(self.augment(x))
                return total / self.options.n_augmentations
            return self.teacher(x)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the student's ``logits`` to the teacher's pseudo-label of ``x`` (eq. 1-5); the
        teacher's logits are kept as ``last_teacher`` (they are the prediction returned)."""
        self.last_teacher = self.pseudo_label(x)
        return cotta_loss(logits, self.last_teacher, self.options.symmetric_loss)

    def _after_step(self) -> None:
        """After each update of the student: the teacher's EMA (eq. 3), then the stochastic restore (eq. 8)."""
        ema_update(list(self.teacher.parameters()), self.params, self.options.teacher_momentum)
        self._stochastic_restore()

    def _output(self, logits: torch.Tensor) -> torch.Tensor:
        """CoTTA predicts with the teacher (its logits from this batch's pseudo-label), not the student."""
        return self.last_teacher.detach()

    @torch.no_grad()
    def _stochastic_restore(self) -> None:
        """theta <- M * theta_source + (1 - M) * theta, M ~ Bernoulli(p) per element (eq. 8)."""
        if self.options.restore_probability <= 0.0:
            return
        for p, source in zip(self.params, self.anchor.parameters()):
            p.copy_(torch.where(self.restore_mask(p), source, p))

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "random": self.random.state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if "random" in state:
            self.random.load(state["random"])
