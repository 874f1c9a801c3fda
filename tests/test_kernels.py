"""The generated modules' speed kernels compute exactly what the plain expressions would.

``_matmul_nt``, ``_linear``, ``_log_softmax``, ``_tanh_backward`` and
``_sigmoid_backward`` (numpy) and the aten ``tanh_backward``/``sigmoid_backward`` calls
(torch) replace one-line numpy/torch expressions for speed and memory; here each is
compared with the expression it replaces, on the awkward cases (both BLAS orientations,
mixed dtypes, broadcasting, rows of -inf), and the in-place writes are shown never to
touch the caller's arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from symbackprop.api import compile_spec
from symbackprop.check import load_module

from conftest import EXAMPLES

CLASSIFIER = EXAMPLES / "mlp_classifier.yaml"
SEED = EXAMPLES / "seed_mlp.yaml"


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("kernels")
    out = {}
    for spec in (CLASSIFIER, SEED):
        model = compile_spec(spec)
        for backend in ("numpy", "torch"):
            path = folder / f"{model.spec.name}_{backend}.py"
            path.write_text(model.source(backend), encoding="utf-8")
            out[f"{model.spec.name}_{backend}"] = load_module(path)
    return out


@pytest.mark.parametrize("batch", [1, 3, 40, 300])
def test_matmul_nt_and_linear_match_the_plain_product(modules, batch: int) -> None:
    m = modules["mlp_classifier_numpy"]
    rng = np.random.default_rng(batch)
    a = rng.standard_normal((batch, 64)).astype(np.float32)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    np.testing.assert_allclose(m._matmul_nt(a, w), a @ w.T, rtol=1e-5, atol=1e-5)
    got = m._linear(a, w, b)
    assert got.dtype == np.float32 and got.shape == (batch, 32)
    np.testing.assert_allclose(got, a @ w.T + b, rtol=1e-5, atol=1e-5)
    # A float64 bias outranks a float32 product: promoted, as a @ w.T + b would be.
    b64 = b.astype(np.float64)
    got = m._linear(a, w, b64)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, a @ w.T + b64, rtol=1e-6)


def test_log_softmax_matches_the_difference_and_its_edge_rows(modules) -> None:
    m = modules["mlp_classifier_numpy"]
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0], [-np.inf, 0.0, 1.0],
                  [-np.inf, -np.inf, -np.inf]])
    with np.errstate(invalid="ignore", divide="ignore"):
        want = x - m._logsumexp(x, 1)[:, None]
        got = m._log_softmax(x, 1)
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-15)
    assert np.isnan(got[3]).all() and np.isnan(want[3]).all()


@pytest.mark.parametrize("grad_shape", [(5, 4), (5, 1), (1, 4)])
def test_derivative_kernels_match_their_products(modules, grad_shape) -> None:
    npm = modules["mlp_classifier_numpy"]
    seed = modules["seed_mlp_numpy"]
    rng = np.random.default_rng(0)
    y = np.tanh(rng.standard_normal((5, 4))).astype(np.float32)
    grad = rng.standard_normal(grad_shape)  # float64: the result promotes
    for g in (grad, grad.astype(np.float32)):
        # As the plain expressions compute it: 1 - y**2 in y's dtype, then promoted.
        tanh = npm._tanh_backward(g, y)
        np.testing.assert_allclose(tanh, g * (1 - y ** 2), rtol=1e-6)
        assert tanh.dtype == g.dtype and tanh.shape == (5, 4)
        sig = seed._sigmoid_backward(g, y)
        np.testing.assert_allclose(sig, g * (y * (1 - y)), rtol=1e-6)
        assert sig.dtype == g.dtype and sig.shape == (5, 4)
    y64 = y.astype(np.float64)
    tanh = npm._tanh_backward(grad, y64)
    sig = seed._sigmoid_backward(grad, y64)
    np.testing.assert_allclose(tanh, grad * (1 - y64 ** 2), rtol=1e-13)
    np.testing.assert_allclose(sig, grad * y64 * (1 - y64), rtol=1e-13)
    ty, tg = torch.from_numpy(y64), torch.from_numpy(grad)
    np.testing.assert_allclose(torch.ops.aten.tanh_backward(tg, ty).numpy(), tanh,
                               rtol=1e-12)
    np.testing.assert_allclose(torch.ops.aten.sigmoid_backward(tg, ty).numpy(), sig,
                               rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp_classifier", "seed_mlp"])
def test_in_place_writes_never_touch_the_callers_arrays(modules, name: str) -> None:
    m = modules[f"{name}_numpy"]
    params = m.init_params(0, dtype=np.float32)
    rng = np.random.default_rng(1)
    if name == "mlp_classifier":
        batch = {"x": rng.standard_normal((7, 64)).astype(np.float32),
                 "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 7)]}
    else:
        batch = {"x": rng.standard_normal((7, 2)).astype(np.float32),
                 "t": rng.random((7, 1)).astype(np.float32)}
    before = {k: v.copy() for k, v in {**params, **batch}.items()}
    first = m.loss_and_grad(params, **batch)
    m.forward(params, x=batch["x"])
    m.loss(params, **batch)
    second = m.loss_and_grad(params, **batch)
    for key, value in {**params, **batch}.items():
        assert np.array_equal(value, before[key]), key
    assert first[0] == second[0]
    for key in first[1]:
        assert np.array_equal(first[1][key], second[1][key])


@pytest.fixture(scope="module")
def gpt_torch(tmp_path_factory: pytest.TempPathFactory):
    model = compile_spec(EXAMPLES / "gpt_block.yaml")
    path = tmp_path_factory.mktemp("narrow") / "gpt_block_torch.py"
    path.write_text(model.source("torch"), encoding="utf-8")
    return load_module(path), model.source("torch")


def test_narrow_products_are_printed_through_the_helper_and_wide_ones_as_they_are(
        gpt_torch) -> None:
    """Attention's products with the 8-wide values (forward p @ v and three backward
    products) take _narrow_matmul; q kᵀ (64 wide) and the dense layers stay ``@``."""
    _, source = gpt_torch
    lag = source[source.index("def loss_and_grad("):source.index("def _loss_forward(")]
    assert "attn_y = _narrow_matmul(attn_p, attn_v)" in lag
    assert lag.count("_narrow_matmul(") == 4
    assert "tmp_sum9 = attn_q @ attn_k.transpose(-2, -1)" in lag


@pytest.mark.parametrize("mkl", [True, False])
def test_narrow_matmul_matches_the_plain_product(gpt_torch, monkeypatch, mkl: bool) -> None:
    """Turned round or not, the same numbers as ``a @ b`` (float64, to rounding), in row
    order, for stacks of matrices, transposed views, a stack against a matrix, and a
    matrix product; without MKL it is the plain product."""
    mod, _ = gpt_torch
    monkeypatch.setattr(mod, "_MKL", mkl)
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    p, v = randn(2, 4, 64, 64), randn(2, 4, 64, 8)
    cases = [(p, v), (p.transpose(-2, -1), v),
             (randn(2, 4, 32, 64).transpose(-2, -1), randn(2, 4, 32, 8)),
             (randn(3, 40, 128), randn(128, 4)), (randn(3, 40, 128), randn(4, 128).T),
             (randn(128, 256).T, randn(128, 4)), (randn(96, 40), randn(40, 8))]
    for a, b in cases:
        want, got = a @ b, mod._narrow_matmul(a, b)
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
