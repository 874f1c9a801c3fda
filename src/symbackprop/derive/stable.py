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
from sympy.core.parameters import global_parameters

from .functions import ClampedLog, Sigmoid, Softplus

_a = sp.Wild("a")


@dataclass(frozen=True)
class Rule:
    """``pattern -> result``; ``needs`` are the function classes in the pattern.

    A body that lacks one of ``needs`` cannot match, and most bodies (matrix products,
    sums) have none, so the pattern is only built (once) when a body could match: the
    patterns cost tens of milliseconds to build, at the start of every command.
    """

    name: str
    needs: frozenset[type]
    make: Callable[[], tuple[sp.Expr, sp.Expr | Callable[..., sp.Expr]]]
    why: str


def _rule(name: str, needs: tuple[type, ...],
          make: Callable[[], tuple[sp.Expr, sp.Expr | Callable[..., sp.Expr]]],
          why: str) -> Rule:
    return Rule(name, frozenset(needs), make, why)


RULES: tuple[Rule, ...] = (
    _rule("log(1 + exp(a)) -> softplus(a)", (sp.log, sp.exp),
          lambda: (sp.log(1 + sp.exp(_a)), Softplus(_a)),
          "exp overflows for a > 709; logaddexp(0, a) does not"),
    _rule("1 / (1 + exp(-a)) -> sigmoid(a)", (sp.exp,),
          lambda: (1 / (1 + sp.exp(-_a)), Sigmoid(_a)),
          "exp(-a) overflows for a < -709"),
    _rule("exp(a) / (1 + exp(a)) -> sigmoid(a)", (sp.exp,),
          lambda: (sp.exp(_a) / (1 + sp.exp(_a)), Sigmoid(_a)),
          "inf / inf for a > 709"),
    _rule("log(sigmoid(a)) -> -softplus(-a)", (sp.log, Sigmoid),
          lambda: (sp.log(Sigmoid(_a)), -Softplus(-_a)),
          "sigmoid underflows to 0 for a < -745 and log(0) = -inf"),
    _rule("log(1 - sigmoid(a)) -> -softplus(a)", (sp.log, Sigmoid),
          lambda: (sp.log(1 - Sigmoid(_a)), -Softplus(_a)),
          "1 - sigmoid(a) rounds to 0 for a > 37"),
    _rule("clamped log(sigmoid(a)) -> -softplus(-a)", (ClampedLog, Sigmoid),
          lambda: (ClampedLog(Sigmoid(_a)), -Softplus(-_a)),
          "exact where the clamp at -100 would cut the value"),
    _rule("clamped log(1 - sigmoid(a)) -> -softplus(a)", (ClampedLog, Sigmoid),
          lambda: (ClampedLog(1 - Sigmoid(_a)), -Softplus(_a)),
          "exact where the clamp at -100 would cut the value"),
    _rule("log(exp(a)) -> a", (sp.log, sp.exp),
          lambda: (sp.log(sp.exp(_a)), _a), "exp overflows"),
    _rule("exp(-softplus(a)) -> sigmoid(-a)", (sp.exp, Softplus),
          lambda: (sp.exp(-Softplus(_a)), Sigmoid(-_a)), "one primitive instead of two"),
    _rule("1 + erf(a) -> erfc(-a)", (sp.erf,),
          lambda: (1 + sp.erf(_a), sp.erfc(-_a)),
          "1 + erf(a) cancels catastrophically for a < -3"),
    _rule("1 - erf(a) -> erfc(a)", (sp.erf,),
          lambda: (1 - sp.erf(_a), sp.erfc(_a)),
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


_BUILT: dict[str, tuple[sp.Expr, sp.Expr | Callable[..., sp.Expr]]] = {}


def _built(rule: Rule) -> tuple[sp.Expr, sp.Expr | Callable[..., sp.Expr]]:
    """The rule's (pattern, result), made on first use and checked against ``needs``."""
    if rule.name not in _BUILT:
        pattern, result = rule.make()
        if _heads(pattern) != rule.needs:  # a wrong ``needs`` would skip the rule silently
            raise RuntimeError(f"stable rule {rule.name!r}: needs {sorted(map(str, rule.needs))}"
                               f" but its pattern has {sorted(map(str, _heads(pattern)))}")
        _BUILT[rule.name] = (pattern, result)
    return _BUILT[rule.name]


# Expressions every rule leaves unchanged: applying the rules again is a no-op (the
# forward bodies are prepared once per op and again after fusion, mostly unchanged).
_SETTLED: dict[tuple[sp.Expr, bool], None] = {}
_SETTLED_SIZE = 1024


def apply(expr: sp.Expr, where: str, log: list[Fired] | None = None) -> sp.Expr:
    """Rewrite ``expr`` with every rule until nothing changes."""
    key = (expr, bool(global_parameters.distribute))
    if key in _SETTLED:
        return expr
    for _ in range(10):
        before = expr
        for rule in RULES:
            if not rule.needs <= _heads(expr):
                continue
            new = _replace(expr, rule)
            if new != expr:
                expr = new
                if log is not None:
                    log.append(Fired(where, rule.name, rule.why))
        if expr == before:
            if len(_SETTLED) >= _SETTLED_SIZE:
                del _SETTLED[next(iter(_SETTLED))]
            _SETTLED[expr, bool(global_parameters.distribute)] = None
            break
    return expr


def _replace(expr: sp.Expr, rule: Rule) -> sp.Expr:
    """``expr.replace(pattern, result)``, asking for a match only where it can succeed.

    ``replace`` matches the pattern at every node, leaves included, and sympy's matcher
    is slow; a node that lacks one of the pattern's function classes cannot match (a
    pattern function matches only an instance of its class), so those are answered
    "no match" without asking. Everything else is ``replace``'s own walk: a callable
    query and value, with the value computed as ``replace`` computes it.
    """
    pattern, result = _built(rule)
    if len(pattern.atoms(sp.Wild)) != 1 or not isinstance(result, sp.Basic):
        return expr.replace(pattern, result)  # replace's other value rules: not needed
    needs = tuple(rule.needs)
    last: list[dict[sp.Basic, sp.Basic]] = []

    def query(e: sp.Basic) -> dict[sp.Basic, sp.Basic] | None:
        if not all(e.has(h) for h in needs):
            return None
        found = e.match(pattern)
        last[:] = [found] if found is not None else []
        return found

    def value(e: sp.Basic) -> sp.Basic:
        return result.subs(last[0])  # as replace does for a one-Wild pattern

    return expr.replace(query, value)


def canonical_sigmoid(expr: sp.Expr) -> sp.Expr:
    """sigmoid(-u) -> 1 - sigmoid(u), so terms in sigma(u) can cancel (bce of a sigmoid)."""
    return expr.replace(
        lambda e: isinstance(e, Sigmoid) and e.args[0].could_extract_minus_sign(),
        lambda e: 1 - Sigmoid(-e.args[0]))
