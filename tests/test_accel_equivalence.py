"""The contract between the plain path and the CPU fast path (tta.accel): for every registered method, the same
predictions and the same updated parameters over several steps, and the same bitwise reset.

Tolerance: float32 predictions and norm-layer tensors agree within ``atol = rtol = 1e-4`` after each of
``STEPS`` batches (the fast path sums the batch statistics in another order, so results differ by rounding;
Adam's normalised steps keep the differences at that scale). Reset is bitwise: both paths return to the source
tensors exactly. The batches hold at least 2^17 input elements, so the lean graph runs (it is checked).
The tensor cache is process-wide and changes no value; it is covered by the subprocess tests of
test_accel_tensor_cache.py and test_accel_allocator.py, and stays off here.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tests.method_cases import adapt_case, takes_vectors
from tests.tta_nets import conv_net, full_state, mlp_bn1d
from tta.accel.lean_graph import LeanGraph

STEPS = 3
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
FAST_PIECES = {"kernels": True, "batch_norm": True, "lean_graph": True, "tensor_cache": False}


def _model_and_batches(kind: str) -> tuple[nn.Module, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    if kind == "cnn":  # 44 x 3 x 32 x 32 = 135,168 >= 2^17 input elements: the lean graph's range
        return conv_net(), [torch.rand(44, 3, 32, 32, generator=generator) * 2 - 0.5 for _ in range(STEPS)]
    return mlp_bn1d(), [torch.randn(32, 5, generator=generator) for _ in range(STEPS)]


def _adapt(method: str, model: nn.Module, kind: str) -> tta.Adapted:
    # A method training every weight trains the convolution biases in front of BatchNorm, whose gradient is zero
    # up to rounding: Adam would scale that rounding noise to lr-sized steps, so these are compared with SGD.
    options = {"optimizer": "sgd"} if tta.registry.method_class(method).updates.startswith("all") else {}
    if kind == "cnn":
        return adapt_case(method, model, input_shape=(3, 16, 16), classes=4, **options)
    return adapt_case(method, model, input_shape=(5,), classes=3, **options)


def _run(method: str, kind: str, fast: bool) -> dict:
    """Predictions and the model's full state after each step, then the state after reset."""
    if fast:
        tta.accel.enable(**FAST_PIECES)
    else:
        tta.accel.disable()
    try:
        model, batches = _model_and_batches(kind)
        source = full_state(model)
        adapted = _adapt(method, model, kind)
        lean = [isinstance(adapted._graph_mode(x), LeanGraph) for x in batches] \
            if isinstance(adapted, tta.GradientAdapter) else []
        predictions, states = [], []
        for x in batches:
            with torch.no_grad():
                predictions.append(adapted(x))
            states.append(full_state(model))
        adapted.reset()
        return {"source": source, "predictions": predictions, "states": states, "reset": full_state(model),
                "lean": lean}
    finally:
        tta.accel.disable()


@pytest.mark.parametrize("kind", ["cnn", "bn1d"])
@pytest.mark.parametrize("method", tta.methods())
def test_the_fast_path_gives_the_plain_path_s_predictions_updates_and_reset(method, kind, one_thread):
    if kind == "bn1d" and not takes_vectors(method):
        pytest.skip(f"{method} needs image batches")
    plain, fast = _run(method, kind, fast=False), _run(method, kind, fast=True)
    if kind == "cnn" and plain["lean"]:
        assert all(fast["lean"]) and not any(plain["lean"])  # the lean graph ran on the fast path only
    for step, (p, f) in enumerate(zip(plain["predictions"], fast["predictions"])):
        torch.testing.assert_close(f, p, **TOLERANCE, msg=lambda m: f"{method}, step {step + 1}: predictions: {m}")
    for step, (p, f) in enumerate(zip(plain["states"], fast["states"])):
        assert p.keys() == f.keys()
        for key in p:
            torch.testing.assert_close(f[key], p[key], **TOLERANCE,
                                       msg=lambda m: f"{method}, step {step + 1}: {key}: {m}")
    for run in (plain, fast):
        for key, value in run["source"].items():
            assert torch.equal(run["reset"][key], value), f"{method}: {key} not restored bitwise"


@pytest.mark.parametrize("method", ["tent", "core"])
def test_the_two_paths_differ_only_by_rounding_yet_do_update(method, one_thread):
    """The comparison above is not vacuous: the parameters move by much more than the tolerance."""
    plain = _run(method, "cnn", fast=False)
    moved = max((plain["states"][-1][key] - value).abs().max().item() for key, value in plain["source"].items()
                if value.is_floating_point())
    assert moved > 10 * TOLERANCE["atol"]  # Adam: about lr = 1e-3 per step
