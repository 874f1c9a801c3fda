"""The log-softmax backward pass and its kernels.

The pass turns ``r = c*sum(x); d = r*exp(t) + g`` into ``d = g - exp(t)*sum(g)`` only
when ``g = -c*x`` elementwise (so that ``r = -sum(g)``); the kernels compute what the
expression they replace computes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import sympy as sp
import torch

from symbackprop.ir.nodes import (
    Assign,
    LogSoftmax,
    LogSoftmaxBackward,
    Map,
    Program,
    Reduce,
    Seed,
    View,
    ordered,
)
from symbackprop.ir.passes import log_softmax_backward

from conftest import example_modules

R = 3  # rank of the arrays the rows run along


def _ident(name: str, rank: int = R) -> View:
    return View(name, (None,) * rank, tuple(range(rank)), rank)


def _scalar(name: str, rank: int) -> View:
    return View(name, (), (), rank)


def _program(g_body: str, *, r_body: str = "c*s", d_extra: str = "",
             sum_axes: tuple[int, ...] = (R - 1,), seed: bool = False) -> tuple[list, Program]:
    """t = log_softmax(a); s = sum(x, axes); r = <r_body>; d = r*exp(t) + <g_body>."""
    x, t, c, rb, one = sp.symbols("x t c r_b one")
    shapes = {"a": (2, 3, 4), "x": (2, 3, 4), "c": (), "s": (2, 3), "r": (2, 3),
              "d": (2, 3, 4)}
    env = {"x": x, "c": c, "s": sp.Symbol("s"), "t": t, "one": one, "exp": sp.exp,
           "w": sp.Symbol("w")}
    stmts = [Assign("t", LogSoftmax("a", R - 1))]
    if seed:
        stmts.append(Assign("one", Seed("c"), phase="backward"))
    stmts += [
        Assign("s", Reduce("sum", x, ((x, _ident("x")),), sum_axes, R), phase="backward"),
        Assign("r", Map(eval(r_body, env),  # noqa: S307
                        ordered({sp.Symbol("s"): _ident("s", R - 1), c: _scalar("c", R - 1)})),
               phase="backward"),
        Assign("d", Map(rb * sp.exp(t) + eval(g_body + d_extra, env),  # noqa: S307
                        ordered({rb: View("r", (None, None), (0, 1), R), t: _ident("t"),
                                 x: _ident("x"), c: _scalar("c", R), one: _scalar("one", R)})),
               phase="backward"),
    ]
    return stmts, Program(stmts, shapes)


def test_the_pass_forms_one_call_when_r_is_minus_the_row_sum_of_g() -> None:
    stmts, program = _program("-c*x")
    out = log_softmax_backward(stmts, program, {"d"})
    assert [s.target for s in out] == ["t", "d_t", "d"]
    assert out[-1].op == LogSoftmaxBackward("d_t", "t", R - 1)
    assert sp.simplify(out[1].op.body + sp.Symbol("c") * sp.Symbol("x")) == 0
    assert "log-softmax backward" in out[-1].comment and "(t = log_softmax(a))" in out[1].comment
    assert program.shapes["d_t"] == program.shapes["d"]
    # the same numbers written otherwise: the factor inside, the row sum itself
    stmts, program = _program("-x*c/2", r_body="c*s/2")
    assert log_softmax_backward(stmts, program, {"d"})[-1].op == LogSoftmaxBackward(
        "d_t", "t", R - 1)
    stmts, program = _program("-x", r_body="s")
    assert log_softmax_backward(stmts, program, {"d"})[-1].op == LogSoftmaxBackward(
        "d_t", "t", R - 1)
    # the seed dL/dL is exactly 1 where the function makes it
    stmts, program = _program("-one*c*x", seed=True)
    assert log_softmax_backward(stmts, program, {"d"})[-1].op == LogSoftmaxBackward(
        "d_t", "t", R - 1)


@pytest.mark.parametrize("g_body, extra", [
    ("-2*c*x", ""),  # r is not -sum(g)
    ("c*x", ""),  # the sign
    ("-c*x", " + 1"),  # a term the row sum does not see
    ("-c*x", " + x*exp(t)"),  # another term
    ("-c*x*x", ""),
    ("-one*c*x", ""),  # "one" is an array of the caller's, not the seed
])
def test_the_pass_leaves_anything_else_as_it_is(g_body: str, extra: str) -> None:
    stmts, program = _program(g_body, d_extra=extra)
    assert log_softmax_backward(stmts, program, {"d"}) == stmts


def test_the_pass_compares_arrays_not_symbol_names() -> None:
    """Each statement binds its own symbols: the check reads through the views, so a
    symbol named like an array but bound to another read never cancels."""
    x, w, one = sp.Symbol("x"), sp.Symbol("w"), sp.Symbol("one")
    # s = sum(x*w); d's "x" reads x transposed: its rows are not the rows s summed
    stmts, program = _program("-c*x*w")
    program.shapes["w"] = program.shapes["x"]
    s = next(st for st in stmts if st.target == "s")
    stmts[stmts.index(s)] = replace(s, op=Reduce("sum", x * w, ordered(
        {x: _ident("x"), w: _ident("w")}), (R - 1,), R))
    d = stmts[-1]
    views = {**dict(d.op.views), w: _ident("w")}
    assert log_softmax_backward(stmts[:-1] + [replace(d, op=Map(d.op.body, ordered(views)))],
                                program, {"d"})[-1].op == LogSoftmaxBackward("d_t", "t", R - 1)
    views[x] = View("x", (None, None, None), (0, 2, 1), R)
    stmts[-1] = replace(d, op=Map(d.op.body, ordered(views)))
    assert log_softmax_backward(stmts, program, {"d"}) == stmts
    # r = one*sum(x) with one the seed (exactly 1); d's "one" reads another 0-d array k
    stmts, program = _program("-one*x", r_body="one*s", seed=True)
    program.shapes["k"] = ()
    r = next(st for st in stmts if st.target == "r")
    stmts[stmts.index(r)] = replace(r, op=Map(one * sp.Symbol("s"), ordered({
        sp.Symbol("s"): _ident("s", R - 1), one: _scalar("one", R - 1)})))
    assert log_softmax_backward(stmts, program, {"d"})[-1].op == LogSoftmaxBackward(
        "d_t", "t", R - 1)
    d = stmts[-1]
    stmts[-1] = replace(d, op=Map(d.op.body, ordered({**dict(d.op.views),
                                                      one: _scalar("k", R)})))
    assert log_softmax_backward(stmts, program, {"d"}) == stmts


def test_the_pass_needs_a_full_array_in_g_and_can_run_twice() -> None:
    # the row sum of a 0-d array: g would be 0-d, the kernel's row sum meaningless
    stmts, program = _program("-c*x")
    s = next(st for st in stmts if st.target == "s")
    c = sp.Symbol("c")
    stmts[stmts.index(s)] = replace(s, op=Reduce("sum", c, ((c, _scalar("c", R)),),
                                                 (R - 1,), R))
    d = stmts[-1]
    stmts[-1] = replace(d, op=Map(d.op.body.xreplace({sp.Symbol("x"): c}) - c * c
                                  + c * c, d.op.views))
    assert log_softmax_backward(stmts, program, {"d"}) == stmts
    # the module's functions share one program: a second function gets the rewrite too
    stmts, program = _program("-c*x")
    first = log_softmax_backward(stmts, program, {"d"})
    again = log_softmax_backward(stmts, program, {"d"})
    assert first == again and again[-1].op == LogSoftmaxBackward("d_t", "t", R - 1)


def test_the_pass_keeps_arrays_others_read() -> None:
    stmts, program = _program("-c*x")
    assert log_softmax_backward(stmts, program, {"d", "r"}) == stmts  # r is an output
    assert log_softmax_backward(stmts, program, {"d", "s"}) == stmts
    stmts, program = _program("-c*x", sum_axes=(0,))  # a sum over another axis
    assert log_softmax_backward(stmts, program, {"d"}) == stmts
    stmts, program = _program("-c*x")
    reader = Assign("e", Map(sp.Symbol("r"), ((sp.Symbol("r"), _ident("r", R - 1)),)),
                    phase="backward")
    assert log_softmax_backward([*stmts, reader], program, {"d", "e"}) == [*stmts, reader]


def _plain(g: np.ndarray, t: np.ndarray) -> np.ndarray:
    return g - np.exp(t) * g.sum(-1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kernels_match_the_expression(tmp_path, dtype) -> None:
    """numpy's helper and torch's aten kernel against the expression they replace, on rows
    with a dominant logit (exp(t) exactly 0 elsewhere) and on flat rows."""
    mods = example_modules(tmp_path, "mlp_classifier")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 3, 7)) * 5
    a[0, 0] = [800.0, 0, 0, 0, 0, 0, -800.0]
    a[1, 1] = 0.0
    t = a - a.max(-1, keepdims=True)
    t = (t - np.log(np.exp(t).sum(-1, keepdims=True))).astype(dtype)
    g = rng.normal(size=t.shape).astype(dtype)
    want = _plain(g.astype(np.float64), t.astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-13
    got = mods["numpy"]._log_softmax_backward(g, t, 2)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    tg, tt = torch.from_numpy(g), torch.from_numpy(t)
    got = mods["torch"]._log_softmax_backward(tg, tt, 2)
    assert got.dtype == tg.dtype
    np.testing.assert_allclose(got.numpy(), want, rtol=tol, atol=tol)
    # under autocast the adjoint and the log-softmax may differ in precision, either
    # way round: the wider one wins
    for grad, out in ((tg.to(torch.bfloat16), tt.float()), (tg.float(), tt.to(torch.bfloat16))):
        mixed = mods["torch"]._log_softmax_backward(grad, out, 2)
        assert mixed.dtype == torch.float32
        np.testing.assert_allclose(mixed.numpy(), want, rtol=3e-2, atol=3e-2)


def test_softmax_cross_entropy_on_label_rows_uses_the_kernel(tmp_path) -> None:
    mods = example_modules(tmp_path, "mlp_classifier")
    for backend, mod in mods.items():
        text = open(mod.__file__).read()
        calls = text.count("= _log_softmax_backward(")
        # numpy: loss_and_grad; torch: loss_and_grad and the Model's backward
        assert calls == (1 if backend == "numpy" else 2), backend
