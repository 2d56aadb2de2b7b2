"""eata: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022, "Efficient Test-Time Model
Adaptation without Forgetting"). METHODS.md baselines table; reference: MD ``classification/methods/eata.py`` with
``cfgs/cifar10_c/eata.yaml``.

eta's step (:mod:`tta.methods.eta`: reliable and non-redundant samples, entropy weights, moving average) plus the
Fisher regulariser, with the equation numbers the reference code cites:

    loss = mean_selected S(x) E(x) + beta * sum_i F_i (theta_i - theta0_i) ** 2        (Eq. 8)

F (Eq. 9) is the Fisher diagonal of the trained parameters, estimated once from unlabelled source images with the
model's own pseudo-labels, and theta0 the parameters' source values (:func:`tta.fisher`, which
:meth:`Eata.source_options` calls). eata is not source-free: it needs ``fisher`` (a :class:`tta.FisherInfo`, or the
path of a file written by its ``save``). Both F and theta0 are keyed by parameter name.

Defaults (MD ``cfgs/cifar10_c/eata.yaml``): ``EATA.FISHER_ALPHA`` (beta) 1.0 (``conf.py``'s 2000 is the ImageNet
value), ``SOURCE.NUM_SAMPLES`` 2000 source images in batches of the test batch size (200), and eta's defaults
(margins 0.4 and 0.4, EMA 0.9, Adam lr 1e-3, beta1 0.9). Deliberate differences: those of eta; and the Fisher is
computed from whatever source batches the caller passes (the runner decides how many and their size), once,
rather than by the adapter's constructor.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from tta.fisher import FisherInfo, fisher
from tta.methods.eta import Eta, EtaOptions
from tta.options import option
from tta.registry import register


@dataclass
class EataOptions(EtaOptions):
    fisher: FisherInfo | str | None = option(
        None, "the Fisher diagonal and anchors of the trained parameters (tta.fisher(model, source_batches)) or the "
              "path of a file written by FisherInfo.save; required", cli=False)
    fisher_alpha: float = option(1.0, "beta of Eq. 8, the weight of the Fisher regulariser (CIFAR: 1.0; ImageNet: "
                                      "2000)")


@register("eata")
class Eata(Eta):
    """eta plus an anti-forgetting penalty beta * sum F (theta - theta0)^2 with the source Fisher diagonal F."""

    Options = EataOptions
    source_data = ("the Fisher diagonal of the trained parameters from unlabelled source images with the model's "
                   "pseudo-labels (tta.fisher; the reference: 2000 images)")

    @classmethod
    def source_options(cls, model: nn.Module, batches, options: EataOptions | None = None) -> dict:
        """``fisher`` from source batches (:func:`tta.fisher`; the labels are not used)."""
        return {"fisher": fisher(model, batches)}

    def _setup(self) -> None:
        info = self.options.fisher
        if info is None:
            raise ValueError("eata is not source-free: compute info = tta.fisher(model, source_batches) (unlabelled "
                             "source images; the reference uses 2000) and pass fisher=info (or the path of a file "
                             "written by info.save(path)); method 'eta' is EATA without the Fisher term")
        if not isinstance(info, FisherInfo):
            info = FisherInfo.load(info)
        if not self.options.fisher_alpha >= 0.0:
            raise ValueError(f"fisher_alpha must be non-negative, got {self.options.fisher_alpha}")
        super()._setup()
        try:
            self._penalty = self._match(info)
        except Exception:
            self._teardown()
            raise

    def _match(self, info: FisherInfo) -> list[tuple[nn.Parameter, str, str]]:
        """Pair each trained parameter with its Fisher diagonal and anchor (buffers moved to its device and dtype)."""
        trained = {id(p) for p in self.params}
        names = [(name, p) for name, p in self.model.named_parameters() if id(p) in trained]
        missing = [name for name, _ in names if name not in info.fisher or name not in info.anchors]
        extra = sorted(set(info.fisher) - {name for name, _ in names})
        if missing or extra:
            raise ValueError(f"eata: the Fisher information does not match the parameters this adapter trains "
                             f"(missing: {missing[:5]}, not trained: {extra[:5]}); compute it with "
                             "tta.fisher(model, source_batches) on this model")
        penalty, moved = [], []
        for i, (name, p) in enumerate(names):
            weight, anchor = info.fisher[name], info.anchors[name]
            if weight.shape != p.shape or anchor.shape != p.shape:
                raise ValueError(f"eata: the Fisher information of {name} has shape {tuple(weight.shape)}, the "
                                 f"parameter {tuple(p.shape)}; was it computed with this model?")
            self.register_buffer(f"fisher_{i}", weight.detach().to(device=p.device, dtype=p.dtype), persistent=False)
            self.register_buffer(f"anchor_{i}", anchor.detach().to(device=p.device, dtype=p.dtype), persistent=False)
            if not torch.equal(getattr(self, f"anchor_{i}"), p.detach()):
                moved.append(name)
            penalty.append((p, f"fisher_{i}", f"anchor_{i}"))
        if moved:
            warnings.warn(f"eata: the parameters {moved[:5]} differ from the anchors of the Fisher information (the "
                          "values they had when it was computed); the penalty pulls them towards those anchors",
                          stacklevel=5)
        return penalty

    def regulariser(self) -> torch.Tensor | None:
        """beta * sum_i F_i (theta_i - theta0_i)^2 (Eq. 8), summed parameter by parameter; None when beta = 0."""
        if self.options.fisher_alpha == 0.0:
            return None
        total = None
        for p, weight, anchor in self._penalty:
            term = self.options.fisher_alpha * (getattr(self, weight) * (p - getattr(self, anchor)) ** 2).sum()
            total = term if total is None else total + term
        return total
