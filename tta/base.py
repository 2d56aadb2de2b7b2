"""The adapter base classes: what every method shares (validation, reset, release, state).

An adapter wraps the user's model *in place*, as tent does: its BatchNorm layers are replaced by
:class:`~tta.norm_layers.MixedBatchNorm` layers that share the original parameters and buffers (identical
``state_dict`` keys), and the model is put in eval mode. ``reset()`` restores every value a method can change
(norm-layer parameters and buffers, optimizer state) bitwise, from a snapshot of only those tensors.
``release()`` resets, puts the original layers, ``requires_grad`` flags and train/eval modes back, and returns
the model exactly as it was given.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from tta import accel
from tta.norm_layers import (MixedBatchNorm, describe_norm_layers, find_batchnorms, find_per_sample_norms,
                             swap_batchnorms, undo_swaps)
from tta.optim import make_optimizer
from tta.options import GradientOptions, MethodOptions
from tta.snapshot import Snapshot, weights_changed
from tta.source_stats import FeatureTap
from tta.validation import check_batch, expected_input_ndim, model_dtype


LEAN_GRAPH_DEPRECATION = (
    "the lean_graph option is deprecated and will be removed in tta 0.3: the lean graph is part of the opt-in CPU "
    "fast path, tta.accel.enable(lean_graph=True) (tta commands: on for CPU runs, --no-accel to turn it off). "
    "Until then 'on' and 'off' are honoured for this adapter and 'auto' follows tta.accel")


class Adapted(nn.Module):
    """A model that predicts and adapts online: ``logits = adapted(x)``; ``adapted.reset()``; ``adapted.model``."""

    name: ClassVar[str] = "adapted"
    Options: ClassVar[type] = MethodOptions
    # What the method is, read by the CLI, `tta methods`, the benchmarks and the tests (never a list of names).
    # Parameters it changes: "nothing", "norm statistics" (BatchNorm running statistics, no parameter), "norm
    # affine", "all" or "all but the classifier".
    updates: ClassVar[str] = "nothing"
    batch_statistics: ClassVar[str] = "never"  # normalises with batch statistics: "never", "always", "alpha < 1"
    source_data: ClassVar[str | None] = None  # what it needs from the source domain, if anything
    # The layers it needs: "any" (none), "BatchNorm", or NORM_LAYERS (BatchNorm, LayerNorm, GroupNorm or RMSNorm).
    layers: ClassVar[str] = "any"
    episodic_by_design: ClassVar[bool] = False  # resets before every batch whatever `episodic` says
    may_skip_update: ClassVar[bool] = False  # may leave a batch without an update (e.g. a non-finite loss)
    multi_pass: ClassVar[bool] = False  # more than one forward pass per batch (augmentations, teacher, SAM)
    inputs: ClassVar[str] = "any"  # "images": needs (N, C, H, W) batches (augmentations, patch shuffling)
    # Reads penultimate features at the input of the classifier layer (the last nn.Linear, or a feature_layer
    # option): prototype and kNN methods, feature alignment, a frozen head.
    uses_classifier: ClassVar[bool] = False
    # Options under which the method's sample filters keep every sample (entropy margins opened, thresholds
    # lowered), so tests and benchmarks on random models exercise the update path; {} for methods without filters.
    select_all_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, options: MethodOptions) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"adapt() needs a torch.nn.Module, got {type(model).__name__}")
        if any(isinstance(m, (MixedBatchNorm, FeatureTap)) for m in model.modules()):
            raise ValueError("this model is already adapted (it holds MixedBatchNorm or FeatureTap layers); call "
                             "release() on the first adapter before adapting it again")
        self.model = model
        self.options = options
        self.batches_seen = 0
        self.skipped_steps = 0
        self._released = False
        self._input_ndim = expected_input_ndim(model)
        self._dtype = model_dtype(model)
        self._modes = {name: m.training for name, m in model.named_modules()}
        self._setup()
        model.eval()
        self._snapshot = self._make_snapshot()

    @classmethod
    def source_options(cls, model: nn.Module, batches: Iterable[Any], options: Any = None) -> dict[str, Any]:
        """The options this method computes from source data (``source_data`` says what kind), ready to pass to
        ``tta.adapt(model, name, **options)``: e.g. cafa's ``source_stats``. ``batches`` yields ``(x, y)`` pairs
        of source images and labels (methods that need no labels ignore ``y``); ``options``, the method's other
        options if given, may shape what is computed. Each value returned has ``save(path)``, and the option also
        accepts the saved file's path (so runners can cache it). A source-free method returns {}.
        """
        return {}

    # -- hooks for subclasses ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Configure the model (swap layers, choose parameters); runs once in ``__init__``."""

    def _make_snapshot(self) -> Snapshot:
        return Snapshot([])

    @property
    def needs_batch_statistics(self) -> bool:
        return False

    def _check_method_input(self, x: torch.Tensor) -> None:
        """What this method needs of a batch beyond the generic checks; raises before anything changes (and
        before an episodic reset). Methods declaring ``inputs = "images"`` need (N, C, H, W) batches."""
        if self.inputs == "images" and x.dim() != 4:
            raise ValueError(f"{self.name} augments images and needs (N, C, H, W) image batches, got shape "
                             f"{tuple(x.shape)}; use a method without augmentations for other inputs")

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    # -- public API ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict the batch (logits) and adapt on it; invalid input raises before anything changes."""
        if self._released:
            raise RuntimeError(f"{self.name}: this adapter was released; call tta.adapt(model, ...) again")
        if self.options.check_inputs:
            check_batch(x, method=self.name, ndim=self._input_ndim, dtype=self._dtype,
                        needs_batch_statistics=self.needs_batch_statistics)
        self._check_method_input(x)
        weights_changed()  # a caller's autocast region may hold copies of weights from before the last call
        if self.options.episodic:
            self.reset()
        logits = self._predict_and_adapt(x)
        self.batches_seen += 1
        return logits

    def reset(self) -> None:
        """Return to the source model exactly: norm-layer tensors and optimizer state, bitwise."""
        self._snapshot.restore()
        self.batches_seen = 0
        self.skipped_steps = 0

    def release(self) -> nn.Module:
        """Reset, undo every change made to the model (layers, flags, modes) and return it."""
        if not self._released:
            self.reset()
            self._teardown()
            for name, module in self.model.named_modules():
                if name in self._modes:
                    module.train(self._modes[name])
            self._released = True
        return self.model

    def _teardown(self) -> None:
        """Undo what ``_setup`` changed."""

    def get_extra_state(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))

    def extra_repr(self) -> str:
        return f"method={self.name!r}, options={self.options}"


NORM_LAYERS = "BatchNorm, LayerNorm, GroupNorm"
PARAMETER_FREE = ("nothing", "norm statistics")  # ``updates`` values of methods that take no gradient step


class BatchNormAdapter(Adapted):
    """Base of the methods that change how BatchNorm layers normalise (statistics mixing with weight ``alpha``).

    With ``layers = "BatchNorm"`` (the default) a model without BatchNorm is refused; a subclass declaring
    ``layers = NORM_LAYERS`` accepts one and swaps whatever BatchNorm layers there are.
    """

    default_alpha: ClassVar[float] = 0.0
    batch_statistics: ClassVar[str] = "always"
    layers: ClassVar[str] = "BatchNorm"

    @property
    def alpha(self) -> float:
        """Weight of the SOURCE statistics: 1 = source model, 0 = batch statistics (test-time BN)."""
        return float(getattr(self.options, "alpha", self.default_alpha))

    def _setup(self) -> None:
        if self.layers == "BatchNorm" and not find_batchnorms(self.model):
            raise ValueError(
                f"method {self.name!r} adapts BatchNorm layers, but this model has none (found "
                f"{describe_norm_layers(self.model)}; no BatchNorm1d/2d/3d or SyncBatchNorm); use a method that "
                "trains LayerNorm/GroupNorm affine parameters (`tta methods` lists their layers), or a model with "
                "BatchNorm")
        self._swaps = swap_batchnorms(self.model, self.alpha, self._batchnorm_replacement)

    def _batchnorm_replacement(self, bn: nn.Module) -> MixedBatchNorm:
        """The layer that stands in for one BatchNorm (a subclass may return a MixedBatchNorm subclass)."""
        return MixedBatchNorm(bn, self.alpha)

    @property
    def norm_layers(self) -> list[MixedBatchNorm]:
        return [swap.replacement for swap in self._swaps]

    def _norm_tensors(self) -> list[torch.Tensor]:
        tensors: list[torch.Tensor] = []
        for layer in self.norm_layers:
            tensors += [t for t in (layer.weight, layer.bias, layer.running_mean, layer.running_var,
                                    layer.num_batches_tracked) if t is not None]
        return tensors

    def _make_snapshot(self) -> Snapshot:
        return Snapshot(self._norm_tensors())

    @property
    def needs_batch_statistics(self) -> bool:
        # A batch of 1 is only refused when some layer relies on the batch alone (alpha = 0 or no source stats).
        return any(layer.alpha == 0.0 or layer.running_mean is None for layer in self.norm_layers)

    def _teardown(self) -> None:
        undo_swaps(self._swaps)


class GradientAdapter(BatchNormAdapter):
    """Base of the methods that take gradient steps on the normalisation layers' affine parameters (gamma, beta).

    BatchNorm layers normalise with batch statistics (mixed with weight ``alpha``) and train their affine
    parameters; LayerNorm, GroupNorm and RMSNorm layers are used as they are and train theirs, so the method runs
    on a ViT or a GroupNorm ResNet as well. A subclass that trains other parameters overrides
    :meth:`_trainable_parameters`; the snapshot covers whatever it returns. Every other parameter gets
    ``requires_grad=False`` while adapted (no weight gradients are computed for it,
    and it never changes); ``release()`` restores the flags. Each step: forward, loss, backward, optimizer step;
    the logits returned are those of the last forward, computed before its update (as tent does).
    The step is autograd's ordinary graph; with ``tta.accel.enable()``, large CPU batches run their forward pass
    under :class:`tta.accel.lean_graph.LeanGraph` (fewer saved activations, the same gradients).
    A step whose loss is not finite (e.g. from inputs so large that the network overflows) is skipped, so one bad
    batch cannot poison the parameters; ``skipped_steps`` counts them.

    Loss scaling: float16 gradients underflow (and overflow) where float32 ones do not, so a step that runs under
    float16 autocast on CUDA (``torch.autocast("cuda", dtype=torch.float16)`` around the adapter call) goes through
    a :class:`torch.amp.GradScaler` the adapter owns (:meth:`_loss_scaler`): the loss is scaled before backward,
    the gradients unscaled before the optimizer step, and a step whose scaled gradients overflowed is skipped
    (counted in ``skipped_steps``) while the scale backs off. ``reset()`` forgets the scaler (a fresh one starts at
    the initial scale), ``state_dict()`` carries its state once one exists. Every other step (float32, bfloat16
    autocast, float16 autocast on the CPU) takes exactly the unscaled path. Methods that write their own step call
    :meth:`_backward` and :meth:`_step_optimizer` (and :meth:`_unscaled_gradients` to read gradients between the
    two), so that every gradient method gets the same scaling.
    """

    Options: ClassVar[type] = GradientOptions
    updates: ClassVar[str] = "norm affine"
    layers: ClassVar[str] = NORM_LAYERS
    may_skip_update: ClassVar[bool] = True
    # float16 loss scaling: made on first use (_loss_scaler), forgotten by reset(); a class default, so subclasses
    # with their own _setup (rotta) have it too.
    _scaler: torch.amp.GradScaler | None = None

    def _setup(self) -> None:
        if self.options.lean_graph is not None:  # deprecated option; checked before the model is touched
            if self.options.lean_graph not in ("auto", "on", "off"):
                raise ValueError(f"{self.name}: lean_graph must be 'auto', 'on' or 'off', got "
                                 f"{self.options.lean_graph!r}")
            warnings.warn(LEAN_GRAPH_DEPRECATION, FutureWarning, stacklevel=4)
        super()._setup()
        self.affine_layers: list[nn.Module] = [*self.norm_layers, *(m for _, m in find_per_sample_norms(self.model))]
        self.params = self._trainable_parameters()
        if not self.params:
            raise ValueError(f"method {self.name!r} trains {self.updates} parameters, but this model has none to "
                             f"train (found {describe_norm_layers(self.model)}; layers built with affine=False have "
                             "no affine parameters); use method='norm' or 'alpha_bn' for BatchNorm without affine")
        self._requires_grad = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(self.params, self.options)

    def _trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the affine parameters of every normalisation layer (``updates``)."""
        return [p for layer in self.affine_layers for p in (layer.weight, getattr(layer, "bias", None))
                if p is not None]

    def _make_snapshot(self) -> Snapshot:
        norm = self._norm_tensors()
        seen = {id(t) for t in norm}
        return Snapshot(norm + [p for p in self.params if id(p) not in seen], self.optimizer)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The unsupervised objective minimised on each batch."""
        raise NotImplementedError

    def _refuse_inference_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.name} takes gradient steps and cannot run inside torch.inference_mode(); "
                               "call it outside (torch.no_grad() around it is fine)")

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_inference_mode()
        with torch.enable_grad():
            for _ in range(self.options.steps):
                with self._graph_mode(x):
                    logits = self.model(x)
                    loss = self.loss(x, logits)
                if not bool(torch.isfinite(loss)):
                    self.skipped_steps += 1
                    break
                self.optimizer.zero_grad(set_to_none=True)
                self._backward(loss)
                if not self._step_optimizer():
                    self.skipped_steps += 1  # float16 gradients overflowed: no step, a smaller loss scale
                    continue
                self._after_step()
                weights_changed()
        self.optimizer.zero_grad(set_to_none=True)  # no gradient is held between batches
        return self._output(logits.detach())

    # -- loss scaling (float16 autocast on CUDA) -----------------------------------------------------------------
    def _loss_scaler(self) -> torch.amp.GradScaler | None:
        """The adapter's GradScaler when the step runs under float16 autocast on CUDA (created on first use), else
        None: bfloat16 has float32's exponent range and needs no scaling, and on the CPU float16 autocast takes the
        plain path too (loss scaling is the CUDA recipe of mixed precision; CPU steps stay on the one path that
        every CPU test checks)."""
        device = self.params[0].device
        if device.type != "cuda" or not torch.is_autocast_enabled(device.type) \
                or torch.get_autocast_dtype(device.type) != torch.float16:
            return None
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler(device.type)
        return self._scaler

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss scaled first when :meth:`_loss_scaler` says so, and outside autocast:
        autograd runs the backward under the autocast state of its caller, so inside a caller's region the gradient
        kernels of float32 operations (softmax, cafa's distances) would run in float16/bfloat16 too (cafa's
        gradients overflowed to NaN). Without autocast this is plain ``loss.backward()``."""
        scaler = self._loss_scaler()
        device_type = self.params[0].device.type
        outside = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
            else contextlib.nullcontext()
        with outside:
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()

    def _step_optimizer(self) -> bool:
        """``optimizer.step()``; under loss scaling, unscale the gradients, step unless they overflowed, and update
        the scale. Returns whether the step was taken (always, without scaling). Autocast's cached copies of the
        weights are dropped (:func:`~tta.snapshot.weights_changed`), so the next forward sees the new weights."""
        scaler = self._loss_scaler()
        if scaler is None:
            self.optimizer.step()
            weights_changed()
            return True
        scale = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        weights_changed()
        return scaler.get_scale() >= scale  # the scale backs off exactly when the step was skipped

    def _unscaled_gradients(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The gradients of ``params`` as the loss gives them, read between :meth:`_backward` and the step (SAR's
        perturbation): the ``.grad`` tensors themselves without scaling; under scaling, new tensors divided by the
        scale, or None when they overflowed (the scale then backs off; the caller skips the step). The ``.grad``
        tensors stay scaled, so a later :meth:`_step_optimizer` unscales them as usual."""
        grads = [p.grad for p in params]
        scaler = self._loss_scaler()
        if scaler is None:
            return grads
        scale = scaler.get_scale()
        grads = [g / scale for g in grads]
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            scaler.update(scale * scaler.get_backoff_factor())
            return None
        return grads

    def reset(self) -> None:
        super().reset()
        self._scaler = None

    def _after_step(self) -> None:
        """What a method does after each optimizer step (e.g. ensembling the weights with the source)."""

    def _output(self, logits: torch.Tensor) -> torch.Tensor:
        """The prediction returned for the batch, from the logits of its last forward (e.g. prior-corrected)."""
        return logits

    def _graph_mode(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """Where this batch's forward is recorded: autograd's graph, or :class:`~tta.accel.lean_graph.LeanGraph`
        when :mod:`tta.accel` says so (or the deprecated option ``lean_graph`` is ``"on"``; ``"off"``: never)."""
        choice = self.options.lean_graph
        if choice == "on":
            from tta.accel.lean_graph import LeanGraph

            return LeanGraph()
        return (None if choice == "off" else accel.lean_graph_mode(x)) or contextlib.nullcontext()

    def _teardown(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        super()._teardown()

    def get_extra_state(self) -> dict[str, Any]:
        state = {**super().get_extra_state(), "optimizer": self.optimizer.state_dict()}
        if self._scaler is not None:  # only once float16 scaling ran: other state dicts are as they always were
            state["loss_scaler"] = self._scaler.state_dict()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if "optimizer" in state:
            # Optimizer.load_state_dict keeps the given moment tensors (same dtype/device): copy them, or two
            # adapters loaded from one state dict would share (and doubly update) Adam's moments.
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._scaler = None
        if state.get("loss_scaler"):  # plain numbers (scale, growth tracker): a weights_only load reads them
            self._scaler = torch.amp.GradScaler(self.params[0].device.type)
            self._scaler.load_state_dict(state["loss_scaler"])
