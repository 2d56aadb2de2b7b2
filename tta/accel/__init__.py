"""The CPU fast path: opt-in speed-ups that replace parts of the plain PyTorch path, attached process-wide.

The methods of :mod:`tta` are plain PyTorch (autograd and standard ops on every device), and nothing global happens
on ``import tta`` or ``tta.adapt()``. This package makes CPU runs faster and leaner. Nothing in it runs until
:func:`enable` is called; the ``tta`` commands call it for CPU runs (``--no-accel`` keeps the plain path)::

    import tta
    tta.accel.enable()                  # process-wide; before the first batch
    adapted = tta.adapt(model, "tent")  # runs on the fast path
    tta.accel.enable(lean_graph=False)  # every piece can be switched on its own (leave-one-out measurements)
    tta.accel.disable()                 # back to the plain path

The pieces, keyword arguments of :func:`enable`; each gives the plain path's predictions and updates to rounding
(``tests/test_accel_equivalence.py``):

- ``kernels``: small C kernels (``csrc/``), built with the system's C compiler by :func:`enable` into
  ``TTA_CACHE_DIR`` (else ``$XDG_CACHE_HOME/tta`` or ``~/.cache/tta``) and loaded with ctypes
  (:mod:`tta.accel.kernels`): one-pass channel statistics (:mod:`~tta.accel.channel_moments`), a ReLU that saves
  one bit per element (:mod:`~tta.accel.relu_mask`), and one elementwise pass of the mixed-BN backward. The two
  pieces below use them where they apply and PyTorch's ops elsewhere.
- ``batch_norm``: the arithmetic of :class:`~tta.norm_layers.MixedBatchNorm` on CPU tensors
  (:mod:`tta.accel.batch_norm`): fast batch statistics, batch_norm's eval kernel for every alpha, and a
  hand-written backward.
- ``lean_graph``: gradient methods run their forward pass on CPU batches of at least
  ``LEAN_GRAPH_MIN_INPUT_ELEMENTS`` input elements under :class:`~tta.accel.lean_graph.LeanGraph`, a torch
  function mode that keeps fewer activations for the backward pass (the same gradients; no double backward).
- ``tensor_cache``: a caching allocator for CPU tensors of 1 MB and more (:mod:`tta.accel.tensor_cache`, C++ built
  by :func:`enable`), installed as PyTorch's CPU allocator (:mod:`tta.accel.allocator` says why).

``malloc`` (glibc's thresholds fixed with ``mallopt``) is no longer a piece: with the tensor cache on it bought
nothing measurable (docs/performance.md, "What each piece buys"); ``enable(malloc=...)`` warns and ignores it until
tta 0.3. ``TTA_NATIVE=0`` keeps the C and C++ code from being built. Where a piece cannot be had (no compiler, not
Linux), :func:`enable` says so once, as a warning, and that piece stays on the plain path; :func:`state` says what
is on and why not.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch

#: The pieces, in the order :func:`enable` takes them.
PIECES = ("kernels", "batch_norm", "lean_graph", "tensor_cache")
#: Pieces that were removed, with why: ``enable`` and ``--accel-without`` still take them (warning) until tta 0.3.
REMOVED_PIECES = {"malloc": "it bought nothing measurable with the tensor cache on (docs/performance.md)"}
#: The lean graph runs for CPU batches of at least this many input elements (43 CIFAR images, one 224 px image):
#: each recorded operation costs a Python autograd Function, a fixed few ms per tent step on ResNet-20 (+12-14 % of
#: the step at batch 8, within noise at batch 200; docs/performance.md), while the memory it saves grows with the
#: batch.
LEAN_GRAPH_MIN_INPUT_ELEMENTS = 1 << 17

_on: dict[str, bool] = dict.fromkeys(PIECES, False)
_notes: dict[str, str] = {}
_warned = False


def enable(kernels: bool = True, batch_norm: bool = True, lean_graph: bool = True, tensor_cache: bool = True,
           malloc: bool | None = None) -> dict[str, bool]:
    """Turn the fast path on for this process (the pieces given True; the others off). Returns which are on.

    Builds what needs building now (the C kernels, the tensor cache), not at the first batch. Call it before the
    model's first batch; calling again switches pieces (the tensor cache is uninstalled when turned off). A piece
    that cannot be had warns once per process and stays off. ``malloc``: deprecated and ignored (the piece was
    removed; see ``REMOVED_PIECES``), removed in tta 0.3.
    """
    from tta.accel import allocator

    if malloc is not None:
        warn_removed_piece("malloc", f"tta.accel.enable(malloc={malloc})", stacklevel=2)
    wanted = {"kernels": kernels, "batch_norm": batch_norm, "lean_graph": lean_graph, "tensor_cache": tensor_cache}
    _notes.clear()
    missing = []
    if kernels:
        from tta.accel import kernels as kernel_library

        status = kernel_library.status()
        wanted["kernels"] = bool(status["available"])
        if not status["available"]:
            _notes["kernels"] = str(status["detail"])
            if not _notes["kernels"].startswith("disabled"):
                missing.append(f"C kernels not used ({status['detail']})")
    if batch_norm:
        import tta.accel.batch_norm  # noqa: F401  (imported here, not at the first forward)
    if lean_graph:
        import tta.accel.lean_graph  # noqa: F401
    applied = allocator.install(tensor_cache=tensor_cache)
    if tensor_cache and not applied["tensor_cache"]:
        wanted["tensor_cache"] = False
        _notes["tensor_cache"] = note = applied["notes"]["tensor_cache"]
        if not note.startswith(("TTA_MALLOC", "disabled")):
            missing.append(f"tensor cache not used ({note})")
    if not tensor_cache:
        allocator.uninstall_tensor_cache()
    _on.update(wanted)
    _warn_once(missing)
    return dict(_on)


def disable() -> dict[str, bool]:
    """Back to the plain path: kernels, fast BatchNorm and lean graph off, the tensor cache uninstalled (tensors it
    holds stay valid)."""
    if _on["tensor_cache"]:
        from tta.accel import allocator

        allocator.uninstall_tensor_cache()
    _on.update(dict.fromkeys(PIECES, False))
    return dict(_on)


def state() -> dict[str, Any]:
    """What is on (``{piece: bool}``), and ``notes``: why a piece asked for is off. Builds and changes nothing."""
    return {**_on, "notes": dict(_notes)}


def is_on(piece: str) -> bool:
    """Whether ``piece`` (one of ``PIECES``) is on in this process; a removed piece (``REMOVED_PIECES``) warns and is
    off."""
    if piece in REMOVED_PIECES:
        warn_removed_piece(piece, f"tta.accel.is_on({piece!r})")
        return False
    if piece not in _on:
        raise ValueError(f"unknown accel piece {piece!r}; the pieces are: {', '.join(PIECES)}")
    return _on[piece]


def fast_batch_norm(x: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The fast MixedBatchNorm arithmetic (:func:`tta.accel.batch_norm.mixed_batch_norm`) for a CPU ``x`` when the
    ``batch_norm`` piece is on; None otherwise (the plain path)."""
    if not _on["batch_norm"] or x.device.type != "cpu":
        return None
    from tta.accel.batch_norm import mixed_batch_norm

    return mixed_batch_norm


def lean_graph_mode(x: torch.Tensor) -> contextlib.AbstractContextManager | None:
    """A :class:`~tta.accel.lean_graph.LeanGraph` for a gradient step's forward on the CPU batch ``x`` of at least
    ``LEAN_GRAPH_MIN_INPUT_ELEMENTS`` elements when the ``lean_graph`` piece is on; None otherwise."""
    if not _on["lean_graph"] or x.device.type != "cpu" or x.numel() < LEAN_GRAPH_MIN_INPUT_ELEMENTS:
        return None
    from tta.accel.lean_graph import LeanGraph

    return LeanGraph()


def retain_freed_memory() -> dict[str, int | float] | None:
    """Deprecated (removed in tta 0.3): ``tta.accel.enable()``; this alias turns on its ``tensor_cache`` piece and
    leaves the others as they are. Returns the tensor cache's settings in effect (None: not installed)."""
    warnings.warn("tta.retain_freed_memory() is deprecated and will be removed in tta 0.3: use tta.accel.enable() "
                  "(its piece tensor_cache is what this call installs)", FutureWarning, stacklevel=2)
    enable(**{piece: _on[piece] for piece in ("kernels", "batch_norm", "lean_graph")})
    from tta.accel import allocator

    return allocator.settings()


def warn_removed_piece(piece: str, used: str, stacklevel: int = 2) -> None:
    """Warn that ``used`` names the removed piece ``piece`` (one of ``REMOVED_PIECES``), which is ignored;
    ``stacklevel`` as for :func:`warnings.warn` called where this is called."""
    warnings.warn(f"{used}: the {piece} piece of tta.accel was removed in tta 0.2 because "
                  f"{REMOVED_PIECES[piece]}; it is ignored and can be dropped (from tta 0.3 it is an error)",
                  FutureWarning, stacklevel=stacklevel + 1)


def deprecated_module(old: str, new: str) -> None:
    """Warn that the module ``old`` moved to ``new`` (the old path stays for one minor version)."""
    warnings.warn(f"{old} moved to {new}; the old module path will be removed in tta 0.3", FutureWarning,
                  stacklevel=3)


def _warn_once(missing: list[str]) -> None:
    global _warned
    if missing and not _warned:
        _warned = True
        warnings.warn(f"tta.accel: {'; '.join(missing)}; those parts run the plain PyTorch path", RuntimeWarning,
                      stacklevel=3)
