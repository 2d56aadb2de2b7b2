"""memo: test-time robustness via adaptation and augmentation (Zhang, Levine and Finn, NeurIPS 2022).
Reference: mariodoebler/test-time-adaptation (MD) ``classification/methods/memo.py`` with ``methods/bn.py``
(AlphaBatchNorm), ``augmentations/transforms_augmix.py`` and ``cfgs/cifar10_c/memo.yaml``; original code
zhangmarvin/memo.

For each test image x, starting from the source model every time (episodic by design):

1. B = ``n_augmentations`` (32) AugMix-style views x_1..x_B of x (:func:`tta.augment.augmix_views`: a padded random
   crop and flip, then a Beta(1, 1) mix of the crop with a Dirichlet(1, 1, 1) mix of three chains of 1-3 of
   autocontrast, equalize, posterize, rotate, solarize, shear, translate at severity 1, as MD's CIFAR setting).
2. The marginal entropy of the averaged prediction (the paper's Eq. 1-2): p_bar = (1/B) sum_b softmax(f(x_b)),
   L = -sum_c p_bar_c log p_bar_c, computed in log space (:func:`marginal_entropy`).
3. One SGD step (``steps``) on every parameter of the model: lr 0.005, momentum 0.9, Nesterov, no weight decay (MD's
   cifar10_c/memo.yaml on conf.py's SGD defaults; a single step from fresh momentum moves by lr (1 + 0.9) g).
4. The prediction is f(x) of the adapted model, on x alone.

BatchNorm as MD (and MEMO's own code): statistics alpha * source + (1 - alpha) * batch with ``alpha`` = 0.9 (MD's
BN.ALPHA = 0.1 is the weight of the batch; zhangmarvin/memo uses a prior of 16, i.e. alpha = 16/17); the batch
statistics (the B views while adapting, the single image when predicting) use the unbiased variance and carry no
gradient (:class:`PriorBatchNorm`). The model stays in eval mode.

A batch of several images is adapted image by image, each from the source model, which is what MD computes with its
configured batch size of 1 (MD given a larger batch would pool the views of all its images into one marginal). The
model is left adapted to the last image of the batch; ``reset()`` restores the source, the optimizer and the
augmentation's random stream (``seed``; so ``episodic=True``, redundant here, also restarts that stream at every
batch).

Deliberate differences from MD: the augmentations are our PyTorch re-implementation on float tensors with their own
random stream (MD: PIL operations on uint8 images, numpy's global generator), and images that are not 32 x 32 are
padded-cropped too (MD uses a RandomResizedCrop at ImageNet resolution). Every BatchNorm layer (1d/2d/3d) gets the
prior (MD: BatchNorm2d only); a layer whose batch has a single value per channel (1 x 1 feature maps of a single
image) uses its source statistics alone (MD fails there). The optimizer takes every parameter (MD: those named
weight or bias, which leaves out e.g. a ViT's position embedding and class token). A non-finite loss skips the
step (``skipped_steps``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.augment import augmix_views
from tta.base import GradientAdapter
from tta.norm_layers import MixedBatchNorm
from tta.options import GradientOptions, option
from tta.registry import register


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean softmax prediction over the rows of ``logits``, in log space."""
    log_probs = logits.log_softmax(1)
    log_mean = torch.logsumexp(log_probs, 0) - math.log(logits.shape[0])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum()


class PriorBatchNorm(MixedBatchNorm):
    """BatchNorm with ``alpha * source + (1 - alpha) * batch`` statistics where the batch's are a constant: its mean
    and unbiased variance, computed without gradient (MEMO's and MD's prior BatchNorm). With one value per channel
    the source statistics are used alone; a layer without source statistics uses the batch's (biased, as
    BatchNorm's training mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"PriorBatchNorm expected (N, {self.num_features}, ...) input, got {tuple(x.shape)}")
        if self.running_mean is None or self.running_var is None:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.alpha == 1.0 or x.numel() // x.shape[1] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=1)
            mean = self.alpha * self.running_mean + (1.0 - self.alpha) * mean
            var = self.alpha * self.running_var + (1.0 - self.alpha) * var
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


@dataclass
class MemoOptions(GradientOptions):
    """MEMO's options; defaults are MD's CIFAR-10-C configuration (SGD, lr 0.005, momentum 0.9, Nesterov)."""

    optimizer: Literal["adam", "sgd"] = option("sgd", "optimizer for all parameters: sgd (MD) or adam")
    lr: float = option(0.005, "learning rate (MD, CIFAR-10-C: 0.005 with SGD)")
    n_augmentations: int = option(32, "AugMix views per test image (MD: 32)")
    severity: float = option(1.0, "AugMix operation severity (MD: 1)")
    alpha: float = option(0.9, "weight of the SOURCE BatchNorm statistics, the rest from the batch (MD: 1 - BN.ALPHA "
                               "= 0.9; zhangmarvin/memo: 16/17)")
    seed: int = option(0, "seed of the augmentation's random stream (restored by reset())")


@register("memo")
class Memo(GradientAdapter):
    """Per image: one step on all parameters minimising the marginal entropy over AugMix views; prior BN."""

    Options = MemoOptions
    updates = "all"
    layers = "any"
    batch_statistics = "alpha < 1"
    multi_pass = True
    inputs = "images"
    episodic_by_design = True

    def _setup(self) -> None:
        o = self.options
        if o.n_augmentations < 1:
            raise ValueError(f"memo: n_augmentations must be at least 1, got {o.n_augmentations}")
        if not 0.0 <= o.alpha <= 1.0:
            raise ValueError(f"memo: alpha (weight of the source statistics) must be in [0, 1], got {o.alpha}")
        if self._input_ndim not in (None, 4):
            raise ValueError(f"memo augments (N, C, H, W) images, but this model takes {self._input_ndim}-dimensional "
                             "input")
        super()._setup()
        for swap in self._swaps:  # MixedBatchNorm -> its prior variant (the same tensors)
            swap.replacement = PriorBatchNorm(swap.original, o.alpha)
            setattr(swap.parent, swap.attr, swap.replacement)
        self.affine_layers = [*self.norm_layers, *self.affine_layers[len(self._swaps):]]
        self.generator = torch.Generator().manual_seed(o.seed)
        self._generator_state = self.generator.get_state()

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    @property
    def needs_batch_statistics(self) -> bool:
        return False  # every image is predicted alone, with the source statistics mixed in

    def reset(self) -> None:
        super().reset()
        self.generator.set_state(self._generator_state)

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """(n_augmentations, C, H, W) views of one (C, H, W) image (a test may replace this attribute)."""
        return augmix_views(image, self.options.n_augmentations, self.generator, self.options.severity)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return marginal_entropy(logits)

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_inference_mode()
        if x.dim() != 4:
            raise ValueError(f"memo augments (N, C, H, W) images, got shape {tuple(x.shape)}")
        outputs = []
        for image in x:
            self._snapshot.restore()  # each image starts from the source model and a fresh optimizer
            views = self.augment(image)
            with torch.enable_grad():
                for _ in range(self.options.steps):
                    loss = self.loss(views, self.model(views))
                    if not bool(torch.isfinite(loss)):
                        self.skipped_steps += 1
                        break
                    self.optimizer.zero_grad(set_to_none=True)
                    self._backward(loss)
                    if not self._step_optimizer():  # float16 gradients overflowed: a smaller loss scale
                        self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                outputs.append(self.model(image[None]))
        return torch.cat(outputs)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
