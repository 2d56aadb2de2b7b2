"""Experience replay with ONE joint forward of current and replay samples (ER and ER-ACE), on Avalanche.

Avalanche's own ``ER_ACE`` runs the current batch and the replay batch through two separate forwards, so a
BatchNorm layer normalises them with two different sets of statistics; AdaB2N needs both in one batch (its
task-balanced statistics are computed over the joint batch). :class:`JointReplay` concatenates them into one
mini-batch before ``before_forward``, so every plugin (AdaB2NPlugin included) sees the joint batch in
``strategy.mb_x`` / ``strategy.mb_y`` and the per-sample experience ids in ``strategy.mb_experience``.

The buffer is a tensor reservoir (Vitter's algorithm R, sample by sample, as in the online-CL literature and the
AdaB2N authors' mammoth code), filled with the current batch after each optimiser step, with its own seeded
generator; its whole state round-trips through ``state_dict``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import CrossEntropyLoss

from avalanche.training.templates import SupervisedTemplate


class ReservoirBuffer:
    """Fixed-capacity reservoir of (x, y, task label, experience id), every sample seen kept with equal chance."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.n_seen = 0
        self.generator = torch.Generator().manual_seed(int(seed))
        self.x: Tensor | None = None
        self.y = torch.zeros(0, dtype=torch.long)
        self.t = torch.zeros(0, dtype=torch.long)
        self.experience = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.y.numel())

    def add(self, x: Tensor, y: Tensor, t: Tensor, experience: Tensor) -> None:
        """Offer each sample to the reservoir: slot n_seen while not full, else a uniform slot with p = cap/(n+1)."""
        if self.capacity == 0:
            self.n_seen += len(y)
            return
        x, y, t, experience = (v.detach().cpu() for v in (x, y, t, experience))
        if self.x is None:
            self.x = torch.empty((self.capacity,) + tuple(x.shape[1:]), dtype=x.dtype)
        for i in range(len(y)):
            if self.n_seen < self.capacity:
                slot = self.n_seen
                self.y = torch.cat([self.y, y[i : i + 1].long()])
                self.t = torch.cat([self.t, t[i : i + 1].long()])
                self.experience = torch.cat([self.experience, experience[i : i + 1].long()])
            else:
                slot = int(torch.randint(0, self.n_seen + 1, (1,), generator=self.generator))
                if slot >= self.capacity:
                    slot = -1
                else:
                    self.y[slot], self.t[slot], self.experience[slot] = y[i], t[i], experience[i]
            if slot >= 0:
                self.x[slot] = x[i]
            self.n_seen += 1

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """min(n, len) stored samples drawn without replacement."""
        size = len(self)
        if size == 0 or n <= 0:
            raise ValueError("cannot sample from an empty buffer")
        index = torch.randperm(size, generator=self.generator)[: min(n, size)]
        return self.x[:size][index], self.y[index], self.t[index], self.experience[index]

    def state_dict(self) -> dict[str, Any]:
        size = len(self)
        return {"capacity": self.capacity, "n_seen": self.n_seen, "generator": self.generator.get_state(),
                "x": None if self.x is None else self.x[:size].clone(), "y": self.y.clone(), "t": self.t.clone(),
                "experience": self.experience.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"buffer capacity {state['capacity']} in the state, {self.capacity} here")
        self.n_seen = int(state["n_seen"])
        self.generator.set_state(state["generator"])
        self.y, self.t, self.experience = (state[k].clone().long() for k in ("y", "t", "experience"))
        if state["x"] is None:
            self.x = None
        else:
            stored = state["x"]
            self.x = torch.empty((self.capacity,) + tuple(stored.shape[1:]), dtype=stored.dtype)
            self.x[: len(stored)] = stored


def ace_loss(logits: Tensor, labels: Tensor, replay_logits: Tensor, replay_labels: Tensor,
             seen_max: int) -> Tensor:
    """ER-ACE's asymmetric cross-entropy (Caccia et al. 2022, as in the AdaB2N authors' mammoth code).

    Current samples: cross-entropy over the logits of the classes present in the current batch and of the not yet
    seen classes (index >= ``seen_max``, the highest class seen so far); the other (old) classes are masked, so the
    new data does not push old-class logits down. Replay samples: plain cross-entropy. The two are summed.
    """
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, labels.unique()] = True
    if seen_max < logits.shape[1] - 1:
        mask[:, seen_max:] = True
    masked = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return F.cross_entropy(masked, labels) + F.cross_entropy(replay_logits, replay_labels)


class JointReplay(SupervisedTemplate):
    """SGD with experience replay where current and replay samples share ONE forward (and one BN batch).

    ``loss="er"``: cross-entropy over the joint batch, replay from the first step on (buffer non-empty).
    ``loss="er_ace"``: :func:`ace_loss`, replay from the second experience on (as the reference ER-ACE).
    ``mem_size=0`` gives plain fine-tuning (``sgd``). ``batch_size_mem`` defaults to ``train_mb_size``.
    Adds ``state_dict`` / ``load_state_dict`` (buffer, seen classes) and ``pending_optimizer_state``: an optimizer
    state loaded after Avalanche builds the optimizer for the next experience (Avalanche resets the optimizer state
    the first time a strategy sees it, which would lose momentum buffers on resume).
    """

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: Any = CrossEntropyLoss(), mem_size: int = 500, batch_size_mem: int | None = None,
                 loss: str = "er", buffer_seed: int = 0, **kwargs: Any) -> None:
        if loss not in ("er", "er_ace"):
            raise ValueError(f"loss must be 'er' or 'er_ace', got {loss!r}")
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, **kwargs)
        self.loss_type = loss
        self.buffer = ReservoirBuffer(mem_size, seed=buffer_seed)
        self.batch_size_mem = int(batch_size_mem or self.train_mb_size)
        self.seen_max = -1  # highest class label seen so far (ER-ACE mask)
        self.n_current = 0  # how many samples of the joint batch are current (the rest are replay)
        self.mb_experience: Tensor | None = None
        self.pending_optimizer_state: dict | None = None

    def _replay_now(self) -> bool:
        if len(self.buffer) == 0 or self.batch_size_mem <= 0:
            return False
        return self.loss_type == "er" or self.experience.current_experience > 0

    def check_model_and_optimizer(self, **kwargs: Any) -> None:
        super().check_model_and_optimizer(**kwargs)
        if self.pending_optimizer_state is not None:
            self.optimizer.load_state_dict(self.pending_optimizer_state)
            self.pending_optimizer_state = None

    def training_epoch(self, **kwargs: Any) -> None:
        for self.mbatch in self.dataloader:
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            x, y, t = self.mbatch[0], self.mbatch[1], self.mbatch[-1]
            exp_id = torch.full_like(y, int(self.experience.current_experience))
            self.n_current = len(y)
            self.mb_experience = exp_id
            if self._replay_now():
                bx, by, bt, be = (v.to(self.device) for v in self.buffer.sample(self.batch_size_mem))
                self.mbatch = [torch.cat([x, bx]), torch.cat([y, by]), torch.cat([t, bt])]
                self.mb_experience = torch.cat([exp_id, be])
            self.seen_max = max(self.seen_max, int(y.max()))

            self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            self.mb_output = self.forward()  # the one joint forward
            self._after_forward(**kwargs)
            self.loss += self.criterion()

            self._before_backward(**kwargs)
            self.backward()
            self._after_backward(**kwargs)
            self._before_update(**kwargs)
            self.optimizer_step()
            self._after_update(**kwargs)

            self.buffer.add(x, y, t, exp_id)
            self._after_training_iteration(**kwargs)

    def criterion(self) -> Tensor:
        n = self.n_current
        if not self.is_training or self.loss_type == "er" or len(self.mb_y) == n:
            return self._criterion(self.mb_output, self.mb_y)
        out, y = self.mb_output, self.mb_y
        return ace_loss(out[:n], y[:n], out[n:], y[n:], self.seen_max)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "seen_max": self.seen_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.seen_max = int(state["seen_max"])
