"""The scalar primitive records (derive/functions.py) and the stable rewrites built on them.

Each record's derivative must equal sympy's derivative of its elementary definition, and
(for sympy's own functions) sympy's derivative of the function itself; each stable
rewrite must fire on its form and keep the value; rewriting visits each node once. How
each record prints is tested against its mpmath reference in test_extremes.py.
"""

from __future__ import annotations

import mpmath as mp
import pytest
import sympy as sp

from symbackprop.derive import stable
from symbackprop.derive.functions import (
    BY_CLASS,
    PRIMITIVES,
    Defined,
    Expm1,
    Log1p,
    Sigmoid,
    Softplus,
)
from symbackprop.emit.printers import NumpyCodePrinter, TorchCodePrinter
from symbackprop.formula import FUNCTIONS

X = sp.Symbol("x", real=True)
Y = sp.Symbol("y")
POINTS = [-3.5, -0.7, 1e-3, 0.4, 2.25]
UNARY = [pytest.param(p, id=p.name) for p in PRIMITIVES if p.arity == 1]


def _value(expr: sp.Expr, x: float) -> mp.mpf:
    with mp.workdps(40):
        return mp.mpf(sp.N(expr.subs(X, sp.Float(x, 40)), 40))


@pytest.mark.parametrize("prim", UNARY)
def test_derivative_equals_diff_of_definition(prim) -> None:
    if prim.derivative is None:
        pytest.skip("no derivative")
    stated = prim.derivative(X, prim.func(X))
    truth = sp.diff(prim.definition(X), X)
    for x in POINTS:
        if not prim.domain(x) or (prim.name == "clamped_log" and x < 1e-2):
            continue
        got, want = _value(stated, x), _value(truth, x)
        assert abs(got - want) <= mp.mpf("1e-30") * (1 + abs(want)), (prim.name, x, got, want)


@pytest.mark.parametrize("prim", UNARY)
def test_sympy_differentiates_through_the_record(prim) -> None:
    """For our classes the record is their fdiff; for sympy's, the record agrees with it."""
    if prim.derivative is None:
        pytest.skip("no derivative")
    stated = prim.derivative(X, prim.func(X))
    assert sp.simplify(sp.diff(prim.func(X), X) - stated) == 0


@pytest.mark.parametrize("prim", UNARY)
def test_reference_matches_definition(prim) -> None:
    for x in POINTS:
        if prim.domain(x):
            with mp.workdps(40):
                want = _value(prim.definition(X), x)
                got = prim.reference(mp.mpf(x))
                assert abs(got - want) <= mp.mpf("1e-30") * (1 + abs(want)), (prim.name, x)


@pytest.mark.parametrize("prim", UNARY)
def test_every_record_prints_in_both_backends(prim) -> None:
    for printer in (NumpyCodePrinter(), TorchCodePrinter()):
        text = printer.doprint(prim.func(sp.Symbol("a")))
        call, helpers = prim.code(printer._module)
        assert text == call.format("a")
        assert set(helpers) <= printer.helpers


def test_latex_reads_the_record() -> None:
    assert sp.latex(Sigmoid(X)) == r"\sigma\left(x\right)"
    assert sp.latex(Expm1(X) ** 2) == r"\operatorname{expm1}\left(x\right)^{2}"


def test_formula_functions_come_from_the_records() -> None:
    for prim in PRIMITIVES:
        if prim.formula:
            assert FUNCTIONS[prim.name].build is prim.func
            assert FUNCTIONS[prim.name].torch is prim.oracle
    assert {"expm1", "log1p"} <= set(FUNCTIONS)
    assert all(issubclass(cls, Defined) or cls.__module__.startswith("sympy")
               for cls in BY_CLASS)


REWRITES = [
    (sp.log(1 + sp.exp(X)), Softplus(X)),
    (1 / (1 + sp.exp(-X)), Sigmoid(X)),
    (sp.exp(X) / (1 + sp.exp(X)), Sigmoid(X)),
    (sp.log(1 / (1 + sp.exp(-X))), -Softplus(-X)),
    (sp.log(1 - Sigmoid(X)), -Softplus(X)),
    (sp.exp(-Softplus(X)), Sigmoid(-X)),
    (sp.log(sp.exp(Y)), Y),  # sympy itself simplifies log(exp(x)) for a real x
    (1 - sp.erf(X), sp.erfc(X)),
    (sp.exp(X) - 1, Expm1(X)),
    (sp.log(1 + X**2), Log1p(X**2)),
    (3 * sp.log(2 + sp.tanh(X)), 3 * sp.log(2 + sp.tanh(X))),  # no rule applies
]


@pytest.mark.parametrize("before,after", REWRITES, ids=[str(b) for b, _ in REWRITES])
def test_rewrite(before, after) -> None:
    fired: list[stable.Fired] = []
    got = stable.apply(before, "test", fired)
    assert got == after
    assert bool(fired) == (before != after)
    assert all(f.where == "test" and f.why for f in fired)


def test_every_rule_is_exercised() -> None:
    fired: list[stable.Fired] = []
    for before, _ in REWRITES:
        stable.apply(before, "t", fired)
    from symbackprop.derive.functions import ClampedLog

    for extra in (ClampedLog(Sigmoid(X)), ClampedLog(1 - Sigmoid(X)), 1 + sp.erf(X)):
        stable.apply(extra, "t", fired)
    assert {f.rule for f in fired} == {r.name for r in stable.RULES}


def test_rewriting_visits_each_node_a_bounded_number_of_times(monkeypatch) -> None:
    """A chain of n nested bodies costs O(n) rule attempts, not O(n^2)."""
    calls = 0
    rules = {}
    for head, found in stable.BY_HEAD.items():
        wrapped = []
        for rule in found:
            def counted(e, match=rule.match):
                nonlocal calls
                calls += 1
                return match(e)
            wrapped.append(stable.Rewrite(rule.head, rule.name, counted, rule.why))
        rules[head] = tuple(wrapped)
    monkeypatch.setattr(stable, "BY_HEAD", rules)

    def chain(n: int) -> sp.Expr:
        e = X
        for k in range(n):
            e = sp.log(1 + sp.exp(sp.tanh(e) + k)) * (k + 2)
        return e

    counts = []
    for n in (10, 40):
        calls = 0
        stable.apply(chain(n), "t")
        counts.append(calls)
    assert counts[1] <= 4.5 * counts[0]
