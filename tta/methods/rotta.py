"""rotta: robust test-time adaptation in dynamic scenarios (Yuan, Xie, Li, CVPR 2023, arXiv 2303.13899).

Three parts, as in the paper (Sec. 3):

- Robust batch normalisation (RBN, Sec. 3.2): every BatchNorm normalises with global statistics, initialised to
  the source running statistics and moved by an exponential moving average towards the statistics of each batch the
  network trains on: mu <- (1 - alpha) mu + alpha mu_batch, var <- (1 - alpha) var + alpha var_batch (biased batch
  variance), alpha = ``rbn_momentum`` (0.05). Predictions use the stored statistics; training forwards (on the
  memory) normalise with the updated ones and update them (gradients flow through the batch part).
- Category-balanced sampling with timeliness and uncertainty (CSTU, Sec. 3.3): a memory bank of ``memory_size``
  (64) test images, filed under the teacher's pseudo-label; a class takes newcomers freely while it holds fewer
  than memory_size / C items and the bank has room. Each item has an age
  A (test samples seen since it entered) and an uncertainty U (the entropy of the teacher's prediction,
  -sum p log(p + 1e-6) as in the reference). Its heuristic score is
      H = lambda_t / (1 + exp(-A / memory_size)) + lambda_u U / ln C          (lambda_t = lambda_u = 1);
  otherwise a new sample (A = 0) replaces the item with the highest score, in its own class when that class holds
  its share, else in the classes holding the most, and only if that score exceeds its own.
- Robust training with timeliness (Sec. 3.4): every ``update_frequency`` (64) test samples, one Adam step on the
  memory: the student sees a strong augmentation of the memory images, the teacher the images themselves, and the
  loss is mean_x E(A_x) CE(softmax(teacher(x)), student(aug(x))) with E(A) = exp(-A) / (1 + exp(-A)), A the age /
  memory_size; then the teacher follows the student: theta_T <- (1 - nu) theta_T + nu theta_S, nu = 0.001.

The prediction returned for a batch is the teacher's, with its stored RBN statistics, before the batch's updates.

Reference: MD ``classification/methods/rotta.py`` (after BIT-DA/RoTTA), ``cfgs/cifar10_c/rotta.yaml``, ``conf.py``:
Adam, lr 1e-3, beta1 0.9, weight decay 0, batch 200, ROTTA.MEMORY_SIZE 64, UPDATE_FREQUENCY 64, NU 0.001,
ALPHA 0.05, LAMBDA_T 1, LAMBDA_U 1; the strong augmentation is CoTTA's transform (:class:`tta.augment.CottaAugment`,
one parameter draw per memory batch; images in [0, 1]). As in the reference, the trained parameters are the affine
parameters of the RBN layers and of LayerNorm/GroupNorm layers (which stay as they are), so ViTs and GroupNorm
networks adapt too (memory, teacher and loss, without RBN); the memory's order (class by class, oldest first),
the tie-breaking of the replacement (the last of equal scores) and the float32 timeliness weights are the
reference's.

Deliberate differences: the reference puts the whole student and teacher in train mode for the update (dropout,
drop-path on); ours puts only the RBN layers in their training behaviour and leaves the rest in eval mode. Its
teacher update also averages parameters that never train (equal in both, so only rounding differs): ours averages
the trained ones. RBN keeps its statistics in buffers of its own (the BatchNorm's running statistics are never
written) and refuses BatchNorm layers without running statistics (the reference fails on them). The number of
classes is read from the first batch's logits. The reference's update at HEAD (8b2ed63) calls
``loss_calculation(x)``, which takes no argument, so it raises outside mixed precision; the golden script calls it
without. Random draws come from generators the adapter owns (``seed``, as cotta's), re-seeded by ``reset()``.
``steps`` must be 1 (the reference would file each batch ``steps`` times).

State restored bitwise by ``reset()``: the trained parameters, the RBN statistics and parameters of student and
teacher, Adam's moments, the memory (emptied), the sample counter and the generators.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.augment import CottaAugment, RandomDraws, check_images, resolve_seed
from tta.base import LEAN_GRAPH_DEPRECATION, NORM_LAYERS, GradientAdapter
from tta.norm_layers import LayerSwap, describe_norm_layers, find_batchnorms, find_per_sample_norms
from tta.optim import make_optimizer
from tta.options import GradientOptions, option
from tta.registry import register
from tta.snapshot import Snapshot


class RobustBatchNorm(nn.Module):
    """RBN: BatchNorm with global statistics moved towards each training batch's (RoTTA Sec. 3.2).

    Shares the original layer's parameters and buffers (the same tensors; its running statistics are never written)
    and keeps the robust statistics in buffers of its own, ``mean`` and ``var`` (not persistent: the model's
    ``state_dict`` keys are unchanged), started from the source running statistics. In training behaviour
    (``self.training``) it updates them and normalises with the updated values, with gradients through the batch
    part; otherwise it normalises with the stored values.
    """

    def __init__(self, bn: _BatchNorm, momentum: float) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("rotta's robust BatchNorm starts from the source running statistics; this model has a "
                             "BatchNorm layer without them (track_running_stats=False)")
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = float(momentum)
        self.weight = bn.weight
        self.bias = bn.bias
        # The original layer's buffers, shared and never written (the model's state_dict keeps its keys and values).
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", getattr(bn, "num_batches_tracked", None))
        self.register_buffer("mean", bn.running_mean.detach().clone(), persistent=False)
        self.register_buffer("var", bn.running_var.detach().clone(), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"RobustBatchNorm expected (N, {self.num_features}, ...) input, got {tuple(x.shape)}")
        if not self.training:
            return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)
        batch_var, batch_mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        mean = (1.0 - self.momentum) * self.mean + self.momentum * batch_mean  # the RBN update (Sec. 3.2)
        var = (1.0 - self.momentum) * self.var + self.momentum * batch_var
        with torch.no_grad():
            self.mean.copy_(mean)
            self.var.copy_(var)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out


def timeliness_weight(ages: torch.Tensor) -> torch.Tensor:
    """E(A) = exp(-A) / (1 + exp(-A)) (RoTTA Sec. 3.4), A the age divided by the memory size."""
    return torch.exp(-ages) / (1.0 + torch.exp(-ages))


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample -sum_c softmax(teacher)_c log softmax(student)_c."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)


class CategoryBalancedMemory:
    """CSTU (RoTTA Sec. 3.3): per-class lists of items ``[slot, uncertainty, birth]`` in the order they entered, the
    images in a (capacity, ...) tensor, and a clock counting the samples offered (an item's age is
    ``clock - birth``: it is 1 right after it enters, as in the reference, which ages every item after each offer).
    Images are written to their slots lazily (``flush``), one indexed copy per batch or update."""

    def __init__(self, capacity: int, num_classes: int, lambda_t: float, lambda_u: float) -> None:
        self.capacity = capacity
        self.num_classes = num_classes
        self.per_class = capacity / num_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.classes: list[list[list]] = [[] for _ in range(num_classes)]
        self.free = list(range(capacity))
        self.clock = 0
        self.images: torch.Tensor | None = None
        self._pending: dict[int, int] = {}  # slot -> row of the batch being filed

    def __len__(self) -> int:
        return sum(len(items) for items in self.classes)

    def score(self, age: int, uncertainty: float) -> float:
        """The heuristic score H of an item (Sec. 3.3)."""
        return (self.lambda_t * 1 / (1 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    def _evict_highest(self, classes: list[int], new_score: float) -> bool:
        """Remove the highest-scoring item of ``classes`` if it outscores the new sample; whether there is room."""
        best = None
        for c in classes:
            for index, (_, uncertainty, birth) in enumerate(self.classes[c]):
                s = self.score(self.clock - birth, uncertainty)
                if best is None or s >= best[0]:
                    best = (s, c, index)
        if best is None:
            return True
        if best[0] <= new_score:
            return False
        slot = self.classes[best[1]].pop(best[2])[0]
        self._pending.pop(slot, None)
        self.free.append(slot)
        return True

    def offer(self, row: int, label: int, uncertainty: float) -> None:
        """File row ``row`` of the current batch under ``label``, or not (the CSTU rule); age every item."""
        new_score = self.score(0, uncertainty)
        sizes = [len(items) for items in self.classes]
        if sizes[label] < self.per_class:
            if sum(sizes) < self.capacity:
                room = True
            else:
                most = max(sizes)
                room = self._evict_highest([c for c, n in enumerate(sizes) if n == most], new_score)
        else:
            room = self._evict_highest([label], new_score)
        if room:
            slot = self.free.pop()
            self.classes[label].append([slot, uncertainty, self.clock])
            self._pending[slot] = row
        self.clock += 1

    def flush(self, batch: torch.Tensor) -> None:
        """Copy the images filed from ``batch`` since the last flush into their slots."""
        if self.images is None:
            self.images = batch.new_zeros((self.capacity, *batch.shape[1:]))
        if self._pending:
            slots = torch.tensor(list(self._pending), device=batch.device)
            rows = torch.tensor(list(self._pending.values()), device=batch.device)
            self.images[slots] = batch[rows]
            self._pending.clear()

    def contents(self) -> tuple[torch.Tensor, list[float]]:
        """The stored images (class by class, oldest first) and their ages divided by the capacity."""
        items = [item for items in self.classes for item in items]
        slots = torch.tensor([item[0] for item in items], device=self.images.device)
        return self.images[slots], [(self.clock - item[2]) / self.capacity for item in items]

    def state(self) -> dict[str, Any]:
        return {"classes": copy.deepcopy(self.classes), "free": list(self.free), "clock": self.clock,
                "images": None if self.images is None else self.images.clone()}

    def load(self, state: dict[str, Any]) -> None:
        self.classes = copy.deepcopy(state["classes"])
        self.free, self.clock = list(state["free"]), int(state["clock"])
        self.images = None if state["images"] is None else state["images"].clone()
        self._pending = {}


@dataclass
class RottaOptions(GradientOptions):
    """RoTTA's options; defaults are the reference's CIFAR-10-C configuration (Adam, lr 1e-3, beta1 0.9)."""

    memory_size: int = option(64, "capacity of the category-balanced memory bank (ROTTA.MEMORY_SIZE)")
    update_frequency: int = option(64, "one update every this many test samples (ROTTA.UPDATE_FREQUENCY)")
    nu: float = option(0.001, "teacher EMA: theta_T <- (1 - nu) theta_T + nu theta_S (ROTTA.NU)")
    rbn_momentum: float = option(0.05, "robust BatchNorm: weight of each training batch's statistics (ROTTA.ALPHA)")
    lambda_t: float = option(1.0, "weight of timeliness in the memory's heuristic score (ROTTA.LAMBDA_T)")
    lambda_u: float = option(1.0, "weight of uncertainty in the memory's heuristic score (ROTTA.LAMBDA_U)")
    soft_augmentations: bool = option(False, "milder strong-augmentation ranges (CoTTA's 'soft'; reference: False)")
    seed: int = option(-1, "seed of the strong augmentations (negative: torch.initial_seed(), which "
                           "torch.manual_seed sets)")


@register("rotta")
class Rotta(GradientAdapter):
    """Robust BN, a category-balanced memory with timeliness and uncertainty, and a timeliness-weighted teacher."""

    Options = RottaOptions
    batch_statistics = "robust EMA (RBN)"
    layers = NORM_LAYERS
    multi_pass = True
    inputs = "images"
    may_skip_update = True  # an update comes every update_frequency samples, not every batch
    select_all_options = {"update_frequency": 4, "memory_size": 8}  # updates within a few small test batches

    def _setup(self) -> None:
        o = self.options
        for name in ("memory_size", "update_frequency"):
            if getattr(o, name) < 1:
                raise ValueError(f"rotta: {name} must be at least 1, got {getattr(o, name)}")
        if not 0.0 <= o.nu <= 1.0 or not 0.0 <= o.rbn_momentum <= 1.0:
            raise ValueError(f"rotta: nu and rbn_momentum must be in [0, 1], got {o.nu} and {o.rbn_momentum}")
        if o.steps != 1:
            raise ValueError(f"rotta updates once every update_frequency samples; steps must be 1, got {o.steps}")
        if self._input_ndim not in (None, 4):
            raise ValueError(f"rotta augments images: it needs a model taking (N, C, H, W) batches; this one takes "
                             f"{self._input_ndim}-dimensional input")
        if o.lean_graph is not None:  # deprecated, as in GradientAdapter
            if o.lean_graph not in ("auto", "on", "off"):
                raise ValueError(f"rotta: lean_graph must be 'auto', 'on' or 'off', got {o.lean_graph!r}")
            warnings.warn(LEAN_GRAPH_DEPRECATION, FutureWarning, stacklevel=4)
        batchnorms = find_batchnorms(self.model)
        robust = [RobustBatchNorm(bn, o.rbn_momentum) for _, bn in batchnorms]  # refuses before anything changes
        self._swaps = []
        for (name, bn), replacement in zip(batchnorms, robust):
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, replacement)
            self._swaps.append(LayerSwap(parent, attr, bn, replacement))
        self.affine_layers = [*robust, *(m for _, m in find_per_sample_norms(self.model))]
        self.params = self._trainable_parameters()
        if not self.params:
            raise ValueError(f"rotta trains normalisation affine parameters, but this model has none (found "
                             f"{describe_norm_layers(self.model)})")
        self._requires_grad = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(self.params, o)
        with torch.no_grad():
            self.teacher = copy.deepcopy(self.model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._teacher_params = [p for p, q in zip(self.teacher.parameters(), self.model.parameters())
                                if q.requires_grad]
        self.memory: CategoryBalancedMemory | None = None
        self.samples_seen = 0
        self.random = RandomDraws(resolve_seed(o.seed))
        self._transform = CottaAugment(soft=o.soft_augmentations)
        #: The strong augmentation of the memory images (a test hook: replace it with a deterministic function).
        self.augment: Callable[[torch.Tensor], torch.Tensor] = self._random_augment

    def _random_augment(self, x: torch.Tensor) -> torch.Tensor:
        return self._transform(x, self.random.cpu, self.random.on(x.device))

    @property
    def robust_layers(self) -> list[RobustBatchNorm]:
        return [m for m in self.model.modules() if isinstance(m, RobustBatchNorm)]

    def _statistics(self, model: nn.Module) -> list[torch.Tensor]:
        return [t for m in model.modules() if isinstance(m, RobustBatchNorm) for t in (m.mean, m.var)]

    def _make_snapshot(self) -> Snapshot:
        return Snapshot([*self.params, *self._statistics(self.model), *self._teacher_params,
                         *self._statistics(self.teacher)], self.optimizer)

    @property
    def needs_batch_statistics(self) -> bool:
        return False  # predictions use the stored statistics: a batch of 1 is fine

    def reset(self) -> None:
        super().reset()
        self.memory = None
        self.samples_seen = 0
        self.random.reseed()

    # -- the step ------------------------------------------------------------------------------------------------
    def _check_method_input(self, x: torch.Tensor) -> None:
        check_images(x, self.name)

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_inference_mode()
        with torch.no_grad():
            logits = self.teacher(x)
            probs = logits.softmax(1)
            entropy = -(probs * torch.log(probs + 1e-6)).sum(1)
        o = self.options
        if self.memory is None:
            self.memory = CategoryBalancedMemory(o.memory_size, logits.shape[1], o.lambda_t, o.lambda_u)
        elif self.memory.num_classes != logits.shape[1]:
            raise ValueError(f"rotta: the model gives {logits.shape[1]} classes, the memory holds "
                             f"{self.memory.num_classes}")
        labels, uncertainties = probs.argmax(1).tolist(), entropy.tolist()  # one synchronisation per batch
        for row, (label, uncertainty) in enumerate(zip(labels, uncertainties)):
            self.memory.offer(row, label, uncertainty)
            self.samples_seen += 1
            if self.samples_seen % o.update_frequency == 0:
                self.memory.flush(x)
                self._update()
        self.memory.flush(x)
        return logits

    def _update(self) -> None:
        """One step on the memory (Sec. 3.4), then the teacher's moving average."""
        images, ages = self.memory.contents()
        saved = [t.clone() for t in (*self._statistics(self.model), *self._statistics(self.teacher))]
        robust = self.robust_layers + [m for m in self.teacher.modules() if isinstance(m, RobustBatchNorm)]
        for layer in robust:
            layer.train()
        try:
            with torch.enable_grad():
                strong = self.augment(images)
                with torch.no_grad():
                    teacher = self.teacher(images)
                with self._graph_mode(strong):
                    student = self.model(strong)
                weights = timeliness_weight(torch.tensor(ages, dtype=torch.float32, device=images.device))
                loss = (soft_cross_entropy(student, teacher) * weights).mean()
                if not bool(torch.isfinite(loss)):
                    self.skipped_steps += 1
                    with torch.no_grad():
                        for tensor, value in zip((*self._statistics(self.model), *self._statistics(self.teacher)),
                                                 saved):
                            tensor.copy_(value)
                    return
                self.optimizer.zero_grad(set_to_none=True)
                self._backward(loss)
                if not self._step_optimizer():  # float16 gradients overflowed: a smaller loss scale
                    self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
        finally:
            for layer in robust:
                layer.eval()
        momentum = 1.0 - self.options.nu  # theta_T <- m theta_T + (1 - m) theta_S, as the reference computes it
        with torch.no_grad():
            for t, s in zip(self._teacher_params, self.params):
                t.copy_(momentum * t + (1 - momentum) * s)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "random": self.random.state(), "samples_seen": self.samples_seen,
                "memory": None if self.memory is None else {"num_classes": self.memory.num_classes,
                                                            **self.memory.state()},
                "statistics": [t.clone() for t in (*self._statistics(self.model), *self._statistics(self.teacher))]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if "random" in state:
            self.random.load(state["random"])
        self.samples_seen = int(state.get("samples_seen", 0))
        memory = state.get("memory")
        self.memory = None
        if memory is not None:
            o = self.options
            self.memory = CategoryBalancedMemory(o.memory_size, memory["num_classes"], o.lambda_t, o.lambda_u)
            self.memory.load(memory)
        with torch.no_grad():
            for tensor, value in zip((*self._statistics(self.model), *self._statistics(self.teacher)),
                                     state.get("statistics", [])):
                tensor.copy_(value)
