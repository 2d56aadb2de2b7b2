"""deyo: Destroy Your Object (Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective of
Disentangled Factors", ICLR 2024). METHODS.md; reference: MD ``classification/methods/deyo.py`` (after the
official Jhyun17/DeYO).

Each step on a batch x of images, with Ent(x) the softmax entropy (natural log), C the number of classes and
y_hat = argmax p(x) the pseudo-label:

1. sample selection by entropy (Sec. 3.1): keep the samples with Ent(x) < tau_Ent = ``margin`` * ln C (0.5);
2. PLPD (Sec. 3.1): destroy the object's shape in each kept image, x' (``aug_type``: ``"patch"`` cuts the image
   into ``patch_len`` x ``patch_len`` patches and shuffles them, a new random order per image; ``"pixel"``
   shuffles all pixel positions, one order for the batch; ``"occ"`` fills an ``occlusion_size`` square at
   (``row_start``, ``column_start``) with each channel's image mean), forward x' without gradients and take
   PLPD = p(x)_y_hat - p(x')_y_hat; keep the samples with PLPD > tau_PLPD = ``plpd_threshold`` (0.2);
3. sample weighting (Sec. 3.2): alpha = 1 / exp(Ent(x) - Ent0) + 1 / exp(-PLPD), Ent0 = ``margin_e0`` * ln C
   (0.4, the reference's ``EATA.MARGIN_E0``; either term can be switched off: ``reweight_ent``,
   ``reweight_plpd``), as a constant (no gradient through alpha);
4. loss = mean over the samples kept by 1 and 2 of alpha * Ent(x); one optimizer step on the norm affine
   parameters (Adam, lr 1e-3, beta1 0.9: the reference's CIFAR-10-C configuration, batch 200).

BatchNorm normalises with batch statistics in both forwards (the PLPD forward: those of the shuffled kept
images, as in the reference). The logits returned are those of the first forward, before the update. No sample
left after 1 or 2: no update (``filtered_steps`` counts such steps), as in the reference.

Randomness: the patch orders and pixel permutations are drawn from a ``torch.Generator`` of the adapter, on the
CPU (then moved to the batch's device), seeded by ``seed``; ``reset()`` restores its state, so two runs with one
seed are identical, on any device. The draws are those of the reference with the global generator seeded alike
(``torch.rand(kept, patch_len ** 2)`` argsorted; ``torch.randperm(H * W)``).

Deliberate differences from the reference:

* the model stays in eval mode (as in our tent) and the source running statistics are kept (unused at alpha 0);
* an image side not divisible by ``patch_len`` is resized (bilinear, antialiased, as torchvision's Resize) to the
  nearest multiple below, shuffled and resized back, per side; the reference resizes both sides by the width
  (and returns a square image for a non-square one). Square images give the reference's values;
* the occlusion window must lie inside the image (a clear error otherwise); the reference's defaults (112 at
  (56, 56)) are for 224-pixel ImageNet images and fail on CIFAR there too;
* batches that are not images (N, C, H, W) are refused with a clear error (patch shuffling needs images);
* the reference never trains the norm layers of modules named ``layer4``, ``blocks.9``-``blocks.11`` or ``norm``
  (ImageNet top layers; no such modules in its CIFAR models); here every norm layer is trained by default and
  ``freeze_top=True`` applies that rule (as sar's option);
* a step whose loss is not finite is skipped (``skipped_steps``), as in every gradient method here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.base import GradientAdapter
from tta.methods.sar import affine_parameters_below_top
from tta.methods.tent import softmax_entropy
from tta.options import GradientOptions, option
from tta.registry import register


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased (torchvision's Resize on tensors); no-op at the same size."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def shuffle_patches(x: torch.Tensor, patch_len: int, generator: torch.Generator) -> torch.Tensor:
    """Cut each (C, H, W) image into patch_len x patch_len patches and put them back in a random order (one
    order per image, from ``torch.rand(N, patch_len ** 2)`` argsorted)."""
    n, c, height, width = x.shape
    size = (height // patch_len * patch_len, width // patch_len * patch_len)
    h, w = size[0] // patch_len, size[1] // patch_len
    patches = (_resize(x, size).reshape(n, c, patch_len, h, patch_len, w).permute(0, 2, 4, 1, 3, 5)
               .reshape(n, patch_len * patch_len, c, h, w))
    order = torch.rand(n, patch_len * patch_len, generator=generator).argsort(dim=-1).to(x.device)
    patches = patches[torch.arange(n, device=x.device)[:, None], order]
    shuffled = (patches.reshape(n, patch_len, patch_len, c, h, w).permute(0, 3, 1, 4, 2, 5)
                .reshape(n, c, size[0], size[1]))
    return _resize(shuffled, (height, width))


def shuffle_pixels(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move every pixel (all channels together) to a random position; one permutation for the whole batch."""
    n, c, height, width = x.shape
    order = torch.randperm(height * width, generator=generator).to(x.device)
    return x.reshape(n, c, height * width)[:, :, order].reshape(n, c, height, width)


def occlude(x: torch.Tensor, size: int, row: int, column: int) -> torch.Tensor:
    """Fill the size x size square at (row, column) with each image's per-channel mean."""
    out = x.clone()
    out[:, :, row:row + size, column:column + size] = x.mean(dim=(2, 3))[:, :, None, None]
    return out


@dataclass
class DeyoOptions(GradientOptions):
    """deyo's options; defaults are the reference's CIFAR-10-C setting (Adam, lr 1e-3, beta1 0.9)."""

    margin: float = option(0.5, "entropy selection: keep Ent < margin * ln(C), C the number of classes "
                                "(reference DEYO.MARGIN: 0.5)")
    margin_e0: float = option(0.4, "Ent0 of the entropy weight 1/exp(Ent - Ent0), as a multiple of ln(C) "
                                   "(reference EATA.MARGIN_E0: 0.4)")
    plpd_threshold: float = option(0.2, "PLPD selection: keep PLPD > this (reference DEYO.PLPD: 0.2)")
    reweight_ent: bool = option(True, "weight samples by 1/exp(Ent - Ent0) (reference: on)")
    reweight_plpd: bool = option(True, "weight samples by 1/exp(-PLPD) (reference: on)")
    aug_type: Literal["patch", "pixel", "occ"] = option(
        "patch", "object-destructive transformation: patch (shuffle patches), pixel (shuffle pixels), occ "
                 "(occlude a square) (reference: patch)")
    patch_len: int = option(4, "patch: patches per image side (reference DEYO.PATCH_LEN: 4)")
    occlusion_size: int = option(112, "occ: side of the occluded square in pixels (reference, for 224-pixel "
                                      "images: 112)")
    row_start: int = option(56, "occ: first row of the occluded square (reference: 56)")
    column_start: int = option(56, "occ: first column of the occluded square (reference: 56)")
    seed: int = option(0, "seed of the adapter's generator for patch orders and pixel permutations (reset() "
                          "restores it)")
    freeze_top: bool = option(False, "leave out the norm layers of modules named layer4, blocks.9-11 and norm "
                                     "(the reference's ImageNet choice; no such modules in its CIFAR models)")


@register("deyo")
class Deyo(GradientAdapter):
    """Entropy and PLPD (shuffled-patch) sample selection and weighting; entropy steps on norm affine params."""

    Options = DeyoOptions
    default_alpha = 0.0
    multi_pass = True  # a second forward of the shuffled images
    may_skip_update = True  # no update when the selection keeps no sample
    inputs = "images"
    select_all_options: ClassVar[dict[str, Any]] = {"margin": 1e9, "plpd_threshold": -1e9}

    def _setup(self) -> None:
        o = self.options
        if o.aug_type not in ("patch", "pixel", "occ"):
            raise ValueError(f"deyo: aug_type must be 'patch', 'pixel' or 'occ', got {o.aug_type!r}")
        if o.aug_type == "patch" and o.patch_len < 1:
            raise ValueError(f"deyo: patch_len must be at least 1, got {o.patch_len}")
        if o.aug_type == "occ" and (o.occlusion_size < 1 or o.row_start < 0 or o.column_start < 0):
            raise ValueError("deyo: occlusion_size must be positive and row_start, column_start non-negative, got "
                             f"{o.occlusion_size}, {o.row_start}, {o.column_start}")
        super()._setup()
        self.generator = torch.Generator().manual_seed(o.seed)
        self._generator_state = self.generator.get_state()
        self.filtered_steps = 0

    def _trainable_parameters(self) -> list[nn.Parameter]:
        if not self.options.freeze_top:
            return super()._trainable_parameters()
        return affine_parameters_below_top(self.model, self.affine_layers)

    def _check_method_input(self, x: torch.Tensor) -> None:
        o = self.options
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"deyo destroys the object in images (aug_type {o.aug_type!r}) and needs (N, C, H, W) "
                             f"image batches, got {shape}; use a method without augmentations for other inputs")
        height, width = x.shape[-2:]
        if o.aug_type == "patch" and (height < o.patch_len or width < o.patch_len):
            raise ValueError(f"deyo: images of {height} x {width} pixels cannot be cut into {o.patch_len} x "
                             f"{o.patch_len} patches; lower patch_len")
        if o.aug_type == "occ" and (o.row_start + o.occlusion_size > height
                                    or o.column_start + o.occlusion_size > width):
            raise ValueError(f"deyo: the occlusion square ({o.occlusion_size} pixels at row {o.row_start}, column "
                             f"{o.column_start}) does not fit in {height} x {width} images; set occlusion_size, "
                             "row_start and column_start for this image size (the defaults are for 224 pixels)")

    def destroy(self, x: torch.Tensor) -> torch.Tensor:
        """The object-destructive transformation x -> x' of ``aug_type``."""
        o = self.options
        if o.aug_type == "patch":
            return shuffle_patches(x, o.patch_len, self.generator)
        if o.aug_type == "pixel":
            return shuffle_pixels(x, self.generator)
        return occlude(x, o.occlusion_size, o.row_start, o.column_start)

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_inference_mode()
        with torch.enable_grad():
            for _ in range(self.options.steps):
                logits = self._step(x)
        self.optimizer.zero_grad(set_to_none=True)
        return logits

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The DeYO objective on the samples both selections keep: the mean of alpha * Ent, alpha a constant.
        ``last_selected`` says how many were kept (0: the returned loss is a graph-free zero)."""
        o = self.options
        entropy = softmax_entropy(logits)
        log_classes = math.log(logits.shape[1])
        keep = entropy < o.margin * log_classes  # selection by entropy, tau_Ent
        self.last_selected = 0
        if not bool(keep.any()):
            return logits.new_zeros(())
        with torch.no_grad():
            destroyed = self.destroy(x[keep].detach())
            probs = logits[keep].detach().softmax(1)
            pseudo = probs.argmax(1, keepdim=True)
            # PLPD = p(x)_y_hat - p(x')_y_hat
            plpd = (probs.gather(1, pseudo) - self.model(destroyed).softmax(1).gather(1, pseudo)).squeeze(1)
        reliable = plpd > o.plpd_threshold  # selection by PLPD, tau_PLPD
        if not bool(reliable.any()):
            return logits.new_zeros(())
        self.last_selected = int(reliable.sum())
        entropy, plpd = entropy[keep][reliable], plpd[reliable]
        if o.reweight_ent or o.reweight_plpd:  # alpha = 1/exp(Ent - Ent0) + 1/exp(-PLPD), a constant
            weight = torch.zeros_like(plpd)
            if o.reweight_ent:
                weight = weight + 1.0 / torch.exp(entropy.detach() - o.margin_e0 * log_classes)
            if o.reweight_plpd:
                weight = weight + 1.0 / torch.exp(-plpd)
            entropy = entropy * weight
        return entropy.mean()

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        """One DeYO step; returns the logits of its first forward (before the update)."""
        with self._graph_mode(x):
            logits = self.model(x)
            loss = self.loss(x, logits)
        if self.last_selected == 0:
            self.filtered_steps += 1
            return logits.detach()
        if not bool(torch.isfinite(loss)):
            self.skipped_steps += 1
            return logits.detach()
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        if not self._step_optimizer():  # float16 gradients overflowed: no step, a smaller loss scale
            self.skipped_steps += 1
        return logits.detach()

    def reset(self) -> None:
        super().reset()
        self.generator.set_state(self._generator_state)
        self.filtered_steps = 0

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "generator": self.generator.get_state(),
                "filtered_steps": self.filtered_steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.filtered_steps = int(state.get("filtered_steps", 0))
