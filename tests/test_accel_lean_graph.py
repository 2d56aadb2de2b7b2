"""The lean autograd graph (tta.accel.lean_graph) and its bit-mask ReLU kernels (tta.accel.relu_mask): the same
values and gradients as autograd's, bit for bit, with fewer bytes saved for the backward pass."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tta
from tta.accel import kernels as native
from tta.accel import relu_mask as native_relu
from tta.accel.lean_graph import LeanGraph
from tta.methods.tent import softmax_entropy

needs_kernels = pytest.mark.skipif(native.library() is None, reason=f"C kernels not built: {native.status()}")


@pytest.fixture(autouse=True)
def kernels_on():
    """The kernels and fast BatchNorm of tta.accel on (the tensor cache stays off: it is process-wide)."""
    tta.accel.enable(tensor_cache=False)
    yield
    tta.accel.disable()


def packed_pass_bits(x: torch.Tensor) -> np.ndarray:
    """Where ``not x <= 0``, in memory order, one bit per element, least significant bit first (by hand)."""
    flat = x.detach().permute(*np.argsort(x.stride())[::-1].tolist()).reshape(-1) if x.dim() else x.reshape(-1)
    return np.packbits(~(flat <= 0).numpy(), bitorder="little")


# -- the kernels ---------------------------------------------------------------------------------------------------
@needs_kernels
@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 300), seed=st.integers(0, 2**16), inplace=st.booleans())
def test_relu_with_bits_matches_relu_and_records_where_it_passed(numel, seed, inplace):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    x[::7] = 0.0
    expected = torch.relu(x)
    source = x.clone()
    out, bits = native_relu.relu_with_bits(x, inplace=inplace)
    assert torch.equal(out, expected)
    assert (out is x) == inplace and (torch.equal(x, source) or inplace)
    assert bits.numel() == (numel + 7) // 8
    np.testing.assert_array_equal(bits.numpy(), packed_pass_bits(source))


@needs_kernels
def test_nan_passes_and_negative_zero_stops_as_in_pytorch():
    x = torch.tensor([float("nan"), -0.0, 0.0, -1.0, 2.0, float("inf"), -float("inf"), 1e-45, -1e-45])
    out, bits = native_relu.relu_with_bits(x)
    torch.testing.assert_close(out, torch.relu(x), equal_nan=True)
    # bits: nan passes (bit 0), 2.0 (bit 4), inf (bit 5), the smallest subnormal (bit 7); the rest stop
    assert bits.tolist() == [0b10110001, 0]
    grad = torch.arange(1.0, 10.0)
    expected = torch.ops.aten.threshold_backward(grad, torch.relu(x), 0)
    assert torch.equal(native_relu.relu_grad_from_bits(grad, bits, x.shape, x.stride()), expected)


@needs_kernels
@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=4, max_size=4), seed=st.integers(0, 2**16),
       channels_last=st.booleans(), grad_layout=st.sampled_from(["same", "contiguous", "transposed"]))
def test_gradient_from_bits_is_threshold_backward(shape, seed, channels_last, grad_layout):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, bits = native_relu.relu_with_bits(x)
    assert out.stride() == x.stride()
    grad = torch.randn(*shape, generator=g)
    if grad_layout == "same":
        grad = grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    elif grad_layout == "transposed":
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    got = native_relu.relu_grad_from_bits(grad, bits, out.shape, out.stride())
    assert got.stride() == out.stride()
    assert torch.equal(got, torch.ops.aten.threshold_backward(grad, out, 0))


@needs_kernels
def test_threads_give_the_same_bits_and_gradients():
    x = torch.randn(64, 16, 33, 31, generator=torch.Generator().manual_seed(1))  # odd size: a partial last byte
    grad = torch.randn_like(x)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, bits = native_relu.relu_with_bits(x)
            results.append((out, bits, native_relu.relu_grad_from_bits(grad, bits, out.shape, out.stride())))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_which_tensors_the_kernels_take():
    assert native_relu.dense_layout(torch.zeros(2, 3, 4, 5)) is torch.contiguous_format
    assert native_relu.dense_layout(torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)) \
        is torch.channels_last
    assert native_relu.dense_layout(torch.zeros(4, 6)[:, ::2]) is None
    assert not native_relu.applies(torch.zeros(3, dtype=torch.float64))
    assert not native_relu.applies(torch.zeros(0))


# -- the graph -----------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """conv-BN-ReLU, conv-BN, + shortcut, ReLU: the unit of a ResNet (out-of-place or in-place ReLUs)."""

    def __init__(self, channels: int = 4, inplace: bool = False, dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv1, self.bn1 = conv(channels, channels, 3, padding=1, bias=False), norm(channels)
        self.conv2, self.bn2 = conv(channels, channels, 3, padding=2, dilation=2, groups=2), norm(channels)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def small_net(inplace: bool = False, dims: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    net = nn.Sequential(conv(3, 4, 3, stride=2, padding=1), norm(4), nn.ReLU(inplace=inplace),
                        Block(4, inplace, dims), Block(4, inplace, dims), pool(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def adapted_step(model: nn.Module, x: torch.Tensor, method: str = "tent", lean: bool = False, **options) -> tuple:
    """One step of ``method`` with its forward under LeanGraph or autograd's graph (whatever the batch size):
    (logits, gradients of the adapted parameters, parameters after the update)."""
    adapted = tta.adapt(copy.deepcopy(model), method, **options)
    adapted._graph_mode = lambda x: LeanGraph() if lean else contextlib.nullcontext()
    captured = []
    adapted.optimizer.step = (lambda step: lambda *a, **k: (captured.append(
        [p.grad.clone() for p in adapted.params]), step(*a, **k))[1])(adapted.optimizer.step)
    logits = adapted(x)
    return logits, captured[0], [p.detach().clone() for p in adapted.params]


@needs_kernels
@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu_"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_input"])
def test_tent_step_is_bitwise_the_same_with_the_lean_graph(inplace, layout):
    model = small_net(inplace)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if layout != "contiguous":  # channels_last_input: the weights stay contiguous
        x = x.contiguous(memory_format=torch.channels_last)
    lean = adapted_step(model, x, lean=True)
    plain = adapted_step(model, x, lean=False)
    assert torch.equal(lean[0], plain[0])
    for a, b in zip(lean[1] + lean[2], plain[1] + plain[2]):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("method", ["core", "cafa"])
def test_other_gradient_methods_are_bitwise_the_same(method):
    model = small_net()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    options = {}
    if method == "cafa":
        g = torch.Generator().manual_seed(6)
        labelled = [(torch.randn(10, 3, 16, 16, generator=g), torch.arange(10) % 5) for _ in range(2)]
        options["source_stats"] = tta.source_stats(model, labelled)
    lean = adapted_step(model, x, method, lean=True, **options)
    plain = adapted_step(model, x, method, lean=False, **options)
    for a, b in zip([lean[0], *lean[1], *lean[2]], [plain[0], *plain[1], *plain[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dims", [1, 3])
def test_frozen_convolutions_of_other_dimensions_give_autograd_s_gradient(dims):
    model = small_net(dims=dims)
    x = torch.randn(4, 3, *([8] * dims), generator=torch.Generator().manual_seed(5))
    lean = adapted_step(model, x, lean=True)
    plain = adapted_step(model, x, lean=False)
    for a, b in zip(lean[1], plain[1]):
        assert torch.equal(a, b)


def saved_bytes(model: nn.Module, x: torch.Tensor, lean: bool) -> dict[int, int]:
    """Storages saved for the backward pass of tent's loss: {data pointer: bytes}, parameters excluded."""
    adapted = tta.adapt(copy.deepcopy(model), "tent")
    parameters = {p.untyped_storage().data_ptr() for p in adapted.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with LeanGraph() if lean else contextlib.nullcontext():
            softmax_entropy(adapted.model(x)).mean().backward()
    return saved


@needs_kernels
def test_the_lean_graph_keeps_the_batchnorm_inputs_and_one_bit_per_relu_element():
    model = small_net()
    x = torch.randn(6, 3, 16, 16)
    n, c, h, w = 6, 4, 8, 8  # every map after the strided stem
    full_map = n * c * h * w * 4
    lean, plain = saved_bytes(model, x, True), saved_bytes(model, x, False)
    big = lambda saved: sorted(b for b in saved.values() if b >= full_map // 32)  # noqa: E731
    # 5 BatchNorm inputs (stem, 2 per block) and 5 ReLUs at 1 bit per element: by hand
    assert big(lean) == sorted([full_map] * 5 + [full_map // 32] * 5)
    # autograd: the same BatchNorm inputs plus each ReLU's float output (the next convolution's input)
    assert big(plain) == [full_map] * 10


def test_not_applied_where_it_would_change_the_gradient_or_cannot_apply():
    conv = nn.Conv2d(3, 4, 3, padding="same")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.enable_grad(), LeanGraph():
        y = conv(x)  # the weight is trained: autograd's own node, which computes its gradient
        assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
        conv.requires_grad_(False)
        assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"  # string padding
        leaf = torch.randn(3, requires_grad=True)
        assert type(F.relu(leaf).grad_fn).__name__ in {"BitMaskReLUBackward", "ReluBackward0"}
        assert type(F.relu(leaf.double()).grad_fn).__name__ == "ReluBackward0"  # not float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert type(nn.Conv2d(3, 4, 3).requires_grad_(False)(x).grad_fn).__name__ != "FrozenConvolutionBackward"
    with torch.no_grad(), LeanGraph():
        assert conv(x).grad_fn is None


def test_without_the_c_kernels_the_relus_keep_autograd_s_node(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    with torch.enable_grad(), LeanGraph():
        assert type(F.relu(x * 1).grad_fn).__name__ == "ReluBackward0"
    model = small_net()
    batch = torch.randn(4, 3, 16, 16)
    for a, b in zip(adapted_step(model, batch, lean=True)[1], adapted_step(model, batch, lean=False)[1]):
        assert torch.equal(a, b)


def test_boolean_masks_where_the_bit_kernels_do_not_run(monkeypatch):
    """The GPU path (boolean masks), run here on CPU: the same step bit for bit, and 8 bits saved per element."""
    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr("tta.accel.lean_graph.BOOLEAN_MASK_DEVICES", frozenset({"cpu"}))
    model = small_net(inplace=True)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    lean, plain = adapted_step(model, x, lean=True), adapted_step(model, x, lean=False)
    for a, b in zip([lean[0], *lean[1], *lean[2]], [plain[0], *plain[1], *plain[2]]):
        assert torch.equal(a, b)
    full_map = 6 * 4 * 8 * 8 * 4
    saved = sorted(b for b in saved_bytes(model, x, True).values() if b >= full_map // 4)
    assert saved == sorted([full_map] * 5 + [full_map // 4] * 5)


def test_accel_runs_large_cpu_batches_under_the_lean_graph():
    large, small = torch.zeros(43, 3, 32, 32), torch.zeros(42, 3, 32, 32)  # 2^17 input elements: from 43 images
    assert 43 * 3 * 32 * 32 >= tta.accel.LEAN_GRAPH_MIN_INPUT_ELEMENTS > 42 * 3 * 32 * 32
    adapted = tta.adapt(small_net(), "tent")
    assert isinstance(adapted._graph_mode(large), LeanGraph)
    assert not isinstance(adapted._graph_mode(small), LeanGraph)
    assert not isinstance(adapted._graph_mode(torch.zeros(43, 3, 32, 32, device="meta")), LeanGraph)
    tta.accel.enable(lean_graph=False, tensor_cache=False)
    assert not isinstance(adapted._graph_mode(large), LeanGraph)
    tta.accel.disable()
    assert not isinstance(adapted._graph_mode(large), LeanGraph)


def test_the_deprecated_lean_graph_option_warns_and_is_honoured():
    large, small = torch.zeros(43, 3, 32, 32), torch.zeros(42, 3, 32, 32)
    with pytest.warns(FutureWarning, match=r"tta\.accel\.enable\(lean_graph=True\)"):
        forced = tta.adapt(small_net(), "tent", lean_graph="on")
    assert isinstance(forced._graph_mode(small), LeanGraph)
    with pytest.warns(FutureWarning, match="deprecated"):
        never = tta.adapt(small_net(), "tent", lean_graph="off")
    assert not isinstance(never._graph_mode(large), LeanGraph)
    with pytest.warns(FutureWarning, match="deprecated"):
        auto = tta.adapt(small_net(), "tent", lean_graph="auto")
    assert isinstance(auto._graph_mode(large), LeanGraph)  # follows tta.accel (on here)
    model = small_net()
    with pytest.raises(ValueError, match="lean_graph must be 'auto', 'on' or 'off'"):
        tta.adapt(model, "tent", lean_graph=True)
    assert isinstance(model[1], nn.BatchNorm2d) and all(p.requires_grad for p in model.parameters())  # untouched
