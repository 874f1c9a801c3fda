"""Stable rewrites: forms that overflow or cancel replaced by stable primitives.

Generic simplification does not choose stable forms, so these rules run on the fused
forward bodies (before differentiation) and on every derivative sympy returns. Each
rule is one line of mathematics; ``apply`` records which fired where, for
``symbackprop generate --explain``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from .functions import ClampedLog, Sigmoid, Softplus

_a = sp.Wild("a")


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: sp.Expr
    result: sp.Expr | Callable[..., sp.Expr]
    why: str


RULES: tuple[Rule, ...] = (
    Rule("log(1 + exp(a)) -> softplus(a)", sp.log(1 + sp.exp(_a)), Softplus(_a),
         "exp overflows for a > 709; logaddexp(0, a) does not"),
    Rule("1 / (1 + exp(-a)) -> sigmoid(a)", 1 / (1 + sp.exp(-_a)), Sigmoid(_a),
         "exp(-a) overflows for a < -709"),
    Rule("exp(a) / (1 + exp(a)) -> sigmoid(a)", sp.exp(_a) / (1 + sp.exp(_a)), Sigmoid(_a),
         "inf / inf for a > 709"),
    Rule("log(sigmoid(a)) -> -softplus(-a)", sp.log(Sigmoid(_a)), -Softplus(-_a),
         "sigmoid underflows to 0 for a < -745 and log(0) = -inf"),
    Rule("log(1 - sigmoid(a)) -> -softplus(a)", sp.log(1 - Sigmoid(_a)), -Softplus(_a),
         "1 - sigmoid(a) rounds to 0 for a > 37"),
    Rule("clamped log(sigmoid(a)) -> -softplus(-a)", ClampedLog(Sigmoid(_a)), -Softplus(-_a),
         "exact where the clamp at -100 would cut the value"),
    Rule("clamped log(1 - sigmoid(a)) -> -softplus(a)", ClampedLog(1 - Sigmoid(_a)),
         -Softplus(_a), "exact where the clamp at -100 would cut the value"),
    Rule("log(exp(a)) -> a", sp.log(sp.exp(_a)), _a, "exp overflows"),
    Rule("exp(-softplus(a)) -> sigmoid(-a)", sp.exp(-Softplus(_a)), Sigmoid(-_a),
         "one primitive instead of two"),
    Rule("1 + erf(a) -> erfc(-a)", 1 + sp.erf(_a), sp.erfc(-_a),
         "1 + erf(a) cancels catastrophically for a < -3"),
    Rule("1 - erf(a) -> erfc(a)", 1 - sp.erf(_a), sp.erfc(_a),
         "1 - erf(a) cancels catastrophically for a > 3"),
)


@dataclass(frozen=True)
class Fired:
    """One rewrite that changed an expression."""

    where: str
    rule: str
    why: str


def _heads(expr: sp.Expr) -> set[type]:
    return {type(f) for f in expr.atoms(sp.Function)}


# The functions each pattern needs: pattern matching is slow, and most bodies (matrix
# products, sums) contain none of them.
_NEEDS = {rule.name: _heads(rule.pattern) for rule in RULES}


def apply(expr: sp.Expr, where: str, log: list[Fired] | None = None) -> sp.Expr:
    """Rewrite ``expr`` with every rule until nothing changes."""
    for _ in range(10):
        before = expr
        for rule in RULES:
            if not _NEEDS[rule.name] <= _heads(expr):
                continue
            new = expr.replace(rule.pattern, rule.result)
            if new != expr:
                expr = new
                if log is not None:
                    log.append(Fired(where, rule.name, rule.why))
        if expr == before:
            break
    return expr


def canonical_sigmoid(expr: sp.Expr) -> sp.Expr:
    """sigmoid(-u) -> 1 - sigmoid(u), so terms in sigma(u) can cancel (bce of a sigmoid)."""
    return expr.replace(
        lambda e: isinstance(e, Sigmoid) and e.args[0].could_extract_minus_sign(),
        lambda e: 1 - Sigmoid(-e.args[0]))
