"""The compiler's machinery on its own: delta elimination, the contraction-order choice,
lowering into the array IR, each IR pass, and the known-forms table.

The end-to-end case is a LoRA-style layer whose body nests two contractions
(z = x Wᵀ + s·(x Aᵀ) Bᵀ): it must lower into matrix products of two arrays each, in the
cheap order, and pass finite differences and the torch oracle in numpy, torch
``loss_and_grad`` and torch ``Model.loss().backward()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import sympy as sp
import torch

from symbackprop import naming
from symbackprop.api import compile_text
from symbackprop.check import call_args, finite_differences, oracle_grads, random_batch
from symbackprop.derive.calculus import KnownForms, eliminate_deltas, vjp
from symbackprop.errors import GraphError
from symbackprop.graph import Graph, Node, out_index, ref, sum_index, target_index
from symbackprop.ir import contract, passes
from symbackprop.ir.lower import Lowerer
from symbackprop.ir.nodes import (
    Assign,
    Linear,
    LogSoftmax,
    Map,
    MatMul,
    Program,
    Reduce,
    View,
    ordered,
)
from symbackprop.ir.passes.kernels import ReluBackward, SigmoidBackward, TanhBackward
from symbackprop.layers import LAYERS, Layer, Option, Param
from symbackprop.layers.core import feature_size
from symbackprop.spec import LayerSpec

i0, i1, k0, k1 = out_index(0), out_index(1), target_index(0), target_index(1)
s0, s1 = sum_index(0), sum_index(1)
N = sp.Symbol("N", integer=True, positive=True)


# -- delta elimination ---------------------------------------------------------------------
def test_delta_over_a_summed_index_substitutes_it() -> None:
    g = sp.IndexedBase("g", real=True)
    expr = sp.Sum(g[i0] * sp.KroneckerDelta(i0, k0), (i0, 0, 4))
    assert eliminate_deltas(expr) == g[k0]


def test_dense_weight_vjp_is_a_sum_over_the_batch() -> None:
    graph = Graph("t")
    x = graph.add(Node("x", (N, sp.Integer(3)), "input", "x", None))  # type: ignore[arg-type]
    w = graph.add(Node("w", (sp.Integer(2), sp.Integer(3)), "param", "d", None))  # type: ignore[arg-type]
    body = sp.Sum(x.element((i0, s0)) * w.element((i1, s0)), (s0, 0, 2))
    z = graph.op("z", (N, sp.Integer(2)), body, layer="d", where=None)  # type: ignore[arg-type]
    got = vjp(z, w, "g")
    assert got == sp.Sum(ref("g", (i0, k0)) * ref("x", (i0, k1)), (i0, 0, N - 1))


def test_product_rule_keeps_deltas_shared_by_all_terms() -> None:
    """d/dx[k] of x[i]**2 * y[i] summed over i: both factors' deltas fold to one term."""
    x, y = sp.IndexedBase("x", real=True), sp.IndexedBase("y", real=True)
    body = sp.Sum(x[s0] ** 2 * y[s0], (s0, 0, 4))
    derivative = eliminate_deltas(sp.diff(body, x[k0]))
    assert sp.simplify(derivative - 2 * x[k0] * y[k0]) == 0


def test_constant_index_delta_is_one() -> None:
    """A broadcast axis (index 0) pins the target index: delta(0, k) = 1."""
    b, g = sp.IndexedBase("b", real=True), sp.IndexedBase("g", real=True)
    expr = sp.Sum(g[i0, i1] * sp.diff(b[0, i1], b[k0, k1]), (i0, 0, 3), (i1, 0, 2))
    assert eliminate_deltas(expr) == sp.Sum(g[i0, k1], (i0, 0, 3))


# -- contraction order ---------------------------------------------------------------------
def test_matrix_chain_order_is_the_cheap_one() -> None:
    a, b, c, d = sp.symbols("a b c d", integer=True)
    ext = {a: sp.Integer(10), b: sp.Integer(30), c: sp.Integer(5), d: sp.Integer(60)}
    steps = contract.plan([(a, b), (b, c), (c, d)], (a, d), ext)
    # (AB)C costs 10*30*5 + 10*5*60 = 4500; A(BC) costs 30*5*60 + 10*30*60 = 27000
    assert (steps[0].left, steps[0].right) == (0, 1)
    assert contract.cost([(a, b), (b, c), (c, d)], (a, d), ext, steps) == 4500


def test_lora_chain_never_pairs_x_with_b_first() -> None:
    n, i, r, o = sp.symbols("n i r o", integer=True)
    ext = {n: N, i: sp.Integer(64), r: sp.Integer(4), o: sp.Integer(64)}
    operands = [(n, i), (r, i), (o, r)]  # x, A, B
    steps = contract.plan(operands, (n, o), ext)
    first = {steps[0].left, steps[0].right}
    assert first == {0, 1}, "x Aᵀ first: N·I·R + N·R·O beats building B A (O·I·R + N·I·O)"
    assert steps[0].indices == (n, r)


# -- lowering --------------------------------------------------------------------------------
def _program(text: str, *, seed_argument: bool = False) -> tuple[Any, Program]:
    model = compile_text(text)
    return model, Lowerer(model.derivation, seed_argument=seed_argument).lower()


MLP = """
name: m
inputs: {x: [N, 3]}
targets: {t: [N, 2]}
layers:
  - {name: h, type: dense, units: 4, activation: tanh}
  - {name: out, type: dense, units: 2}
loss: {type: softmax_cross_entropy, target: t}
"""


def test_lowering_holds_no_printed_text() -> None:
    _, program = _program(MLP)
    for stmt in program.stmts:
        for value in vars(stmt.op).values():
            assert not (isinstance(value, str) and ("@" in value or "(" in value)), stmt


def test_views_line_up_axes() -> None:
    lowerer = Lowerer.__new__(Lowerer)
    lse, w = sp.IndexedBase("lse", real=True), sp.IndexedBase("w", real=True)
    assert lowerer.view(lse[i0], (i0, i1)) == View("lse", (None,), (0,), 2)
    assert lowerer.view(w[i1, i0], (i0, i1)) == View("w", (None, None), (1, 0), 2)
    assert lowerer.view(w[0, i1], (i0, i1)) == View("w", (0, None), (1,), 2)
    with pytest.raises(GraphError, match="affine"):
        lowerer.view(w[2 * i0 + i1, i1], (i0, i1))


def test_the_full_pipeline_finds_each_pattern_once() -> None:
    model, program = _program(MLP)
    grads = list(model.derivation.grads.values())
    stmts = passes.function(program, ["loss", *grads])
    ops = [type(s.op) for s in stmts]
    assert ops.count(LogSoftmax) == 1           # lse + subtract -> log_softmax
    assert ops.count(Linear) == 2               # both dense layers: product + bias
    assert any(isinstance(s.op, Map) and s.op.body.has(TanhBackward) for s in stmts)
    assert not any(isinstance(s.op, Reduce) and s.op.kind == "logsumexp" for s in stmts)


# -- passes on hand-built programs ---------------------------------------------------------
def _view(src: str, rank: int) -> View:
    return View(src, (None,) * rank, tuple(range(rank)), rank)


def _map(body: sp.Expr, *srcs: tuple[str, int]) -> Map:
    return Map(body, ordered({_view(s, r).placeholder(): _view(s, r) for s, r in srcs}))


def _prog(stmts: list[Assign], shapes: Mapping[str, tuple]) -> Program:
    return Program(stmts, dict(shapes))


X, Y, T1, Z = (sp.Symbol(n) for n in ("x", "y", "tmp1", "z"))
SH = {n: (N, sp.Integer(3)) for n in ("x", "y", "tmp1", "z", "tmp2")}


def test_fuse_substitutes_a_single_use_temporary() -> None:
    stmts = [Assign("tmp1", _map(sp.exp(X), ("x", 2))),
             Assign("z", _map(T1 * X, ("tmp1", 2), ("x", 2)))]
    out = passes.fuse(stmts, _prog(stmts, SH), {"z"})
    assert [s.target for s in out] == ["z"]
    assert out[0].op.body == X * sp.exp(X)


def test_fuse_keeps_a_temporary_read_twice_or_protected() -> None:
    stmts = [Assign("tmp1", _map(sp.exp(X), ("x", 2))),
             Assign("z", _map(T1 * sp.sin(T1), ("tmp1", 2)))]
    assert len(passes.fuse(stmts, _prog(stmts, SH), {"z"})) == 2
    assert len(passes.fuse(stmts[:1], _prog(stmts, SH), {"tmp1"})) == 1


def test_cse_shares_a_subexpression_across_statements() -> None:
    stmts = [Assign("y", _map(sp.exp(X) + 1, ("x", 2))),
             Assign("z", _map(sp.exp(X) * 2, ("x", 2)))]
    out = passes.cse(stmts, _prog(stmts, SH))
    assert len(out) == 3 and out[0].target.startswith("tmp")
    assert out[0].op.body == sp.exp(X)


def test_cse_puts_size_only_subexpressions_back() -> None:
    stmts = [Assign("y", _map(sp.exp(X) / (N + 1), ("x", 2))),
             Assign("z", _map(sp.sin(Y) / (N + 1), ("y", 2)))]
    assert sp.cse([s.op.body for s in stmts])[0], "sympy finds 1/(N + 1) shared"
    out = passes.cse(stmts, _prog(stmts, SH))
    assert [s.target for s in out] == ["y", "z"]
    assert out[0].op.body == sp.exp(X) / (N + 1)


def test_cse_puts_back_negations_and_what_they_negate_together() -> None:
    """A negated array (-x) is put back into its readers, and a negation of a put-back
    scalar (-1/N) comes back whole: no reader is left with a temporary nobody defines,
    and no array is computed only to be negated."""
    stmts = [Assign("y", _map(X / N, ("x", 2))),
             Assign("z", _map(Y - 1 / N, ("y", 2))),
             Assign("tmp2", _map(-X + 1 / N, ("x", 2)))]
    out = passes.cse(stmts, _prog(stmts, SH))
    assert [s.target for s in out] == ["y", "z", "tmp2"]
    assert [s.op.body for s in out] == [X / N, Y - 1 / N, -X + 1 / N]
    stmts = [Assign("y", _map(-sp.exp(X) * Z, ("x", 2), ("z", 2))),
             Assign("tmp2", _map(sp.sin(-sp.exp(X)), ("x", 2)))]
    out = passes.cse(stmts, _prog(stmts, SH))
    defined = {s.target for s in out}
    for s in out:  # exp(x) is shared; -exp(x) is not an array of its own
        assert not any(str(f).startswith("tmp") and str(f) not in defined
                       for f in s.op.body.free_symbols)
    shared = [s.op.body for s in out if s.target not in ("y", "tmp2")]
    assert shared == [sp.exp(X)]


def test_cse_shares_nothing_out_of_a_where_branch() -> None:
    """log(x) + 1 under x > 0 is never hoisted into a temporary computed for every entry
    (numpy would warn for the discarded ones); nested where()s come back whole."""
    branch = sp.Piecewise((sp.log(X) + 1, X > 0), (X, True))
    nested = sp.Piecewise((3 * branch, Y > 0), (0, True))
    stmts = [Assign("y", _map(branch, ("x", 2))),
             Assign("z", _map(Y * sp.Piecewise((sp.log(X) + 1, X > 0), (2 * X, True)),
                              ("x", 2), ("y", 2))),
             Assign("tmp2", _map(nested, ("x", 2), ("y", 2)))]
    out = passes.cse(stmts, _prog(stmts, SH))
    temps = {s.target: s.op.body for s in out if s.target not in ("y", "z", "tmp2")}
    assert not any(b.has(sp.log) for b in temps.values())
    bodies = {s.target: s.op.body.xreplace({sp.Symbol(k): v for k, v in temps.items()})
              for s in out}
    assert bodies["y"] == branch and bodies["tmp2"] == nested
    assert not any(str(sym).startswith("<") for b in bodies.values() for sym in b.free_symbols)


def test_linear_takes_product_plus_bias() -> None:
    b = View("b", (None,), (1,), 2)
    stmts = [Assign("tmp1", MatMul("x", "w", tb=True)),
             Assign("z", Map(T1 + b.placeholder(), ((b.placeholder(), b),
                                                     (T1, _view("tmp1", 2)))))]
    out = passes.linear(stmts, _prog(stmts, SH), {"z"})
    assert len(out) == 1 and out[0].op == Linear(MatMul("x", "w", tb=True), b)


def test_linear_takes_rows_of_a_stack_times_w_t_plus_a_vector_only() -> None:
    """[N, T, C] @ W.T + b is one torch linear() call; a bias that is not a vector along
    the last axis (another [N, T, out] array, a vector along the middle axis) or a
    product that is not against W.T stays a product and an add (linear() has no such
    form)."""
    product = MatMul("x", "w", tb=True, a_rank=3)
    shapes = {**SH, "x": (N, 4, 3), "tmp1": (N, 4, 3), "z": (N, 4, 3), "c": (N, 4, 3)}

    def plus(bias: View, op: MatMul = product) -> list[Assign]:
        return [Assign("tmp1", op),
                Assign("z", Map(T1 + bias.placeholder(), ((bias.placeholder(), bias),
                                                          (T1, _view("tmp1", 3)))))]

    vector = View("b", (None,), (2,), 3)
    out = passes.linear(plus(vector), _prog(plus(vector), shapes), {"z"})
    assert len(out) == 1 and out[0].op == Linear(product, vector)
    for bias, op in ((_view("c", 3), product), (View("b", (None,), (1,), 3), product),
                     (vector, MatMul("x", "w", a_rank=3))):
        stmts = plus(bias, op)
        assert len(passes.linear(stmts, _prog(stmts, shapes), {"z"})) == 2


def test_linear_leaves_a_product_read_elsewhere() -> None:
    b = View("b", (None,), (1,), 2)
    stmts = [Assign("tmp1", MatMul("x", "w", tb=True)),
             Assign("z", Map(T1 + b.placeholder(), ((b.placeholder(), b),
                                                     (T1, _view("tmp1", 2))))),
             Assign("y", _map(T1 * 2, ("tmp1", 2)))]
    assert len(passes.linear(stmts, _prog(stmts, SH), {"z", "y"})) == 3


def test_log_softmax_replaces_lse_and_subtract() -> None:
    lse = View("lse", (None,), (0,), 2)
    stmts = [Assign("lse", Reduce("logsumexp", X, ((X, _view("x", 2)),), (1,), 2)),
             Assign("z", Map(X - lse.placeholder(), ((X, _view("x", 2)),
                                                     (lse.placeholder(), lse))))]
    out = passes.log_softmax(stmts, _prog(stmts, {**SH, "lse": (N,)}), {"z"})
    assert [s.op for s in out] == [LogSoftmax("x", 1)]


def test_kernels_recognise_tanh_and_sigmoid_backward() -> None:
    stmts = [Assign("z", _map(X * (1 - Y**2), ("x", 2), ("y", 2))),
             Assign("tmp2", _map(3 * X * Y * (1 - Y), ("x", 2), ("y", 2)))]
    out = passes.kernels(stmts, _prog(stmts, SH))
    assert out[0].op.body == TanhBackward(X, Y)
    assert out[1].op.body == 3 * SigmoidBackward(X, Y)


def test_kernels_recognise_relu_backward_and_drop_its_mask() -> None:
    """mask = x > 0; relu = where(mask, x, 0); dx = where(mask, g, 0): the backward is one
    relu_backward(g, x), the forward relu compares inline, and the mask is gone."""
    G = sp.Symbol("g")
    M = _view("mask", 2).placeholder()
    stmts = [Assign("mask", Map(sp.StrictGreaterThan(X, 0), ((X, _view("x", 2)),))),
             Assign("y", Map(sp.Piecewise((X, M), (0, True)),
                             ((X, _view("x", 2)), (M, _view("mask", 2))))),
             Assign("dx", Map(sp.Piecewise((G, M), (0, True)),
                              ((G, _view("g", 2)), (M, _view("mask", 2)))))]
    out = passes.kernels(stmts, _prog(stmts, {**SH, "g": SH["x"]}))
    assert [s.target for s in out] == ["y", "dx"]
    assert out[0].op.body == sp.Piecewise((X, X > 0), (0, True))
    assert out[1].op.body == ReluBackward(G, X)
    # a gradient of another shape (a broadcast) keeps the mask
    stmts[2] = Assign("dx", Map(sp.Piecewise((G, M), (0, True)),
                                ((G, _view("g", 2)), (M, _view("mask", 2)))))
    kept = passes.kernels(stmts, _prog(stmts, {**SH, "g": (N,)}))
    assert "mask" in [s.target for s in kept]


def test_broadcast_factors_are_multiplied_at_their_own_shape() -> None:
    """z = g[:, None] * x / c[:, None]: g / c over [N] first, then one product at [N, 3]."""
    g, c = View("g", (None,), (0,), 2), View("c", (None,), (0,), 2)
    G, C = g.placeholder(), c.placeholder()
    stmts = [Assign("z", Map(G * X / C, ((G, g), (C, c), (X, _view("x", 2)))))]
    program = _prog(stmts, {**SH, "g": (N,), "c": (N,)})
    out = passes.broadcast(stmts, program)
    assert [s.target for s in out] == ["tmp_bcast1", "z"]
    inner = out[0].op
    assert program.shapes["tmp_bcast1"] == (N,)
    assert {v.src for _, v in inner.views} == {"g", "c"}
    assert all(v.out_rank == 1 for _, v in inner.views)
    (grouped,) = [v for _, v in out[1].op.views if v.src == "tmp_bcast1"]
    assert grouped.places == (0,) and grouped.out_rank == 2
    # one broadcast factor alone, or factors over different axes, stay as they are
    one = [Assign("z", Map(G * X, ((G, g), (X, _view("x", 2)))))]
    assert passes.broadcast(one, _prog(one, {**SH, "g": (N,)})) == one
    r = View("r", (None,), (1,), 2)
    mixed = [Assign("z", Map(G * r.placeholder() * X,
                             ((G, g), (r.placeholder(), r), (X, _view("x", 2)))))]
    assert passes.broadcast(mixed, _prog(mixed, {**SH, "g": (N,), "r": (3,)})) == mixed


def test_memory_frees_after_last_use_and_writes_in_place() -> None:
    stmts = [Assign("tmp1", _map(2 * X, ("x", 2))),
             Assign("y", _map(sp.tanh(T1), ("tmp1", 2))),
             Assign("z", _map(Y + 1, ("y", 2)))]
    out = passes.memory(stmts, _prog(stmts, SH), keep={"z"})
    assert out[1].frees == ("tmp1",) and out[1].in_place == "tmp1"
    assert out[2].frees == ("y",)
    assert out[0].frees == ()  # x is an argument: never freed


# -- known forms ---------------------------------------------------------------------------
def test_known_forms_find_a_forward_body_at_other_indices() -> None:
    from symbackprop.derive.functions import Sigmoid

    graph = Graph("t")
    z = graph.add(Node("z", (N, sp.Integer(3)), "input", "z", None))  # type: ignore[arg-type]
    y = graph.op("y", z.shape, Sigmoid(z.element()), layer="a", where=None)  # type: ignore[arg-type]
    known = KnownForms([y])
    expr = Sigmoid(ref("z", (k0, k1))) * (1 - Sigmoid(ref("z", (k0, k1))))
    assert known.substitute(expr) == ref("y", (k0, k1)) * (1 - ref("y", (k0, k1)))
    swapped = Sigmoid(ref("z", (k1, k0)))
    assert known.substitute(swapped) == ref("y", (k1, k0))


# -- a LoRA-style layer whose body nests two contractions ---------------------------------
class _LoraDense(Layer):
    """z = x Wᵀ + (alpha / r) (x Aᵀ) Bᵀ; ``flat`` writes the adapter as one double sum."""

    key = "lora_test"
    doc = "test-only LoRA-style dense layer"
    options = {"units": Option("units"), "rank": Option("units"),
               "flat": Option("bool", False)}
    params = {"weight": Param("frozen base", "uniform_fan_in", trainable=False),
              "lora_A": Param("down-projection", "uniform_fan_in"),
              "lora_B": Param("up-projection", "uniform_fan_in")}

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        fan_in = feature_size(x, spec.where)
        units, rank = int(spec.options["units"]), int(spec.options["rank"])  # type: ignore[arg-type]
        w = cls.param(graph, spec, "weight", (sp.Integer(units), sp.Integer(fan_in)), fan_in)
        a = cls.param(graph, spec, "lora_A", (sp.Integer(rank), sp.Integer(fan_in)), fan_in)
        b = cls.param(graph, spec, "lora_B", (sp.Integer(units), sp.Integer(rank)), rank)
        n, o = out_index(0), out_index(1)
        s, r = sum_index(0), sum_index(1)
        scale = sp.Rational(8, rank)
        base = sp.Sum(x.element((n, s)) * w.element((o, s)), (s, 0, fan_in - 1))
        if spec.options["flat"]:
            adapter = sp.Sum(x.element((n, s)) * a.element((r, s)) * b.element((o, r)),
                             (s, 0, fan_in - 1), (r, 0, rank - 1))
        else:
            inner = sp.Sum(x.element((n, s)) * a.element((r, s)), (s, 0, fan_in - 1))
            adapter = sp.Sum(inner * b.element((o, r)), (r, 0, rank - 1))
        return graph.op(spec.name, (x.shape[0], sp.Integer(units)), base + scale * adapter,
                        layer=spec.name, where=spec.where, kind="contraction", label="lora")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        f = torch.nn.functional
        p = {k.split(".")[-1]: v for k, v in params.items() if k.startswith(spec.name + ".")}
        rank = int(spec.options["rank"])  # type: ignore[arg-type]
        return f.linear(inputs[0], p["weight"]) + (8 / rank) * f.linear(
            f.linear(inputs[0], p["lora_A"]), p["lora_B"])


def _lora_spec(flat: bool) -> str:
    return f"""
name: lora_{"flat" if flat else "nested"}
inputs: {{x: [N, 6]}}
targets: {{t: [N, 5]}}
layers:
  - {{name: h, type: dense, units: 6, activation: tanh}}
  - {{name: l, type: lora_test, units: 5, rank: 2, flat: {str(flat).lower()}}}
loss: {{type: mse, target: t}}
"""


@pytest.fixture
def lora_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LAYERS, _LoraDense.key, _LoraDense)


def _all_paths_agree(modules: dict, model: Any) -> None:
    """numpy and torch loss_and_grad against finite differences and the torch oracle,
    and torch Model.loss().backward() against the oracle, in float64."""
    trainable = list(modules["numpy"].TRAINABLE)
    params = modules["numpy"].init_params(0)
    batch = random_batch(model, batch=4)
    ref_loss, ref = oracle_grads(model.spec, params, batch, trainable)
    for backend in ("numpy", "torch"):
        module = modules[backend]
        wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
        unwrap = (lambda t: t.detach().numpy()) if backend == "torch" else np.asarray
        errors = finite_differences(module, params, batch, wrap=wrap, to_numpy=unwrap)
        assert max(rel for _, rel in errors.values()) <= 1e-6
        loss, grads = module.loss_and_grad({k: wrap(v) for k, v in params.items()},
                                           **{k: wrap(v) for k, v in
                                              call_args(module, batch).items()})
        assert abs(float(unwrap(loss)) - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss))
        for name in trainable:
            scale = max(np.max(np.abs(ref[name])), 1e-12)
            assert np.max(np.abs(unwrap(grads[name]) - ref[name])) / scale <= 1e-9, name
    net = modules["torch"].Model(seed=0, dtype=torch.float64)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    net.loss(**{k: torch.from_numpy(v) for k, v in
                call_args(modules["torch"], batch).items()}).backward()
    for name, param in net.named_parameters():
        if name in ref:
            scale = max(np.max(np.abs(ref[name])), 1e-12)
            assert np.max(np.abs(param.grad.numpy() - ref[name])) / scale <= 1e-9, name
        else:
            assert param.grad is None


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
def test_lora_style_layer_all_three_paths(lora_layer: None, tmp_build, flat: bool) -> None:
    model, modules = tmp_build(_lora_spec(flat))
    # Lowered into products of two arrays, never an N x O x I x R einsum.
    program = Lowerer(model.derivation, seed_argument=False).lower()
    for stmt in program.stmts:
        assert len(stmt.reads) <= 3, stmt
        assert len(program.shapes.get(stmt.target, ())) <= 2, stmt
    assert list(modules["numpy"].TRAINABLE) == ["h.weight", "h.bias", "l.lora_A", "l.lora_B"]
    _all_paths_agree(modules, model)


# -- index predicates: a causal mask ---------------------------------------------------------
class _Causal(Layer):
    """out[n, t, s] = x[n, t, s] where s <= t, else 0 (``reduce``: summed over s)."""

    key = "causal_test"
    doc = "test-only causal mask over the last two axes"
    options = {"reduce": Option("bool", False)}

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        n, t, s = out_index(0), out_index(1), out_index(2)
        if spec.options["reduce"]:
            j = sum_index(0)
            body = sp.Sum(sp.Piecewise((x.element((n, t, j)), j <= t), (0, True)),
                          (j, 0, x.shape[2] - 1))
            return graph.op(spec.name, x.shape[:2], body, layer=spec.name, where=spec.where,
                            kind="reduction", label="masked sum")
        body = sp.Piecewise((x.element((n, t, s)), s <= t), (0, True))
        return graph.op(spec.name, x.shape, body, layer=spec.name, where=spec.where,
                        label="causal mask")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        x = inputs[0]
        masked = x * torch.tril(torch.ones(x.shape[-2:], dtype=x.dtype))
        return masked.sum(-1) if spec.options["reduce"] else masked


@pytest.mark.parametrize("reduce", [False, True], ids=["mask", "masked-sum"])
def test_index_predicates_lower_to_index_arrays(monkeypatch: pytest.MonkeyPatch, tmp_build,
                                                reduce: bool) -> None:
    monkeypatch.setitem(LAYERS, _Causal.key, _Causal)
    target = "[N, 3, 2]" if not reduce else "[N, 2]"
    final = "{name: out, type: dense, units: 2}"
    model, modules = tmp_build(f"""
name: causal_{int(reduce)}
inputs: {{x: [N, 3, 4]}}
targets: {{t: {target}}}
layers:
  - {{name: h, type: dense, units: 3, activation: tanh}}
  - {{name: m, type: causal_test, reduce: {str(reduce).lower()}}}
  - {final}
loss: {{type: mse, target: t}}
""")
    for backend, call in (("numpy", "numpy.arange(3)"), ("torch", "torch.arange(3, device=")):
        code = [line for line in model.source(backend).split("def forward")[1].splitlines()
                if not line.strip().startswith("#")]
        assert any(call in line for line in code), backend
        assert not any(i in line for line in code for i in ("i1", "i2", "k1", "k2")), backend
    _all_paths_agree(modules, model)


def test_an_index_used_as_a_value_is_refused() -> None:
    lowerer = Lowerer.__new__(Lowerer)
    lowerer.like = "x"
    x = sp.IndexedBase("x", real=True)
    with pytest.raises(GraphError, match="used as a value"):
        lowerer.viewify(x[i0, i1] * i1, (i0, i1), {i0: N, i1: sp.Integer(3)})


def test_param_names_come_from_naming() -> None:
    assert naming.param_var("l.lora_A") == "l_lora_A"


# -- gather and scatter-add: an embedding lookup -------------------------------------------
def _template_helpers(backend: str) -> str:
    """The helper functions exactly as the backend's template writes them."""
    import re

    from symbackprop.emit.render import template_dir

    text = (template_dir() / f"{backend}_module.py.j2").read_text(encoding="utf-8")
    blocks = re.findall(r'{% if "[a-z_]+" in helpers[^%]*%}\n(.*?){% endif %}', text, re.S)
    # helpers written through a shared macro ({{ ... }}) are not needed here
    return "\n".join(b for b in blocks if "{{" not in b)


def _embedding_program() -> tuple[Any, Program]:
    """emb[n,t,d] = E[ids[n,t], d]; out = tanh(emb) Wᵀ; mse against t (hand-built graph:
    the spec language has no integer inputs yet)."""
    from symbackprop.backprop import derive
    from symbackprop.spec import Where

    where = Where("<test>", 1, 1, "")
    n_, t_ = sp.Symbol("N", integer=True, positive=True), sp.Symbol("T", integer=True,
                                                                      positive=True)
    graph = Graph("emb")
    graph.dims.update({"N": n_, "T": t_})
    ids = graph.add(Node("ids", (n_, t_), "input", "ids", where))
    tgt = graph.add(Node("t", (n_, t_, sp.Integer(2)), "target", "t", where))
    emb_w = graph.add(Node("E", (sp.Integer(5), sp.Integer(3)), "param", "emb", where,
                           param="emb.weight", trainable=True))
    w = graph.add(Node("W", (sp.Integer(2), sp.Integer(3)), "param", "out", where,
                       param="out.weight", trainable=True))
    a, b, c = out_index(0), out_index(1), out_index(2)
    emb = graph.op("emb", (n_, t_, sp.Integer(3)),
                   sp.tanh(emb_w.element((ids.element((a, b)), c))), layer="emb", where=where)
    s = sum_index(0)
    out = graph.op("out", (n_, t_, sp.Integer(2)),
                   sp.Sum(emb.element((a, b, s)) * w.element((c, s)), (s, 0, 2)),
                   layer="out", where=where, kind="contraction")
    sums = tuple(sum_index(k) for k in range(3))
    loss = graph.op("loss", (), sp.Sum((out.element(sums) - tgt.element(sums)) ** 2,
                                       *((q, 0, e - 1) for q, e in zip(sums, out.shape,
                                                                       strict=True)))
                    / (2 * n_ * t_), layer="loss", where=where, kind="reduction")
    graph.loss, graph.prediction = loss.name, out.name
    deriv = derive(graph)
    return deriv, Lowerer(deriv, seed_argument=False).lower()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_embedding_gathers_forward_and_scatters_backward(backend: str) -> None:
    from symbackprop.emit.arrays import array_printer
    from symbackprop.ir.nodes import Gather, ScatterAdd

    deriv, program = _embedding_program()
    outputs = ["loss", *deriv.grads.values()]
    stmts = passes.memory(passes.function(program, outputs), program, keep=set(outputs))
    assert any(isinstance(st.op, ScatterAdd) for st in stmts)
    assert any(isinstance(v, Gather) for st in stmts if isinstance(st.op, Map | Reduce)
               for _, v in st.op.views)
    printer = array_printer(backend, program)
    lines = [f"{st.target} = {printer.code(st)}" for st in stmts]
    rng = np.random.default_rng(0)
    ids = np.array([[0, 3, 3], [4, 0, 3]])  # repeated ids: their rows' gradients sum
    values = {"E": rng.normal(size=(5, 3)), "W": rng.normal(size=(2, 3)),
              "t": rng.normal(size=(2, 3, 2))}
    import math

    import numpy

    namespace: dict[str, Any] = {"numpy": numpy, "torch": torch, "math": math}
    exec(_template_helpers(backend), namespace)  # noqa: S102 - the template's own helpers
    convert = torch.from_numpy if backend == "torch" else (lambda v: v)
    namespace.update({k: convert(v) for k, v in values.items()})
    namespace.update(ids=convert(ids), N=2, T=3)
    exec("\n".join(lines), namespace)  # noqa: S102 - code printed from the IR under test

    ref = {k: torch.tensor(v, requires_grad=k != "t") for k, v in values.items()}
    out = torch.tanh(ref["E"][torch.from_numpy(ids)]) @ ref["W"].T
    loss = ((out - ref["t"]) ** 2).mean()
    loss.backward()
    got = lambda name: np.asarray(namespace[name])  # noqa: E731
    assert abs(float(got("loss")) - float(loss.detach())) <= 1e-12
    assert np.allclose(got(deriv.grads["emb.weight"]), ref["E"].grad.numpy(), rtol=1e-12,
                       atol=1e-14)
    assert np.allclose(got(deriv.grads["out.weight"]), ref["W"].grad.numpy(), rtol=1e-12,
                       atol=1e-14)
    assert np.all(got(deriv.grads["emb.weight"])[[1, 2]] == 0)  # ids never used
