"""AdaB2N (Lyu et al., NeurIPS 2023): BatchNorm with task-balanced batch statistics and a modified momentum.

Implements METHODS.md "AdaB2N" [verified, from the authors' code]:

* one learnable log-weight ``w_k`` per task (init 0) in every layer, trained by the model's own optimizer;
* training forward from the second task on, with ``n_k`` samples of task ``k`` in the (joint) batch::

      pi_k = (exp(w_k) + n_k) / sum_j (exp(w_j) + n_j)       s_i = pi_{task(i)} / n_{task(i)}
      mu_B = sum_i s_i mean_hw(x_i)        var_B = sum_i s_i mean_hw((x_i - mu_B)^2)   (biased)

  on the first task, plain biased batch statistics;
* running statistics with the modified momentum ``eta_t`` (:func:`eta_schedule`);
* a regulariser ``lambda * sum_layers [MSE(mu_B, running_mean) + MSE(var_B, running_var)]`` against the
  already-updated running statistics (buffers, hence detached);
* eval forward: plain BN with the running statistics.

All state lives in parameters and buffers (``task_log_weights``, ``running_*``, ``num_batches_tracked`` = t,
``eta``, ``task``), so ``state_dict`` / ``load_state_dict`` round-trips it exactly; the authors' code keeps
``eta`` in a Python attribute and loses it on resume.

Choices the formulas leave open, each a parameter:

* ``prior="seen"`` (default, as the authors' code): the sum over j runs over the tasks seen so far
  (0..current task); a seen task absent from the batch keeps its prior mass ``exp(w_j)``, so the weights of the
  samples present sum to slightly less than 1. ``prior="present"`` sums over the tasks present in the batch, so
  the weights sum to exactly 1 (mu_B is then a convex combination).
* ``unbiased_running_var=False`` (default, as METHODS.md: "var: the biased batch variance"). ``True`` applies
  Bessel's correction n/(n-1) (n = N*H*W) to the variance that enters the running estimate, as
  ``nn.BatchNorm2d`` does; with it, kappa = 1 and equal task counts reproduce BatchNorm2d exactly.
* the regulariser starts at task ``reg_start_task`` of :class:`AdaB2NPlugin` (default 1: the authors' ER-ACE
  adds it only from the second task on).
"""
from __future__ import annotations

import math

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche.core import SupervisedPlugin


def eta_schedule(t: int, momentum: float | None, kappa: float) -> float:
    """The modified momentum eta_t in closed form (t = batches seen, starting at 1).

    kappa = 0: 1/t (cumulative average); kappa = 1: m (BatchNorm); otherwise the recursion
    ``eta_1 = m^kappa, eta_t = eta_{t-1} / (eta_{t-1} + (1 - m)^kappa)``. With u_t = 1/eta_t it is linear,
    ``u_t = 1 + c u_{t-1}`` (c = (1-m)^kappa), hence ``u_t = (1 - c^(t-1)) / (1 - c) + c^(t-1) m^-kappa``.
    ``momentum=None`` (PyTorch's cumulative-average BN) gives 1/t for every kappa.
    """
    if t < 1:
        raise ValueError(f"t counts batches from 1, got {t}")
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    if momentum is None or kappa == 0.0:
        return 1.0 / t
    if kappa == 1.0:
        return float(momentum)
    # log c and 1 - c, 1 - c^(t-1) through log1p/expm1: for small kappa c is within ~1e-8 of 1, and the plain
    # (1 - c^(t-1)) / (1 - c) loses half its digits to cancellation (relative error ~1e-8 against the recursion).
    log_c = kappa * math.log1p(-momentum)
    u1 = math.exp(-kappa * math.log(momentum))
    ct = math.exp((t - 1) * log_c)
    u = math.expm1((t - 1) * log_c) / math.expm1(log_c) + ct * u1 if log_c != 0.0 else (t - 1) + u1
    return 1.0 / u


def eta_step(previous: float, t: int, momentum: float | None, kappa: float) -> float:
    """One step of the eta recursion: eta_t from eta_{t-1} (``previous``; ignored when t == 1 or unknown <= 0)."""
    if momentum is None or kappa == 0.0:
        return 1.0 / t
    if kappa == 1.0:
        return float(momentum)
    if t == 1 or previous <= 0.0:
        return eta_schedule(t, momentum, kappa)
    return previous / (previous + (1.0 - momentum) ** kappa)


def task_weights(
    log_weights: Tensor, counts: Tensor, current_task: int, prior: str = "seen"
) -> Tensor:
    """pi_k = (exp(w_k) + n_k) / sum_j (exp(w_j) + n_j) over the tasks in the sum (0 for the others).

    ``prior="seen"``: j in 0..max(current_task, highest task present); ``"present"``: j with n_j > 0.
    """
    K = log_weights.shape[0]
    index = torch.arange(K, device=log_weights.device)
    if prior == "seen":
        highest = int(torch.nonzero(counts).max()) if bool((counts > 0).any()) else 0
        active = index <= max(int(current_task), highest)
    elif prior == "present":
        active = counts > 0
    else:
        raise ValueError(f"prior must be 'seen' or 'present', got {prior!r}")
    concentration = torch.where(active, log_weights.exp() + counts, torch.zeros_like(log_weights))
    return concentration / concentration.sum()


def weighted_batch_stats(
    x: Tensor, sample_tasks: Tensor, log_weights: Tensor, current_task: int, prior: str = "seen"
) -> tuple[Tensor, Tensor]:
    """Per-channel (mu_B, var_B) with per-sample weights s_i = pi_{task(i)} / n_{task(i)} (biased variance)."""
    N, C = x.shape[:2]
    flat = x.reshape(N, C, -1)
    counts = torch.bincount(sample_tasks, minlength=log_weights.shape[0]).to(log_weights.dtype)
    pi = task_weights(log_weights, counts, current_task, prior)
    s = (pi[sample_tasks] / counts[sample_tasks]).to(x.dtype)  # (N,)
    mean = s @ flat.mean(-1)  # (C,)
    var = s @ (flat - mean.view(1, C, 1)).square().mean(-1)
    return mean, var


class AdaB2N(nn.BatchNorm2d):
    """BatchNorm replacement with task-balanced batch statistics (see the module docstring for the formulas).

    Accepts any (N, C, *) input, so it replaces BatchNorm1d as well as BatchNorm2d. Before each training forward
    from the second task on, call :func:`set_sample_tasks` with the task of every sample in the batch (current
    and replay together: one joint forward). A second forward with the same task assignment raises, because it
    would mean current and replay samples were normalised separately.
    """

    def __init__(self, num_features: int, num_tasks: int, kappa: float = 0.7, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, prior: str = "seen",
                 unbiased_running_var: bool = False, init_log_weight: float = 0.0) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if not 0.0 <= kappa <= 1.0:
            raise ValueError(f"kappa must be in [0, 1], got {kappa}")
        if prior not in ("seen", "present"):
            raise ValueError(f"prior must be 'seen' or 'present', got {prior!r}")
        self.num_tasks, self.kappa, self.prior = num_tasks, float(kappa), prior
        self.unbiased_running_var = unbiased_running_var
        self.task_log_weights = nn.Parameter(torch.full((num_tasks,), float(init_log_weight)))
        self.register_buffer("eta", torch.tensor(0.0, dtype=torch.float64))  # 0: no step taken yet
        self.register_buffer("task", torch.tensor(0, dtype=torch.long))
        self.sample_tasks: Tensor | None = None
        self._sample_tasks_used = False
        self.batch_mean: Tensor | None = None  # last training statistics, kept for the regulariser
        self.batch_var: Tensor | None = None

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, num_tasks: int, kappa: float = 0.7,
                       **kwargs) -> "AdaB2N":
        """An AdaB2N layer with ``bn``'s configuration and state (affine, running stats, batches seen)."""
        if not bn.track_running_stats:
            raise ValueError("AdaB2N needs a BatchNorm that tracks running statistics")
        layer = cls(bn.num_features, num_tasks, kappa, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    **kwargs)
        ref = bn.running_mean
        layer = layer.to(device=ref.device, dtype=ref.dtype)
        layer.eta = layer.eta.double()  # the momentum schedule keeps float64 whatever the layer's dtype
        with torch.no_grad():
            layer.running_mean.copy_(bn.running_mean)
            layer.running_var.copy_(bn.running_var)
            layer.num_batches_tracked.copy_(bn.num_batches_tracked)
            if bn.affine:
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
            t = int(bn.num_batches_tracked)
            if t > 0:
                layer.eta.fill_(eta_schedule(t, bn.momentum, layer.kappa))
        layer.train(bn.training)
        return layer

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def set_sample_tasks(self, tasks: Tensor | None) -> None:
        self.sample_tasks = None if tasks is None else tasks.to(self.running_mean.device, torch.long)
        self._sample_tasks_used = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_tasks={self.num_tasks}, kappa={self.kappa}, prior={self.prior}, "
                f"unbiased_running_var={self.unbiased_running_var}")

    def _next_eta(self) -> float:
        self.num_batches_tracked.add_(1)
        eta = eta_step(float(self.eta), int(self.num_batches_tracked), self.momentum, self.kappa)
        self.eta.fill_(eta)
        return eta

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        N, C = input.shape[:2]
        shape = (1, C) + (1,) * (input.dim() - 2)
        task = int(self.task)
        if task > 0 and self.sample_tasks is not None:
            if self.sample_tasks.numel() != N:
                raise ValueError(f"per-sample tasks given for {self.sample_tasks.numel()} samples but the batch "
                                 f"has {N}: current and replay samples must go through one joint forward")
            if self._sample_tasks_used:
                raise RuntimeError("AdaB2N layer called twice with one set of per-sample tasks: current and "
                                   "replay samples must go through ONE joint forward (call set_sample_tasks "
                                   "before every forward)")
            self._sample_tasks_used = True
            mean, var = weighted_batch_stats(input, self.sample_tasks, self.task_log_weights, task, self.prior)
        else:
            dims = [0] + list(range(2, input.dim()))
            var, mean = torch.var_mean(input, dims, correction=0)
        output = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            eta = self._next_eta()
            n = input.numel() // C
            running_var_input = var * (n / (n - 1)) if self.unbiased_running_var and n > 1 else var
            self.running_mean.add_(mean.detach() - self.running_mean, alpha=eta)
            self.running_var.add_(running_var_input.detach() - self.running_var, alpha=eta)
        self.batch_mean, self.batch_var = mean, var
        return output


def adab2n_layers(model: nn.Module) -> Iterator[AdaB2N]:
    return (m for m in model.modules() if isinstance(m, AdaB2N))


def convert_model(model: nn.Module, num_tasks: int, kappa: float = 0.7, **kwargs) -> nn.Module:
    """Replace every BatchNorm1d/2d of ``model`` (in place) by an :class:`AdaB2N` carrying its state.

    ``kwargs`` go to :class:`AdaB2N` (``prior``, ``unbiased_running_var``, ``init_log_weight``). Build the
    optimizer after converting, so it includes the task log-weights. Returns ``model``; raises if it has none.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, AdaB2N):
                setattr(parent, name, AdaB2N.from_batchnorm(child, num_tasks, kappa, **kwargs))
                replaced += 1
    if replaced == 0 and not any(True for _ in adab2n_layers(model)):
        raise ValueError("model has no BatchNorm1d/BatchNorm2d layer to convert")
    return model


def set_sample_tasks(model: nn.Module, tasks: Tensor | None) -> None:
    """Give every AdaB2N layer the task of each sample of the next (joint) training batch."""
    for layer in adab2n_layers(model):
        layer.set_sample_tasks(tasks)


def clear_batch_state(model: nn.Module) -> None:
    """Drop the per-sample tasks and the kept batch statistics (frees the graph they hold)."""
    for layer in adab2n_layers(model):
        layer.set_sample_tasks(None)
        layer.batch_mean = layer.batch_var = None


def current_task(model: nn.Module) -> int:
    layers = list(adab2n_layers(model))
    if not layers:
        raise ValueError("model has no AdaB2N layer")
    return int(layers[0].task)


def advance_task(model: nn.Module) -> int:
    """Increment every layer's task counter (end of an experience); returns the new counter."""
    layers = list(adab2n_layers(model))
    for layer in layers:
        layer.task.add_(1)
    return int(layers[0].task) if layers else 0


def regularizer(model: nn.Module) -> Tensor:
    """sum over AdaB2N layers of MSE(mu_B, running_mean) + MSE(var_B, running_var) for the last training forward.

    The running statistics are buffers, already updated by that forward, so no gradient reaches them.
    Returns a zero tensor when no layer holds batch statistics.
    """
    terms = [F.mse_loss(layer.batch_mean, layer.running_mean) + F.mse_loss(layer.batch_var, layer.running_var)
             for layer in adab2n_layers(model) if layer.batch_mean is not None]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(terms).sum()


def label_tasks(classes_per_task: int) -> Callable[[object], Tensor]:
    """Task of a sample = label // classes_per_task (class-incremental streams with contiguous class blocks)."""
    if classes_per_task < 1:
        raise ValueError("classes_per_task must be >= 1")

    def tasks(strategy) -> Tensor:
        return torch.div(strategy.mb_y, classes_per_task, rounding_mode="floor")

    return tasks


def experience_tasks(strategy) -> Tensor:
    """Task of a sample = the experience it came from (``strategy.mb_experience``, set by JointReplay)."""
    ids = getattr(strategy, "mb_experience", None)
    if ids is None:
        raise AttributeError("the strategy does not provide per-sample experience ids (use JointReplay)")
    return ids


class AdaB2NPlugin(SupervisedPlugin):
    """Avalanche plugin driving the AdaB2N layers of ``strategy.model``.

    before_forward: sets the task of every sample of the joint batch (``task_of(strategy)``; default
    label // classes_per_task); before_backward: adds ``lambda_reg * regularizer`` to the loss from task
    ``reg_start_task`` on; after_training_iteration: drops the batch state; after_training_exp: advances the
    task counter. The counter lives in the layers' buffers, so a model checkpoint carries it.
    """

    def __init__(self, lambda_reg: float = 1.0, classes_per_task: int | None = None,
                 task_of: Callable[[object], Tensor] | None = None, reg_start_task: int = 1) -> None:
        super().__init__()
        if task_of is None:
            if classes_per_task is None:
                raise ValueError("give classes_per_task (task = label // classes_per_task) or task_of")
            task_of = label_tasks(classes_per_task)
        self.lambda_reg, self.task_of, self.reg_start_task = float(lambda_reg), task_of, int(reg_start_task)
        self.last_regularizer = 0.0

    def before_forward(self, strategy, **kwargs) -> None:
        tasks = self.task_of(strategy)
        num_tasks = next(adab2n_layers(strategy.model)).num_tasks
        if bool((tasks >= num_tasks).any()) or bool((tasks < 0).any()):
            raise ValueError(f"sample tasks {tasks.unique().tolist()} outside 0..{num_tasks - 1}")
        set_sample_tasks(strategy.model, tasks)

    def before_backward(self, strategy, **kwargs) -> None:
        if self.lambda_reg == 0.0 or current_task(strategy.model) < self.reg_start_task:
            return
        reg = regularizer(strategy.model)
        self.last_regularizer = float(reg.detach())
        strategy.loss = strategy.loss + self.lambda_reg * reg

    def after_training_iteration(self, strategy, **kwargs) -> None:
        clear_batch_state(strategy.model)

    def after_training_exp(self, strategy, **kwargs) -> None:
        advance_task(strategy.model)

