"""NaP, Normalize-and-Project (Lyle et al., NeurIPS 2024): keep plasticity by fixing the weight norms.

METHODS.md, "NaP" [verified: the idea; steps reconstructed]. Implemented as written there:

1. :func:`insert_norms` puts a :class:`ChannelNorm` (LayerNorm or RMSNorm over the channel dimension, dim 1)
   immediately before every nonlinearity module.
2. :class:`NaP` records, at construction, the Frobenius norm of every weight tensor that feeds a normalisation
   layer and, after each optimiser step (every ``every`` steps, :class:`NaPPlugin`), projects it back:
   ``W <- W * ||W_0|| / ||W||``.
3. The norm layer's (gamma, beta) are projected jointly to a fixed norm (their initial joint norm, sqrt(C) for
   gamma = 1, beta = 0). The output layer is excluded by default (``project_output``).
4. Learning-rate decay is explicit: :class:`NaPPlugin` takes a schedule (continual/schedules.py).

Reconstructed choices, each a parameter:

* ``scale_bias=True``: the bias of a layer feeding a norm is scaled by the same factor as its weight. A norm
  layer is invariant to scaling its input, so the projection then leaves the network's function unchanged (up to
  the norm's eps); with ``False`` only W is rescaled (the bias is left to the optimiser).
* ``project_affine=True``: step 3 on or off.
* Layer/RMS normalisation runs over channels only (per position for conv maps), like flax's default LayerNorm on
  NHWC tensors, so no spatial size is needed at insertion time.

Supported models: nonlinearity modules that are children of an ``nn.Sequential`` (nested anywhere: MLPs and
plain CNNs built from Sequentials). The feeding layer of a norm is the nearest ``nn.Linear`` / ``nn.ConvNd``
before it in the same Sequential, with only scale-equivariant modules in between (batch norm, pooling, dropout,
flatten, identity); otherwise that norm has no feeding weight to project. Nonlinearity modules outside a
Sequential (e.g. ``self.relu`` reused inside a ResNet block) and functional calls (``F.relu``) cannot be placed
reliably: :func:`insert_norms` raises for the former (``strict=False`` skips them) and cannot see the latter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from avalanche.core import SupervisedPlugin

from continual.schedules import LRSchedulePlugin, Schedule

NONLINEARITIES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.SELU,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink,
)
WEIGHTED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
)


class ChannelNorm(nn.Module):
    """LayerNorm (``kind="layer"``) or RMSNorm (``kind="rms"``) over dim 1, for (N, C) and (N, C, *) inputs.

    layer: gamma * (x - mean_C) / sqrt(var_C + eps) + beta;  rms: gamma * x / sqrt(mean_C(x^2) + eps).
    """

    def __init__(self, num_features: int, kind: str = "layer", eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
        self.num_features, self.kind, self.eps = num_features, kind, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine and kind == "layer" else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.num_features:
            raise ValueError(f"ChannelNorm({self.num_features}) got {x.shape[1]} channels")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.kind == "layer":
            var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
            y = (x - mean) / torch.sqrt(var + self.eps)
        else:
            y = x / torch.sqrt(x.square().mean(dim=1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, kind={self.kind}, eps={self.eps}, affine={self.weight is not None}"


def _width(module: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels", "num_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


def _feeding_layer(children: list[nn.Module], position: int) -> nn.Module | None:
    """Nearest Linear/Conv before ``position`` with only scale-equivariant modules in between."""
    for module in reversed(children[:position]):
        if isinstance(module, WEIGHTED):
            return module
        if not isinstance(module, PASS_THROUGH + (ChannelNorm,)):
            return None
    return None


def insert_norms(model: nn.Module, kind: str = "layer", eps: float = 1e-5, strict: bool = True) -> int:
    """Insert a :class:`ChannelNorm` immediately before every nonlinearity inside every nn.Sequential (in place).

    The width comes from the nearest preceding module with ``out_features`` / ``out_channels`` / ``num_features``
    in the same Sequential. A nonlinearity already preceded by a ChannelNorm, nn.LayerNorm or nn.RMSNorm is left
    alone (inserting twice is a no-op). Returns the number of norms inserted. Raises for nonlinearity modules
    outside a Sequential unless ``strict=False``.
    """
    sequential_children = {id(c) for m in model.modules() if isinstance(m, nn.Sequential) for c in m.children()}
    stray = [name for name, m in model.named_modules() if isinstance(m, NONLINEARITIES) and id(m) not in
             sequential_children]
    if stray and strict:
        raise ValueError(f"nonlinearities outside an nn.Sequential cannot be placed: {stray[:5]} "
                         "(NaP supports Sequential-style MLPs and CNNs; pass strict=False to skip them)")
    reference = next(model.parameters(), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    inserted = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.children())
        rebuilt: list[nn.Module] = []
        for i, child in enumerate(children):
            previous = rebuilt[-1] if rebuilt else None
            if isinstance(child, NONLINEARITIES) and not isinstance(previous, (ChannelNorm, nn.LayerNorm, nn.RMSNorm)):
                width = next((w for w in map(_width, reversed(children[:i])) if w is not None), None)
                if width is None:
                    raise ValueError(f"cannot infer the width before nonlinearity {i} of {type(seq).__name__}")
                rebuilt.append(ChannelNorm(width, kind, eps).to(**factory))
                inserted += 1
            rebuilt.append(child)
        if len(rebuilt) != len(children):
            for key in list(seq._modules):
                del seq._modules[key]
            for j, module in enumerate(rebuilt):
                seq.add_module(str(j), module)
    return inserted


@dataclass
class _Pair:
    layer: nn.Module  # Linear/Conv whose output feeds ``norm``
    norm: ChannelNorm


def norm_pairs(model: nn.Module) -> list[_Pair]:
    """(feeding layer, ChannelNorm) pairs, in module order."""
    pairs = []
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.children())
        for i, child in enumerate(children):
            if isinstance(child, ChannelNorm):
                layer = _feeding_layer(children, i)
                if layer is not None:
                    pairs.append(_Pair(layer, child))
    return pairs


def output_layer(model: nn.Module) -> nn.Module | None:
    """The last Linear/Conv in module order (the classifier of a Sequential-style network)."""
    layers = [m for m in model.modules() if isinstance(m, WEIGHTED)]
    return layers[-1] if layers else None


class NaP:
    """Records the initial norms and projects back to them (steps 2 and 3 of METHODS.md).

    ``targets`` (weight norms by parameter name, joint affine norms by norm-layer name) is the whole state; it
    round-trips through ``state_dict`` so a resumed run projects to the norms of the original initialisation.
    """

    def __init__(self, model: nn.Module, project_affine: bool = True, project_output: bool = False,
                 scale_bias: bool = True) -> None:
        self.model = model
        self.project_affine, self.project_output, self.scale_bias = project_affine, project_output, scale_bias
        names = {id(m): n for n, m in model.named_modules()}
        self.pairs = norm_pairs(model)
        if not self.pairs:
            raise ValueError("no weight feeds a ChannelNorm: call insert_norms(model) first")
        self._weights: dict[str, nn.Module] = {names[id(p.layer)]: p.layer for p in self.pairs}
        head = output_layer(model)
        if project_output and head is not None:
            self._weights.setdefault(names[id(head)], head)
        self._norms: dict[str, ChannelNorm] = {names[id(p.norm)]: p.norm for p in self.pairs}
        for name, module in model.named_modules():
            if isinstance(module, ChannelNorm):
                self._norms.setdefault(name, module)
        self.targets: dict[str, float] = {}
        with torch.no_grad():
            for name, layer in self._weights.items():
                self.targets[f"{name}.weight"] = float(layer.weight.norm())
            for name, norm in self._norms.items():
                affine = self._affine(norm)
                if affine is not None:
                    self.targets[f"{name}.affine"] = float(affine.norm())

    @staticmethod
    def _affine(norm: ChannelNorm) -> Tensor | None:
        parts = [p.detach().flatten() for p in (norm.weight, norm.bias) if p is not None]
        return torch.cat(parts) if parts else None

    @torch.no_grad()
    def project_weights(self) -> None:
        """W <- W * ||W_0|| / ||W|| for every feeding weight (and the output layer if enabled)."""
        feeding = {id(p.layer) for p in self.pairs}
        for name, layer in self._weights.items():
            norm = layer.weight.norm()
            if norm == 0:
                continue
            scale = self.targets[f"{name}.weight"] / norm
            layer.weight.mul_(scale)
            if self.scale_bias and layer.bias is not None and id(layer) in feeding:
                layer.bias.mul_(scale)

    @torch.no_grad()
    def project_affine_params(self) -> None:
        """(gamma, beta) <- (gamma, beta) * r_0 / ||(gamma, beta)|| for every ChannelNorm."""
        for name, norm in self._norms.items():
            key = f"{name}.affine"
            affine = self._affine(norm)
            if key not in self.targets or affine is None:
                continue
            current = affine.norm()
            if current == 0:
                continue
            scale = self.targets[key] / current
            for p in (norm.weight, norm.bias):
                if p is not None:
                    p.mul_(scale)

    def project(self) -> None:
        self.project_weights()
        if self.project_affine:
            self.project_affine_params()

    def state_dict(self) -> dict[str, Any]:
        return {"targets": dict(self.targets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.targets) - set(state["targets"])
        if missing:
            raise ValueError(f"NaP state lacks targets for {sorted(missing)[:5]}")
        self.targets = {k: float(v) for k, v in state["targets"].items()}


class NaPPlugin(SupervisedPlugin):
    """Projects after every ``every``-th optimiser step (after_update); optional explicit lr schedule."""

    def __init__(self, nap: NaP, every: int = 1, lr_schedule: Schedule | None = None) -> None:
        super().__init__()
        if every < 1:
            raise ValueError("every must be >= 1")
        self.nap, self.every, self.steps = nap, int(every), 0
        self.lr = LRSchedulePlugin(lr_schedule) if lr_schedule is not None else None

    def before_update(self, strategy, **kwargs) -> None:
        if self.lr is not None:
            self.lr.before_update(strategy)

    def after_update(self, strategy, **kwargs) -> None:
        if self.lr is not None:
            self.lr.after_update(strategy)
        self.steps += 1
        if self.steps % self.every == 0:
            self.nap.project()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "nap": self.nap.state_dict(),
                "lr": None if self.lr is None else self.lr.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.nap.load_state_dict(state["nap"])
        if self.lr is not None and state.get("lr") is not None:
            self.lr.load_state_dict(state["lr"])


def weight_norms(model: nn.Module) -> dict[str, float]:
    """Frobenius norm of every Linear/Conv weight, by module name (for plasticity reports)."""
    return {name: float(m.weight.detach().norm()) for name, m in model.named_modules() if isinstance(m, WEIGHTED)}
