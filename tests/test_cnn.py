"""Convolutions and poolings against torch models written here by hand.

The twins use ``F.conv1d``, ``F.conv2d``, ``F.max_pool2d``, ``F.avg_pool2d``,
``F.cross_entropy`` and explicit penalty terms, and nothing of symbackprop. Their state
dicts have the generated modules' parameter names; the loss and every gradient must agree
in float64 to a relative 1e-9 in numpy ``loss_and_grad``, torch ``loss_and_grad`` and the
torch ``Model``. Bad shapes and options are spec errors at their file:line:col.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from symbackprop.api import compile_spec
from symbackprop.errors import SymbackpropError
from symbackprop.ir.nodes import (
    Assign,
    Map,
    MaxPool,
    MaxPoolBackward,
    Program,
    TakeAt,
    View,
    WindowAdd,
    ordered,
)
from symbackprop.ir.passes import max_pool

from conftest import EXAMPLES, build, write_spec

torch = pytest.importorskip("torch")
F = torch.nn.functional


class Cnn(torch.nn.Module):
    """examples/cnn.yaml in torch.nn."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x, label):
        """The loss."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.relu(self.conv2(h))
        return F.cross_entropy(self.fc(h.reshape(h.shape[0], 64)), label)


@pytest.fixture(params=["as chosen", "direct", "dense"])
def conv_kernels(request, monkeypatch):
    """Each convolution as the conv pass chooses (matrix products against the kernel
    written out densely where that matrix is small), every one a convolution call, or
    every one products: both ways of computing each are checked on every geometry."""
    import importlib

    conv = importlib.import_module("symbackprop.ir.passes.conv")  # (the package's conv
    limit = {"as chosen": conv.DENSE_ENTRIES, "direct": 0, "dense": 10**9}[request.param]
    monkeypatch.setattr(conv, "DENSE_ENTRIES", limit)  # is the pass function)
    return request.param


def _compare(modules, params, batch, twin_loss, *, tol: float = 1e-9) -> None:
    """numpy and torch loss_and_grad and the torch Model against ``twin_loss(params,
    batch)`` (torch autograd on float64 leaves)."""
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in params.items()}
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    ref = twin_loss(leaves, tbatch)
    ref.backward()
    expected = {k: v.grad.numpy() for k, v in leaves.items()}
    assert np.isfinite(ref.item())

    def close(got, want, what):
        got = np.asarray(got)
        scale = max(1.0, float(np.max(np.abs(want))))
        assert got.shape == want.shape, what
        assert float(np.max(np.abs(got - want))) <= tol * scale, what

    loss, grads = modules["numpy"].loss_and_grad(params, **batch)
    close(loss, ref.detach().numpy(), "numpy loss")
    assert set(grads) == set(expected)
    for k in expected:
        close(grads[k], expected[k], f"numpy {k}")
    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    loss, grads = modules["torch"].loss_and_grad(tparams, **tbatch)
    close(loss.numpy(), ref.detach().numpy(), "torch loss")
    for k in expected:
        close(grads[k].numpy(), expected[k], f"torch {k}")
    model = modules["torch"].Model().double()
    model.load_state_dict(tparams)
    out = model(**tbatch)
    out.backward()
    close(out.detach().numpy(), ref.detach().numpy(), "Model loss")
    for name, p in model.named_parameters():
        close(p.grad.numpy(), expected[name], f"Model {name}")


def test_cnn_example_matches_torch_nn(tmp_path, conv_kernels) -> None:
    model, modules = build(tmp_path, (EXAMPLES / "cnn.yaml").read_text(encoding="utf-8"))
    source = model.source("torch")
    written_out = {k for k in ("conv1_weight", "conv2_weight")
                   if f"_dense_kernel({k}," in source}
    assert written_out == {"as chosen": {"conv2_weight"}, "direct": set(),
                           "dense": {"conv1_weight", "conv2_weight"}}[conv_kernels]
    rng = np.random.default_rng(3)
    params = modules["numpy"].init_params(seed=5)
    net = Cnn().double()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    batch = {"x": rng.normal(size=(6, 1, 8, 8)), "label": rng.integers(0, 10, 6)}

    _compare(modules, params, batch, _cnn_loss)
    # the twin module computes the same loss from the same state dict
    ref = net(torch.from_numpy(batch["x"]), torch.from_numpy(batch["label"]))
    assert abs(float(ref) - float(modules["numpy"].loss(params, **batch))) <= 1e-12


def _cnn_loss(p, b):
    h = F.max_pool2d(F.relu(F.conv2d(b["x"], p["conv1.weight"], p["conv1.bias"], padding=1)), 2)
    h = F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"]))
    return F.cross_entropy(F.linear(h.reshape(h.shape[0], 64), p["fc.weight"], p["fc.bias"]),
                           b["label"])


def test_cnn_example_initialises_as_torch_nn(tmp_path) -> None:
    """Kernels and biases start from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in x k x k,
    as torch.nn.Conv2d draws them."""
    _, modules = build(tmp_path, (EXAMPLES / "cnn.yaml").read_text(encoding="utf-8"))
    params = modules["numpy"].init_params(seed=0)
    for name, fan_in in (("conv1", 9), ("conv2", 72)):
        bound = 1 / np.sqrt(fan_in)
        for role in ("weight", "bias"):
            assert np.all(np.abs(params[f"{name}.{role}"]) <= bound)
        assert np.max(np.abs(params[f"{name}.weight"])) > 0.8 * bound
    assert params["conv2.weight"].shape == (16, 8, 3, 3)


CONV1D = """
name: conv1d_net
inputs: {x: [N, 3, 11]}
targets: {t: [N, 2]}
layers:
  - {name: c1, type: conv1d, channels: 4, kernel: 3, stride: 2, padding: 1}
  - {name: a1, type: activation, activation: tanh}
  - {name: c2, type: conv1d, channels: 2, kernel: 2, stride: 3, bias: false}
  - {name: flat, type: reshape, shape: [N, 4]}
  - {name: out, type: dense, units: 2}
loss: {type: mse, target: t}
weight_decay: {l2: 0.01}
"""


def test_conv1d_strided_padded_with_weight_decay(tmp_path, conv_kernels) -> None:
    # c1: (11 + 2 - 3) // 2 + 1 = 6 positions; c2: (6 - 2) // 3 + 1 = 2 (one left over)
    _, modules = build(tmp_path, CONV1D)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=v) for k, v in modules["numpy"].PARAM_SHAPES.items()}
    batch = {"x": rng.normal(size=(5, 3, 11)), "t": rng.normal(size=(5, 2))}

    def twin(p, b):
        h = torch.tanh(F.conv1d(b["x"], p["c1.weight"], p["c1.bias"], stride=2, padding=1))
        h = F.conv1d(h, p["c2.weight"], stride=3)
        y = F.linear(h.reshape(h.shape[0], 4), p["out.weight"], p["out.bias"])
        penalty = sum((p[k] ** 2).sum() for k in ("c1.weight", "c2.weight", "out.weight"))
        return F.mse_loss(y, b["t"]) + 0.01 / 2 * penalty

    _compare(modules, params, batch, twin)


POOLS = """
name: pools
inputs: {x: [N, 2, 9, 7]}
targets: {t: [N, 3]}
layers:
  - {name: c1, type: conv2d, channels: 3, kernel: [3, 2], stride: [1, 2], padding: [1, 1]}
  - {name: mp, type: maxpool2d, kernel: 3, stride: 2}
  - {name: ap, type: avgpool2d, kernel: [2, 1]}
  - {name: flat, type: reshape, shape: [N, 6]}
  - {name: out, type: dense, units: 3}
loss: {type: mse, target: t}
"""


def test_overlapping_max_pool_and_average_pool_on_odd_sizes(tmp_path, conv_kernels) -> None:
    # c1: [N, 3, 9, 4]; mp (3x3, stride 2, overlapping, floors 4 -> 1): [N, 3, 4, 1];
    # ap (2x1): [N, 3, 2, 1]
    model, modules = build(tmp_path, POOLS)
    assert model.derivation.graph.nodes["mp"].shape[1:] == (3, 4, 1)
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=v) for k, v in modules["numpy"].PARAM_SHAPES.items()}
    batch = {"x": rng.normal(size=(4, 2, 9, 7)), "t": rng.normal(size=(4, 3))}

    def twin(p, b):
        h = F.conv2d(b["x"], p["c1.weight"], p["c1.bias"], stride=(1, 2), padding=(1, 1))
        h = F.avg_pool2d(F.max_pool2d(h, 3, stride=2), (2, 1))
        return F.mse_loss(F.linear(h.reshape(h.shape[0], 6), p["out.weight"], p["out.bias"]),
                          b["t"])

    _compare(modules, params, batch, twin)


def test_max_pool_in_a_network_without_random_initialisation(tmp_path) -> None:
    """The torch max-pool backward's helper read _numel, defined only with the random
    initialisers: a network whose only parameters start at ones and zeros (a layer
    norm's) crashed with a NameError in loss_and_grad and Model.backward."""
    model, modules = build(tmp_path, """
name: ln_pool
inputs: {x: [N, 1, 4, 4]}
targets: {t: [N, 1, 2, 2]}
layers:
  - {name: ln, type: layernorm}
  - {name: pool, type: maxpool2d, kernel: 2}
loss: {type: mse, target: t}
""")
    rng = np.random.default_rng(4)
    params = {k: rng.normal(size=v) for k, v in modules["numpy"].PARAM_SHAPES.items()}
    batch = {"x": rng.normal(size=(3, 1, 4, 4)), "t": rng.normal(size=(3, 1, 2, 2))}

    def twin(p, b):
        h = F.layer_norm(b["x"], (4,), p["ln.weight"], p["ln.bias"])
        return F.mse_loss(F.max_pool2d(h, 2), b["t"])

    _compare(modules, params, batch, twin)


TIES = """
name: ties
inputs: {x: [N, 2, 7, 6]}
targets: {t: [N, 2]}
layers:
  - {name: mp, type: maxpool2d, kernel: 3, stride: 2}
  - {name: sq, type: elementwise, formula: "mp * mp"}
  - {name: mp2, type: maxpool2d, kernel: 2}
  - {name: flat, type: reshape, shape: [N, 2]}
  - {name: out, type: dense, units: 2}
loss: {type: mse, target: t}
"""


def test_max_pool_routes_a_tied_window_to_its_first_maximum_as_torch(tmp_path) -> None:
    """Integer pixels tie often: every window's gradient goes to its first maximum
    (row-major), as torch.nn's max pooling gives it, in overlapping (3x3, stride 2) and
    tiling (2x2) windows, for the parameters and the input, in both modules."""
    model, modules = build(tmp_path, TIES)
    assert model.derivation.graph.nodes["mp"].shape[1:] == (2, 3, 2)
    rng = np.random.default_rng(7)
    params = {k: rng.normal(size=v) for k, v in modules["numpy"].PARAM_SHAPES.items()}
    x = rng.integers(0, 3, size=(5, 2, 7, 6)).astype(float)
    x[0, 0] = 1.0  # one whole image of one value: every window tied everywhere
    batch = {"x": x, "t": rng.normal(size=(5, 2))}

    def twin(p, b):
        h = F.max_pool2d(F.max_pool2d(b["x"], 3, stride=2) ** 2, 2)
        return F.mse_loss(F.linear(h.reshape(h.shape[0], 2), p["out.weight"],
                                   p["out.bias"]), b["t"])

    _compare(modules, params, batch, twin)
    xt = torch.tensor(x, requires_grad=True)
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    twin(p, {"x": xt, "t": torch.from_numpy(batch["t"])}).backward()
    assert np.count_nonzero(xt.grad.numpy()) < xt.numel() / 4  # one element per window
    _, grads = modules["numpy"].loss_and_grad(params, **batch, wrt=("x",))
    assert np.array_equal(grads["x"] != 0, xt.grad.numpy() != 0)
    assert np.max(np.abs(grads["x"] - xt.grad.numpy())) <= 1e-12
    tgrads = modules["torch"].loss_and_grad(p, x=torch.from_numpy(x),
                                             t=torch.from_numpy(batch["t"]))[1]
    assert set(tgrads) == {"out.weight", "out.bias"}
    tm = modules["torch"].Model().double()
    tm.load_state_dict(p)
    x2 = torch.tensor(x, requires_grad=True)
    tm(x=x2, t=torch.from_numpy(batch["t"])).backward()
    assert torch.equal(x2.grad != 0, xt.grad != 0)
    assert torch.max(torch.abs(x2.grad - xt.grad)) <= 1e-12


def test_max_pool_indices_follow_torch_with_nan_and_infinities(tmp_path) -> None:
    """The numpy helper picks the arg-max as torch does: the first maximum, a NaN wins
    (the last NaN of a window), a window of -inf keeps its first position; the maxima it
    returns with them are torch's too."""
    _, modules = build(tmp_path, TIES)
    helper = modules["numpy"]._max_pool_indices
    x = np.random.default_rng(3).integers(0, 2, size=(2, 3, 7, 6)).astype(float)
    x[0, 0, :3, :3] = -np.inf
    x[0, 1, 1, 1] = x[0, 1, 2, 0] = np.nan
    x[1, 2, 4:, 2:] = np.inf
    for kernel, stride in (((3, 3), (2, 2)), ((2, 3), (1, 2))):
        top, ref = F.max_pool2d(torch.from_numpy(x), kernel, stride=stride,
                                return_indices=True)
        values, indices = helper(x, kernel, stride)
        assert np.array_equal(indices, ref.numpy())
        assert np.array_equal(values, top.numpy(), equal_nan=True)


def test_input_gradient_of_a_convolution(tmp_path, conv_kernels) -> None:
    """wrt=("x",): the full convolution with the flipped kernel, against autograd."""
    _, modules = build(tmp_path, CONV1D)
    rng = np.random.default_rng(4)
    params = {k: rng.normal(size=v) for k, v in modules["numpy"].PARAM_SHAPES.items()}
    batch = {"x": rng.normal(size=(3, 3, 11)), "t": rng.normal(size=(3, 2))}
    x = torch.tensor(batch["x"], requires_grad=True)
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    h = torch.tanh(F.conv1d(x, p["c1.weight"], p["c1.bias"], stride=2, padding=1))
    h = F.conv1d(h, p["c2.weight"], stride=3)
    y = F.linear(h.reshape(3, 4), p["out.weight"], p["out.bias"])
    penalty = sum((p[k] ** 2).sum() for k in ("c1.weight", "c2.weight", "out.weight"))
    (F.mse_loss(y, torch.from_numpy(batch["t"])) + 0.005 * penalty).backward()
    _, grads = modules["numpy"].loss_and_grad(params, **batch, wrt=("x",))
    assert set(grads) == {"x"}
    scale = max(1, np.abs(x.grad.numpy()).max())
    assert np.max(np.abs(grads["x"] - x.grad.numpy())) <= 1e-12 * scale
    model = modules["torch"].Model().double()
    model.load_state_dict(p)
    x2 = torch.tensor(batch["x"], requires_grad=True)
    model(x=x2, t=torch.from_numpy(batch["t"])).backward()
    assert np.max(np.abs(x2.grad.numpy() - x.grad.numpy())) <= 1e-12 * scale


def test_numpy_module_has_no_convolution_call(tmp_path) -> None:
    """numpy has no convolution: the module's helpers copy the windows into one matrix
    (one strided slice per kernel tap) for one product; the pooling's adjoint adds each
    window's gradient at its arg-max (one bincount), with no ties array of the windows'
    size."""
    model = compile_spec(EXAMPLES / "cnn.yaml")
    source = model.source("numpy")
    assert "def _im2col(" in source and "_max_pool_backward(d_pool1, pool1_arg1" in source
    assert "pool1_ties1 =" not in source.split("def loss_and_grad")[1]
    assert "import torch" not in source and "scipy" not in source


@pytest.mark.parametrize("layer,message", [
    ("{name: c, type: conv2d, channels: 2, kernel: 9}",
     "kernel 9 is larger than the height 8 of the input 'x' [N, 1, 8, 8]"),
    ("{name: c, type: conv2d, channels: 2, kernel: [2, 9]}",
     "kernel 9 is larger than the width 8 of the input 'x' [N, 1, 8, 8]"),
    ("{name: c, type: conv2d, channels: 2, kernel: 3, padding: 3}",
     "padding 3 is more than the kernel 3 minus 1 (the height)"),
    ("{name: c, type: conv2d, channels: 2, kernel: 3, stride: [1, 0]}",
     "stride must be at least 1, got [1, 0]"),
    ("{name: c, type: conv2d, channels: 2, kernel: [3, 3, 3]}",
     "kernel has 2 entries for conv2d, got 3"),
    ("{name: c, type: conv1d, channels: 2, kernel: 3}",
     "conv1d takes a rank-3 input [N, C, L], got 'x' [N, 1, 8, 8]"),
    ("{name: c, type: conv2d, channels: 2, kernel: 3, stride: 0}",
     "stride must be at least 1, got 0"),
    ("{name: c, type: conv2d, channels: 2, kernel: 2.5}",
     "expected a non-negative integer, or a list of one per spatial axis, got 2.5"),
    ("{name: c, type: conv2d, channels: 0, kernel: 3}", "expected a positive integer"),
    ("{name: c, type: maxpool2d, kernel: 0}", "kernel must be at least 1, got 0"),
    ("{name: c, type: avgpool2d, kernel: 2, padding: 1}", "padding"),
])
def test_bad_windows_are_spec_errors_at_their_place(tmp_path, layer, message) -> None:
    text = f"""
name: bad
inputs: {{x: [N, 1, 8, 8]}}
targets: {{t: [N, 1]}}
layers:
  - {layer}
  - {{name: flat, type: reshape, shape: [N, -1]}}
  - {{name: out, type: dense, units: 1}}
loss: {{type: mse, target: t}}
"""
    path = write_spec(tmp_path, text)
    with pytest.raises(SymbackpropError) as err:
        compile_spec(path)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}:6:")


def test_symbolic_spatial_size_is_refused(tmp_path) -> None:
    path = write_spec(tmp_path, """
name: bad
inputs: {x: [N, 1, H, 8]}
targets: {t: [N, 1]}
layers:
  - {name: c, type: conv2d, channels: 2, kernel: 3}
  - {name: flat, type: reshape, shape: [N, -1]}
  - {name: out, type: dense, units: 1}
loss: {type: mse, target: t}
""")
    with pytest.raises(SymbackpropError, match="needs numbers for the channels and spatial"):
        compile_spec(path)


def test_generated_cnn_is_up_to_date() -> None:
    from symbackprop.cli import main

    from conftest import ROOT

    assert main(["generate", str(EXAMPLES / "cnn.yaml"), "--out",
                 str(ROOT / "generated"), "--check"]) == 0


# -- the machinery: delta elimination, lowering and the conv pass -------------------------

def test_window_deltas_stay_and_inner_tap_sums_merge() -> None:
    """d/dx of sum_{a} W[a] x[2i + a - 1]: the delta pins neither i nor a alone, so it stays
    in one flat sum over positions and taps (the window-add form)."""
    import sympy as sp

    from symbackprop.derive.calculus import eliminate_deltas

    i, a, k = sp.symbols("i0 s0 k0", integer=True)
    g, w = sp.IndexedBase("g"), sp.IndexedBase("W")
    inner = sp.Sum(w[a] * sp.KroneckerDelta(2 * i + a - 1, k), (a, 0, 2))
    out = eliminate_deltas(sp.Sum(g[i] * inner, (i, 0, 3)), {k: sp.Integer(8)})
    assert isinstance(out, sp.Sum) and {lim[0] for lim in out.limits} == {i, a}
    assert out.function.has(sp.KroneckerDelta)
    # a 2-wide window with stride 2 tiles an 8-long axis like a reshape, but its tap stays
    # a tap (the adjoint reads g at floor(k/2) only)
    tiled = sp.Sum(g[i] * sp.Sum(sp.KroneckerDelta(2 * i + a, k), (a, 0, 1)), (i, 0, 3))
    assert eliminate_deltas(tiled, {k: sp.Integer(8)}).has(sp.KroneckerDelta)


def test_a_digit_delta_that_misses_the_last_rows_is_no_reshape() -> None:
    """delta(2*i + j, k) with i < 3, j < 2 covers k < 6: a reshape only when k has 6 values."""
    import sympy as sp

    from symbackprop.derive.calculus import eliminate_deltas

    i, j, k = sp.symbols("i0 i1 k0", integer=True)
    g = sp.IndexedBase("g")
    expr = sp.Sum(g[i, j] * sp.KroneckerDelta(2 * i + j, k), (i, 0, 2), (j, 0, 1))
    assert not eliminate_deltas(expr, {k: sp.Integer(6)}).has(sp.KroneckerDelta)
    assert eliminate_deltas(expr, {k: sp.Integer(7)}).has(sp.KroneckerDelta)


def test_conv_pass_makes_each_contraction_one_call() -> None:
    """conv1 (its kernel written out densely: 512 x 64 entries) stays a convolution;
    conv2 (64 x 128, at most DENSE_ENTRIES) becomes matrix products against its kernel
    written out once, which the forward pass and the input gradient share."""
    from symbackprop.ir.passes.conv import DENSE_ENTRIES

    assert 64 * 128 <= DENSE_ENTRIES < 512 * 64
    model = compile_spec(EXAMPLES / "cnn.yaml")
    torch_src, numpy_src = model.source("torch"), model.source("numpy")
    for call in ("torch.nn.functional.conv2d(x, conv1_weight, conv1_bias, stride=(1, 1), "
                 "padding=(1, 1))",
                 "_conv_weight_grad(x, (8, 1, 3, 3), d_conv1, stride=(1, 1), padding=(1, 1))",
                 "conv2_weight_dense = _dense_kernel(conv2_weight, (4, 4), (1, 1), (0, 0))",
                 "conv2 = _dense_conv(pool1, conv2_weight_dense, conv2_bias, (N, 16, 2, 2))",
                 "d_pool1 = (d_conv2.flatten(1) @ conv2_weight_dense).view(N, 8, 4, 4)",
                 "_dense_conv_weight(pool1, d_conv2, (16, 8, 3, 3), (4, 4), (1, 1), (0, 0))",
                 "torch.nn.functional.max_pool2d(relu1, (2, 2), (2, 2))"):
        assert call in torch_src, call
    assert "einsum" not in torch_src
    for call in ("_conv(x, conv1_weight, (1, 1), (1, 1), conv1_bias)",
                 "conv2 = _dense_conv(pool1, conv2_weight_dense, conv2_bias, (N, 16, 2, 2))",
                 "d_pool1 = (d_conv2.reshape(N, -1) @ conv2_weight_dense).reshape(N, 8, 4, 4)"):
        assert call in numpy_src, call
    # written out once per function, read by both the forward pass and the input gradient
    lag = torch_src[torch_src.index("def loss_and_grad"):]
    lag = lag[:lag.index("\ndef ")]
    assert lag.count("_dense_kernel(") == 1


def test_windows_print_as_strided_views() -> None:
    """A window read that no pass turns into a convolution (an average pool's mean over
    overlapping, padded-free windows) prints as one strided view of the array."""
    import sympy as sp

    from symbackprop.emit.arrays import array_printer
    from symbackprop.ir.nodes import Program, Slide, Window

    program = Program([], {"x": (sp.Symbol("N"), sp.Integer(2), sp.Integer(7))})
    view = Window("x", (None, None, None), (0, 1, Slide(2, 3, 2, 1, 4, 3)), 4)
    assert array_printer("numpy", program).view(view) == (
        "numpy.lib.stride_tricks.sliding_window_view(numpy.pad(x, ((0, 0), (0, 0), (1, 1))), "
        "(3,), axis=(2,))[:, :, ::2]")
    assert array_printer("torch", program).view(view) == (
        "torch.nn.functional.pad(x, (1, 1)).unfold(2, 3, 2)")


def test_derivation_prints_padded_windows_one_based() -> None:
    """0-based x[n, 0, i + a - 1] (padding 1) is x_{n,1,j+p-2} with 1-based j, p: at
    j = p = 1 it reads row -1 (0-based), the padding."""
    from symbackprop.api import derive_document

    text = derive_document(EXAMPLES / "cnn.yaml").render("md")
    assert r"x_{n,1,j + p - 2,k + q - 2}" in text
    assert r"\mathrm{pool1}_{n,l,j + p - 1,k + q - 1}" in text
    assert r"h_{\mathrm{relu1},n,i,2\,(j-1) + l,2\,(k-1) + p}" in text


def test_generated_backward_is_differentiable(tmp_path, conv_kernels) -> None:
    """The torch Model's backward through conv2d / conv2d_weight / conv2d_input and the
    pooling's window-add is itself differentiable: gradgradcheck on a smooth network, and
    a Hessian-vector product of the CNN against torch.nn's."""
    (tmp_path / "c1").mkdir()
    _, modules = build(tmp_path / "c1", CONV1D)
    mod = modules["torch"]
    model = mod.Model(seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 3, 11, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(2, 2, generator=g, dtype=torch.float64).requires_grad_(),
            *model.parameters()]

    def f(*a):
        return mod.LossFunction.apply(*a)[0]

    assert torch.autograd.gradcheck(f, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, args, fast_mode=True)

    (tmp_path / "cnn").mkdir()
    _, cnn = build(tmp_path / "cnn", (EXAMPLES / "cnn.yaml").read_text(encoding="utf-8"))
    model = cnn["torch"].Model(seed=2, dtype=torch.float64)
    twin = Cnn().double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    label = torch.randint(0, 10, (5,), generator=g)
    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64)
         for k, p in model.named_parameters()}

    def hvp(module, loss):
        names, params = zip(*module.named_parameters(), strict=True)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((gi * v[k]).sum() for k, gi in zip(names, grads, strict=True))
        return dict(zip(names, torch.autograd.grad(dot, params), strict=True))

    got, want = hvp(model, model(x=x, label=label)), hvp(twin, twin(x, label))
    for k in want:
        scale = max(float(want[k].abs().max()), 1e-30)
        assert float((got[k] - want[k]).abs().max()) <= 1e-10 * scale, k


def test_null_stride_and_padding_take_their_defaults(tmp_path) -> None:
    """stride: null is the option's default: 1 for a convolution, the kernel for a pool."""
    _, modules = build(tmp_path, """
name: nulls
inputs: {x: [N, 1, 6, 6]}
targets: {t: [N, 2]}
layers:
  - {name: c, type: conv2d, channels: 2, kernel: 3, stride: null, padding: null}
  - {name: p, type: maxpool2d, kernel: 2, stride: null}
  - {name: flat, type: reshape, shape: [N, 8]}
  - {name: out, type: dense, units: 2}
loss: {type: mse, target: t}
""")
    rng = np.random.default_rng(2)
    params = {k: rng.normal(size=v) for k, v in modules["numpy"].PARAM_SHAPES.items()}
    batch = {"x": rng.normal(size=(3, 1, 6, 6)), "t": rng.normal(size=(3, 2))}

    def twin(p, b):
        h = F.max_pool2d(F.conv2d(b["x"], p["c.weight"], p["c.bias"]), 2)
        return F.mse_loss(F.linear(h.reshape(3, 8), p["out.weight"], p["out.bias"]), b["t"])

    _compare(modules, params, batch, twin)


@pytest.mark.parametrize("inside", [True, False], ids=["backward-inside", "backward-outside"])
def test_autocast_bfloat16_cnn_matches_torch_nn(tmp_path, inside, conv_kernels) -> None:
    """Under autocast the convolutions run in bfloat16 (conv2d is on autocast's list) and
    their gradients meet the adjoint's dtype; gradients come back in float32, within
    bfloat16's tolerance of torch.nn under the same autocast."""
    _, modules = build(tmp_path, (EXAMPLES / "cnn.yaml").read_text(encoding="utf-8"))
    mod = modules["torch"]
    model = mod.Model(seed=0)
    twin = Cnn()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=g)
    label = torch.randint(0, 10, (16,), generator=g)
    for m in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x=x, label=label) if m is model else m(x, label)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        scale = float(q.grad.abs().max())
        assert float((p.grad - q.grad).abs().max()) <= 3e-2 * scale, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = mod.loss_and_grad(dict(model.state_dict()), x=x, label=label)
        # the loss in float32, as F.cross_entropy gives it under autocast (nll_loss is
        # on autocast's float32 list; the aten call the module makes is not)
        assert model(x=x, label=label).dtype == twin(x, label).dtype == torch.float32
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in grads.values())


def test_written_out_kernels_survive_inference_mode_and_fake_tensors(tmp_path) -> None:
    """The index tables of a written-out kernel are made once and kept: a first call
    under inference mode or with fake tensors (a trace) must not leave tables that a
    later autograd call cannot save or compute with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, modules = build(tmp_path, (EXAMPLES / "cnn.yaml").read_text(encoding="utf-8"))
    mod = modules["torch"]
    model = mod.Model(seed=0, dtype=torch.float64)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    fake = FakeTensorMode()
    params = {k: fake.from_tensor(v.detach()) for k, v in model.params().items()}
    with fake:
        assert mod.forward(params, x=fake.from_tensor(x)).shape == (3, 10)
    with torch.inference_mode():
        model(x=x)
    twin = Cnn().double()
    twin.load_state_dict(model.state_dict())
    model(x=x).sum().backward()  # autograd through the functional forward
    h = F.max_pool2d(F.relu(twin.conv1(x)), 2)
    twin.fc(F.relu(twin.conv2(h)).reshape(3, 64)).sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-12), name


def test_explain_shows_each_layers_output_shape(tmp_path, capsys) -> None:
    from symbackprop.cli import main

    assert main(["generate", str(EXAMPLES / "cnn.yaml"), "--out", str(tmp_path),
                 "--explain"]) == 0
    out = capsys.readouterr().out
    for line in ("conv1 (conv2d): [N, 8, 8, 8]", "pool1 (maxpool2d): [N, 8, 4, 4]",
                 "conv2 (conv2d): [N, 16, 2, 2]", "flat (reshape): [N, 64]",
                 "fc (dense): [N, 10]"):
        assert f"  {line}\n" in out, line


def _pool_program(values_body: str, *, one_hot: bool = True,
                  slides=((2, 2, 0, 2, 2), (3, 2, 0, 3, 2)), g_places=(0, 1, 2, 4)):
    """x [2, 3, 4, 6] pooled 2x2: arg = its indices, ties = their one-hot laid out as
    [n, c, i, a, j, b], v = values_body (of g read on the positions, ties as they are),
    d = the window-add of v."""
    g6 = View("g", (None,) * 4, g_places, 6)
    ties = View("ties", (None,) * 6, tuple(range(6)), 6)
    syms = {"g": g6.placeholder(), "ties": ties.placeholder()}
    body = sp.sympify(values_body, locals=syms)
    shapes = {"x": (2, 3, 4, 6), "g": (2, 3, 2, 3), "arg": (2, 3, 2, 3),
              "ties": (2, 3, 2, 2, 3, 2), "v": (2, 3, 2, 2, 3, 2), "d": (2, 3, 4, 6)}
    stmts = [
        Assign("top", MaxPool("x", (2, 2), (2, 2)), "the maximum", "forward"),
        Assign("arg", MaxPool("x", (2, 2), (2, 2), indices=True), "where", "forward"),
        Assign("ties", Map(sp.Symbol("ties_body"), ()), "one-hot", "forward"),
        Assign("v", Map(body, ordered({syms["g"]: g6, syms["ties"]: ties})),
               "dL/dx", "backward"),
        Assign("d", WindowAdd("v", shapes["d"], slides), "", "backward"),
    ]
    return stmts, Program(stmts, shapes, one_hots={"ties": "arg"} if one_hot else {})


def test_max_pool_pass_forms_one_scatter_only_for_the_exact_product() -> None:
    stmts, program = _pool_program("g*ties")
    out = max_pool(stmts, program, {"d", "top"})
    assert [s.targets for s in out] == [("top", "arg"), ("d",)]
    # the maxima and their indices from one pooling
    assert out[0].op == MaxPool("x", (2, 2), (2, 2)) and out[0].also == ("arg",)
    assert out[1].op == MaxPoolBackward("g", "arg", (2, 2), (2, 2), (2, 3, 4, 6))
    assert "dL/dx" in out[1].comment
    # not the product of the gradient and the ties alone, not a one-hot, other windows,
    # or the product wanted itself: the window-add stays
    for body, kwargs in (("2*g*ties", {}), ("g*ties", {"one_hot": False}),
                         ("g*ties", {"slides": ((2, 1, 0, 2, 2), (3, 2, 0, 3, 2))})):
        stmts, program = _pool_program(body, **kwargs)
        out = max_pool(stmts, program, {"d", "top"})
        assert any(isinstance(s.op, WindowAdd) for s in out), (body, kwargs)
    stmts, program = _pool_program("g*ties")
    out = max_pool(stmts, program, {"d", "top", "v"})
    assert any(isinstance(s.op, WindowAdd) for s in out)
    # g read on other axes than the windows' positions (here its j on the taps' axis)
    stmts, program = _pool_program("g*ties", g_places=(0, 1, 2, 5))
    assert any(isinstance(s.op, WindowAdd) for s in max_pool(stmts, program, {"d", "top"}))


def test_max_pool_pass_computes_the_indices_once_before_the_values() -> None:
    """Whatever order the lowering wrote them in, the pooling runs once: the indices
    join the maxima's statement, or, where they come first, the maxima are read at
    them."""
    stmts, program = _pool_program("g*ties")
    out = max_pool(stmts, program, {"d", "top"})
    assert [s.targets for s in out] == [("top", "arg"), ("d",)]
    stmts = [stmts[1], stmts[0], *stmts[2:]]  # the indices before the maxima
    out = max_pool(stmts, program, {"d", "top"})
    assert [s.target for s in out] == ["arg", "top", "d"]
    assert out[1].op == TakeAt("x", "arg", 2)


@pytest.mark.parametrize("layers, inputs, target", [
    # a relu between a convolution and an average pooling: the relu's mask was read at
    # the pooling window's tap outside the sum over the taps (a lowering error)
    ("  - {name: conv, type: conv2d, channels: 2, kernel: 1}\n"
     "  - {name: relu, type: activation, activation: relu}\n"
     "  - {name: pool, type: avgpool2d, kernel: 2}",
     "x: [N, 1, 4, 4]", "[N, 2, 2, 2]"),
    ("  - {name: conv, type: conv2d, channels: 3, kernel: 3, padding: 1}\n"
     "  - {name: relu, type: activation, activation: relu}\n"
     "  - {name: pool, type: avgpool2d, kernel: 2, stride: 1}",
     "x: [N, 2, 5, 4]", "[N, 3, 4, 3]"),
    # a relu straight after an embedding (its mask on the table's row, outside the
    # scatter over the ids)
    ("  - {name: wte, type: embedding, num: 4, dim: 2}\n"
     "  - {name: r, type: activation, activation: relu}",
     "idx: {shape: [N, 3], dtype: int64}", "[N, 3, 2]"),
])
def test_a_mask_before_a_window_or_a_scatter(tmp_path, layers, inputs, target) -> None:
    from symbackprop.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: s\ninputs: {{{inputs}}}\ntargets: {{t: {target}}}\nlayers:\n"
                    f"{layers}\nloss: {{type: mse, target: t}}\n")
    assert main(["check", str(spec)]) == 0
