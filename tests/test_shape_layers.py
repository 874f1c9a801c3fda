"""reshape, transpose and einsum: multi-head split and merge against a hand-written torch
model, the mixed-radix index calculus, the reshape views lowering prints, and refusals."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch

import symbackprop
from symbackprop.check import call_args, finite_differences, oracle_grads, random_batch
from symbackprop.derive import radix
from symbackprop.derive.calculus import eliminate_deltas
from symbackprop.errors import GraphError
from symbackprop.ir.lower import Lowerer
from symbackprop.ir.nodes import Map, Reshape, Slide, Window
from symbackprop.layers.shape import regroup

from conftest import build, write_spec

SCALE = 8 ** -0.5

# Heads split with reshape + transpose, scores and weighted sum with einsum, heads merged
# back with transpose + reshape. (Softmax is another layer; a sigmoid stands in for it.)
MHA = f"""
name: mha
inputs: {{x: [N, T, 32]}}
targets: {{t: [N, T, 32]}}
layers:
  - {{name: q, type: dense, units: 32, input: x}}
  - {{name: k, type: dense, units: 32, input: x}}
  - {{name: v, type: dense, units: 32, input: x}}
  - {{name: qh, type: reshape, shape: [N, T, 4, 8], input: q}}
  - {{name: kh, type: reshape, shape: [N, T, 4, -1], input: k}}
  - {{name: vh, type: reshape, shape: [N, T, 4, 8], input: v}}
  - {{name: qt, type: transpose, axes: [0, 2, 1, 3], input: qh}}
  - {{name: kt, type: transpose, axes: [0, 2, 1, 3], input: kh}}
  - {{name: vt, type: transpose, axes: [0, 2, 1, 3], input: vh}}
  - {{name: att, type: einsum, input: [qt, kt], equation: "nhtd,nhsd->nhts", scale: {SCALE!r}}}
  - {{name: p, type: activation, activation: sigmoid, input: att}}
  - {{name: y, type: einsum, input: [p, vt], equation: "nhts,nhsd->nhtd"}}
  - {{name: yt, type: transpose, axes: [0, 2, 1, 3], input: y}}
  - {{name: ym, type: reshape, shape: [N, T, 32], input: yt}}
  - {{name: out, type: dense, units: 32, input: ym}}
loss: {{type: mse, target: t}}
"""


def hand_written(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor
                 ) -> torch.Tensor:
    """The same network in plain torch: view / permute / einsum / matmul."""
    n, s, c = x.shape

    def linear(name: str, a: torch.Tensor) -> torch.Tensor:
        return a @ params[f"{name}.weight"].T + params[f"{name}.bias"]

    def heads(a: torch.Tensor) -> torch.Tensor:
        return a.view(n, s, 4, 8).permute(0, 2, 1, 3)

    q, k, v = (heads(linear(name, x)) for name in ("q", "k", "v"))
    scores = torch.einsum("nhtd,nhsd->nhts", q, k) * SCALE
    y = torch.sigmoid(scores) @ v
    merged = y.permute(0, 2, 1, 3).contiguous().view(n, s, c)
    return ((linear("out", merged) - t) ** 2).mean()


def _reference(params: dict[str, np.ndarray], batch: dict[str, np.ndarray]
               ) -> tuple[float, dict[str, np.ndarray]]:
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    loss = hand_written(tp, torch.tensor(batch["x"]), torch.tensor(batch["t"]))
    grads = torch.autograd.grad(loss, list(tp.values()))
    return float(loss.detach()), {k: g.numpy() for k, g in zip(tp, grads, strict=True)}


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


@pytest.fixture(scope="module")
def mha(tmp_path_factory: pytest.TempPathFactory):
    return build(tmp_path_factory.mktemp("mha"), MHA)


def _batch(n: int = 3, s: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, s, 32)), "t": rng.normal(size=(n, s, 32))}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_multihead_loss_and_grad_match_hand_written_torch(mha, backend: str) -> None:
    _, modules = mha
    params = modules["numpy"].init_params(1)
    batch = _batch()
    ref_loss, ref = _reference(params, batch)
    if backend == "torch":
        loss, grads = modules["torch"].loss_and_grad(
            {k: torch.from_numpy(v) for k, v in params.items()},
            **{k: torch.from_numpy(v) for k, v in batch.items()})
        loss, grads = float(loss), {k: g.numpy() for k, g in grads.items()}
    else:
        loss, grads = modules["numpy"].loss_and_grad(params, **batch)
    assert abs(float(loss) - ref_loss) <= 1e-9 * abs(ref_loss)
    assert set(grads) == set(ref) == set(params)
    for name in ref:
        assert _rel(grads[name], ref[name]) <= 1e-9, name


def test_multihead_model_backward_matches_hand_written_torch(mha) -> None:
    _, modules = mha
    net = modules["torch"].Model(seed=2, dtype=torch.float64)
    params = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    batch = _batch(2, 4, seed=1)
    loss = net.loss(**{k: torch.from_numpy(v) for k, v in batch.items()})
    loss.backward()
    ref_loss, ref = _reference(params, batch)
    assert abs(float(loss.detach()) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name, param in net.named_parameters():
        assert _rel(param.grad.numpy(), ref[name]) <= 1e-9, name
    # the oracle built from the spec by the layers' own references agrees too
    oracle_loss, oracle = oracle_grads(mha[0].spec, params, batch, list(params))
    assert abs(oracle_loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert all(_rel(oracle[k], ref[k]) <= 1e-12 for k in ref)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_multihead_finite_differences(mha, backend: str) -> None:
    model, modules = mha
    module = modules[backend]
    params = modules["numpy"].init_params(0)
    batch = random_batch(model, batch=2)
    wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
    to_numpy = (lambda a: a.detach().numpy()) if backend == "torch" else np.asarray
    errors = finite_differences(module, params, batch, wrap=wrap, to_numpy=to_numpy)
    assert set(errors) == set(params)
    for name, (_, rel) in errors.items():
        assert rel <= 1e-6, (name, rel)


def test_generated_code_uses_views_not_loops(mha) -> None:
    model, _ = mha
    numpy_src, torch_src = model.source("numpy"), model.source("torch")
    for src, permute, functions in (
            (numpy_src, ".transpose(0, 2, 1, 3)", ("loss_and_grad",)),
            (torch_src, ".permute(0, 2, 1, 3)", ("_loss_forward", "_loss_backward"))):
        assert "qh = q.reshape(N, T, 4, 8)" in src
        assert "ym = yt.reshape(N, T, 32)" in src
        assert "d_v = d_vh.reshape(N, T, 32)" in src  # the adjoint of a split is a merge
        assert "d_yt = d_ym.reshape(N, T, 4, 8)" in src
        assert f"qt = qh{permute}" in src
        body = "".join(src.split(f"def {f}(")[1].split("\ndef ")[0] for f in functions)
        code = "\n".join(line for line in body.splitlines()
                         if not line.lstrip().startswith(("#", "'", '"')))
        assert re.search(r"einsum\(|tensordot\(| @ ", code)  # contractions, not loops
        assert not re.search(r"^\s+(for|while)\b", code, re.M)  # no loop statement
        for banned in ("eye(", "kron", "KroneckerDelta", "floor", "Mod(", "%", "//"):
            assert banned not in code, banned
    # No array bigger than the score tensor [N, H, T, T] or the activations [N, T, 32]:
    # no dense Jacobian or identity ever materialises.
    program = Lowerer(model.derivation, seed_argument=False).lower()
    assert max(len(shape) for shape in program.shapes.values()) <= 4
    reshapes = [s for s in program.stmts if isinstance(s.op, Map)
                and any(isinstance(v, Reshape) for _, v in s.op.views)]
    assert {s.target for s in reshapes} == {"qh", "kh", "vh", "ym", "d_q", "d_k", "d_v",
                                             "d_yt"}


def test_multihead_generation_and_derivation_render(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, MHA)
    doc = symbackprop.derive(spec)
    tex = doc.tex()
    # reshape indices in the derivation's 1-based notation
    assert r"8\,(i-1) + j" in tex
    assert r"\left\lfloor (i-1)/8 \right\rfloor + 1,(i-1) \bmod 8 + 1" in tex
    assert "Mod" not in tex and "floor{" not in tex
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed")
    (tmp_path / "doc.tex").write_text(tex)
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                          "-no-shell-escape", "doc.tex"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]


# -- more shapes, through the generated modules and the spec-built oracle -------------------

FLATTEN = """
name: flat
inputs: {x: [N, T, 6]}
targets: {t: [N, T, 3]}
layers:
  - {name: h, type: dense, units: 6, activation: tanh}
  - {name: rows, type: reshape, shape: [-1, 6]}
  - {name: g, type: dense, units: 3}
  - {name: back, type: reshape, shape: [N, T, 3]}
  - {name: pair, type: reshape, shape: [N, -1, 2, 3], input: h}
  - {name: sw, type: transpose, axes: [3, 1, 0, 2]}
  - {name: sq, type: einsum, input: [sw, sw, back], equation: "ctnk,ctnk,ntc->ntc"}
loss: {type: mse, target: t}
"""


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_flatten_and_repeated_einsum_operand_against_oracle(tmp_build, backend: str) -> None:
    model, modules = tmp_build(FLATTEN)
    assert model.derivation.graph.nodes["rows"].shape == (
        sp.Symbol("N", integer=True, positive=True) * sp.Symbol("T", integer=True,
                                                                 positive=True), 6)
    module = modules[backend]
    params = modules["numpy"].init_params(0)
    batch = random_batch(model, batch=3)
    wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
    to_numpy = (lambda a: a.detach().numpy()) if backend == "torch" else np.asarray
    ref_loss, ref = oracle_grads(model.spec, params, batch, list(module.TRAINABLE))
    loss, grads = module.loss_and_grad({k: wrap(v) for k, v in params.items()},
                                       **{k: wrap(v) for k, v in
                                          call_args(module, batch).items()})
    assert abs(float(to_numpy(loss)) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name in ref:
        assert _rel(np.asarray(to_numpy(grads[name])), ref[name]) <= 1e-9, name
    errors = finite_differences(module, params, batch, wrap=wrap, to_numpy=to_numpy)
    assert all(rel <= 1e-6 for _, rel in errors.values()), errors


# -- the index calculus -----------------------------------------------------------------------

i0, i1, i2, i3 = (sp.Symbol(f"i{k}", integer=True) for k in range(4))
k0, k1, k2 = (sp.Symbol(f"k{k}", integer=True) for k in range(3))
N = sp.Symbol("N", integer=True, positive=True)
T = sp.Symbol("T", integer=True, positive=True)
g = sp.IndexedBase("g", real=True)
x = sp.IndexedBase("x", real=True)


def test_regroup_splits_and_merges_row_major() -> None:
    assert regroup((N, T, sp.Integer(32)), (N, T, sp.Integer(4), sp.Integer(8))) == [
        i0, i1, 8 * i2 + i3]
    assert regroup((N, T, sp.Integer(4), sp.Integer(8)), (N, T, sp.Integer(32))) == [
        i0, i1, sp.floor(i2 / 8), sp.Mod(i2, 8)]
    assert regroup((N, T, sp.Integer(6)), (N * T, sp.Integer(6))) == [
        sp.floor(i0 / T), sp.Mod(i0, T), i1]
    # [N, 6, 4] -> [N, 2, 12]: axis 1 of the input straddles both output axes
    assert regroup((N, sp.Integer(6), sp.Integer(4)), (N, sp.Integer(2), sp.Integer(12))) \
        == [i0, 3 * i1 + sp.floor(i2 / 4), sp.Mod(i2, 4)]
    assert regroup((sp.Integer(6), sp.Integer(4)), (sp.Integer(4), sp.Integer(6))) is None


def test_split_delta_sums_out_to_a_merge_and_back() -> None:
    split = sp.Sum(g[i0, i2, i3] * sp.KroneckerDelta(8 * i2 + i3, k2), (i2, 0, 3), (i3, 0, 7))
    assert eliminate_deltas(split) == g[i0, sp.floor(k2 / 8), sp.Mod(k2, 8)]
    merge = sp.Sum(g[i2] * sp.KroneckerDelta(sp.floor(i2 / 8), k1)
                   * sp.KroneckerDelta(sp.Mod(i2, 8), k2), (i2, 0, 31))
    assert eliminate_deltas(merge) == g[8 * k1 + k2]
    symbolic = sp.Sum(g[i0, i1] * sp.KroneckerDelta(T * i0 + i1, k0), (i0, 0, N - 1),
                      (i1, 0, T - 1))
    assert eliminate_deltas(symbolic) == g[sp.floor(k0 / T), sp.Mod(k0, T)]


def test_deltas_that_are_no_regrouping_stay() -> None:
    # a stride (2*i2) or a window (i2 + i3) pins no digits: the sum stays as it is
    for index in (2 * i2, i2 + i3, i2 + 1):
        expr = sp.Sum(g[i2, i3] * sp.KroneckerDelta(index, k0), (i2, 0, 3), (i3, 0, 3))
        assert eliminate_deltas(expr).has(sp.KroneckerDelta)
    # one digit of i2 pinned twice (a diagonal) is not eliminated either
    twice = sp.Mul(sp.KroneckerDelta(sp.floor(i2 / 4), k0), sp.KroneckerDelta(
        sp.floor(i2 / 4), k1), sp.KroneckerDelta(sp.Mod(i2, 4), k2))
    assert radix.solve_deltas(twice * g[i2], {i2: sp.Integer(16)}, [i2]) is None


def test_lowering_turns_digit_indices_into_one_reshape_view() -> None:
    lowerer = Lowerer.__new__(Lowerer)
    lowerer.shapes = {"x": (N, sp.Integer(32)), "g": (N, sp.Integer(4), sp.Integer(3),
                                                      sp.Integer(8))}
    view = lowerer.view(x[i0, 8 * i2 + i3], (i0, i2, i3), {i0: N, i2: sp.Integer(4),
                                                            i3: sp.Integer(8)})
    assert view == Reshape("x", (None, None), (N, sp.Integer(4), sp.Integer(8)), (0, 1, 2),
                           (N, sp.Integer(4), sp.Integer(8)), (0, 1, 2), 3)
    # g[k0, floor(k2/8), k1, Mod(k2, 8)]: permute then merge
    view = lowerer.view(g[k0, sp.floor(k2 / 8), k1, sp.Mod(k2, 8)], (k0, k1, k2),
                        {k0: N, k1: sp.Integer(3), k2: sp.Integer(32)})
    assert view.perm == (0, 2, 1, 3) and view.shape == (N, 3, 32)


@pytest.mark.parametrize("index", [i0 + 1, 2 * i0 + 2 * i1, i0 * i1, i0 - i1],
                         ids=["offset", "two-strides", "product", "negative"])
def test_affine_maps_the_ir_cannot_express_are_refused(index: sp.Expr) -> None:
    lowerer = Lowerer.__new__(Lowerer)
    lowerer.shapes = {"x": (sp.Integer(16),)}
    with pytest.raises(GraphError, match="not a regrouping of the axes"):
        lowerer.view(x[index], (i0, i1), {i0: sp.Integer(4), i1: sp.Integer(3)})


@pytest.mark.parametrize("index,slide", [
    (2 * i0, Slide(0, -1, 2, 0, 4, 1)),
    (i0 + i1, Slide(0, 1, 1, 0, 4, 3)),
    (4 * i0 + i1 - 1, Slide(0, 1, 4, 1, 4, 3)),
], ids=["strided", "window", "padded"])
def test_strided_and_padded_windows_are_window_views(index: sp.Expr, slide: Slide) -> None:
    lowerer = Lowerer.__new__(Lowerer)
    lowerer.shapes = {"x": (sp.Integer(16),)}
    view = lowerer.view(x[index], (i0, i1), {i0: sp.Integer(4), i1: sp.Integer(3)})
    assert view == Window("x", (None,), (slide,), 2)


def test_a_partly_read_axis_is_refused() -> None:
    lowerer = Lowerer.__new__(Lowerer)
    lowerer.shapes = {"x": (sp.Integer(4),)}
    with pytest.raises(GraphError, match="in part"):
        lowerer.view(x[sp.floor(i0 / 8)], (i0,), {i0: sp.Integer(32)})


def test_reshape_of_equal_counts_only_when_provable(tmp_build) -> None:
    ok = """
    name: m
    inputs: {x: [N, T, 4]}
    targets: {t: [N, T, 4]}
    layers:
      - {name: r, type: reshape, shape: [N, -1]}
      - {name: back, type: reshape, shape: [N, T, 4]}
      - {name: d, type: dense, units: 4}
    loss: {type: mse, target: t}
    """
    model, _ = tmp_build(ok)
    assert model.derivation.graph.nodes["r"].shape == (N, 4 * T)


ALIAS = """
name: alias
inputs: {x: [N, 3]}
targets: {t: [N, 2, 3]}
layers:
  - {name: h, type: dense, units: 6}
  - {name: r, type: reshape, shape: [N, 2, 3], input: h}
  - {name: e, type: activation, activation: tanh, input: h}
  - {name: s, type: einsum, input: [r, e], equation: "nij,nk->nij"}
loss: {type: mse, target: t}
"""


def test_a_view_and_its_source_never_take_a_result_in_place(tmp_build) -> None:
    """r = h.reshape(...) shares h's memory: tanh(h, out=h) would change r too."""
    model, modules = tmp_build(ALIAS)
    assert "r = h.reshape(N, 2, 3)" in model.source("numpy")
    assert "out=h)" not in model.source("numpy")
    params = modules["numpy"].init_params(0)
    batch = random_batch(model, batch=3)
    ref_loss, ref = oracle_grads(model.spec, params, batch, list(params))
    for backend in ("numpy", "torch"):
        module = modules[backend]
        wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
        loss, grads = module.loss_and_grad({k: wrap(v) for k, v in params.items()},
                                           **{k: wrap(v) for k, v in batch.items()})
        assert abs(float(loss) - ref_loss) <= 1e-9 * abs(ref_loss)
        for name in ref:
            assert _rel(np.asarray(grads[name]), ref[name]) <= 1e-9, name
        predicted = module.forward({k: wrap(v) for k, v in params.items()},
                                   x=wrap(batch["x"]))
        want = torch.einsum("nij,nk->nij", *_alias_reference(params, batch["x"]))
        assert _rel(np.asarray(predicted), want.numpy()) <= 1e-12


def _alias_reference(params: dict[str, np.ndarray], x: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.from_numpy(x) @ torch.from_numpy(params["h.weight"]).T \
        + torch.from_numpy(params["h.bias"])
    return h.reshape(-1, 2, 3), torch.tanh(h)


def test_batched_products_print_as_matmul_in_numpy(mha) -> None:
    """numpy.einsum runs a product with batch axes without BLAS; matmul over the stack
    does not (the scores q kᵀ and the weighted sum p v, and their adjoints)."""
    model, _ = mha
    src = model.source("numpy")
    assert "tmp_sum4 = qt @ kt.swapaxes(-1, -2)" in src
    assert "y = p @ vt" in src
    # what is left: the weights' gradients, summed over batch and time: one matrix
    # product each of the arrays with batch and time merged (no einsum, no tensordot)
    assert "numpy.einsum(" not in src and "numpy.tensordot(" not in src
    assert "d_q_weight = d_q.reshape(-1, d_q.shape[-1]).T @ x.reshape(-1, x.shape[-1])" in src


@pytest.mark.parametrize(("subscripts", "found"), [
    ("abcd,abde->abce", (False, False, False)),
    ("abcd,abed->abce", (False, False, True)),
    ("abcd,abce->abde", (False, True, False)),
    ("abcd,abed->abec", (True, False, True)),
    ("abcd,abde->abec", (True, True, True)),
    ("abc,abd->cd", None),           # batch axes summed: not one product per batch
    ("abcd,abcd->abcd", None),       # nothing summed
    ("abcd,acde->abce", None),       # batch axes differ
    ("ab,bc->ac", None),             # a plain matrix product is MatMul's
])
def test_batched_matmul_spelling(subscripts: str, found: tuple | None) -> None:
    from symbackprop.emit.arrays import batched_matmul

    assert batched_matmul(subscripts) == found
    if found is None:
        return
    # the spelling computes what einsum does
    rng = np.random.default_rng(0)
    x, y = subscripts.split("->")[0].split(",")
    size = dict(zip("abcde", (2, 3, 4, 5, 6), strict=True))
    a, b = (rng.normal(size=[size[c] for c in s]) for s in (x, y))
    swap, ta, tb = found
    p, q = (b, a) if swap else (a, b)
    got = (p.swapaxes(-1, -2) if ta else p) @ (q.swapaxes(-1, -2) if tb else q)
    assert np.allclose(got, np.einsum(subscripts, a, b))


@pytest.mark.parametrize(("subscripts", "code"), [
    ("abc,dc->abd", "A @ B.T"),              # an array against a matrix: x @ W.T
    ("abc,cd->abd", "A @ B"),
    ("dc,abc->abd", "B @ A.T"),              # the operands the other way round
    ("abc,abd->cd", "flat2(A).T @ flat2(B)"),  # summed over batch and time: a weight's
    ("ac,ad->cd", "A.T @ B"),                  # gradient
    ("abc,abd->dc", None),                   # the result transposed
    ("abc,dc->adb", None),                   # the kept axes reordered
    ("abc,acd->abd", None),                  # a batch axis: batched_matmul's
    ("abc,abc->c", None),                    # nothing left of one operand
])
def test_matrix_product_spelling(subscripts: str, code: str | None) -> None:
    """Two-array products that are one matrix product print as @ (tensordot's Python
    permutes around the same product), anything else as before."""
    from symbackprop.emit.arrays import matrix_product

    got = matrix_product(subscripts, ("A", "B"), lambda c, k: c if k == 1 else f"flat{k}({c})")
    assert got == code
    if code is None:
        return
    a, b = subscripts.split("->")[0].split(",")
    shapes = {"a": 2, "b": 3, "c": 4, "d": 5}
    A = np.random.default_rng(0).normal(size=[shapes[x] for x in a])
    B = np.random.default_rng(1).normal(size=[shapes[x] for x in b])
    env = {"A": A, "B": B, "flat2": lambda v: v.reshape(-1, v.shape[-1])}
    assert np.allclose(eval(got, env), np.einsum(subscripts, A, B))  # noqa: S307 - ours


def test_a_one_feature_attention_reshapes_through_an_empty_shape(tmp_path) -> None:
    """C = 1 (one head of one feature): c_proj's weight is [1, 1], read as a [1, 1, 1]
    array through the empty shape (), which both modules printed as .reshape() (an
    error)."""
    from symbackprop.cli import main

    spec = tmp_path / "c1.yaml"
    spec.write_text("name: c1\ninputs: {x: [N, 3, 1]}\ntargets: {t: [N, 3, 1]}\nlayers:\n"
                    "  - {name: attn, type: attention, heads: 1}\n"
                    "loss: {type: mse, target: t}\n")
    assert main(["check", str(spec)]) == 0
