"""Stable rewrites: forms that overflow or cancel replaced by stable primitives.

Generic simplification does not choose stable forms, so these rules run on the fused
forward bodies (before differentiation) and on every derivative sympy returns. The rules
live with the primitive they introduce (:data:`~symbackprop.derive.functions.PRIMITIVES`);
each is keyed by the head of the node it rewrites (``log``, ``Pow``, ``Add``, ...) and
looks only at that node, so :func:`apply` visits every node of an expression once and
tries only the few rules of its head: the cost is bounded per node, with no wildcard
matching. ``apply`` records which rule fired where, for ``symbackprop generate --explain``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp
from sympy.core.parameters import global_parameters

from .functions import PRIMITIVES, Rewrite, Sigmoid

RULES: tuple[Rewrite, ...] = tuple(r for p in PRIMITIVES for r in p.rewrites)


def _by_head(rules: tuple[Rewrite, ...]) -> Mapping[type, tuple[Rewrite, ...]]:
    heads: dict[type, list[Rewrite]] = {}
    for rule in rules:
        heads.setdefault(rule.head, []).append(rule)
    return {head: tuple(found) for head, found in heads.items()}


BY_HEAD = _by_head(RULES)

# A rewrite's result is visited again (it may enable a rule of its own head, as
# log(1/(1 + exp(-a))) -> log(sigmoid(a)) -> -softplus(-a)); each rule strictly removes
# an unstable form, so chains are short. The bound only guards against a faulty rule.
MAX_CHAIN = 16


@dataclass(frozen=True)
class Fired:
    """One rewrite that changed an expression."""

    where: str
    rule: str
    why: str


# Expressions every rule leaves unchanged: applying the rules again is a no-op (the
# forward bodies are prepared once per op and again after fusion, mostly unchanged).
_SETTLED: dict[tuple[sp.Expr, bool], None] = {}
_SETTLED_SIZE = 1024


def apply(expr: sp.Expr, where: str, log: list[Fired] | None = None) -> sp.Expr:
    """Rewrite ``expr`` bottom-up with the rules of each node's head, to a fixed point."""
    key = (expr, bool(global_parameters.distribute))
    if key in _SETTLED:
        return expr
    fired: dict[str, Rewrite] = {}
    memo: dict[sp.Basic, sp.Basic] = {}

    def visit(e: sp.Basic, chain: int) -> sp.Basic:
        if e.is_Atom or isinstance(e, sp.Indexed):
            return e
        done = memo.get(e)
        if done is not None:
            return done
        args = tuple(visit(a, 0) for a in e.args)
        new = e.func(*args) if args != e.args else e
        for rule in BY_HEAD.get(type(new), ()):
            result = rule.match(new)
            if result is not None and result != new:
                fired.setdefault(rule.name, rule)
                if chain < MAX_CHAIN:
                    result = visit(result, chain + 1)
                new = result
                break
        memo[e] = new
        return new

    out = visit(expr, 0)
    if log is not None:
        log.extend(Fired(where, rule.name, rule.why) for rule in fired.values())
    settled = (out, bool(global_parameters.distribute))
    if len(_SETTLED) >= _SETTLED_SIZE:
        del _SETTLED[next(iter(_SETTLED))]
    _SETTLED[settled] = None
    return out


def canonical_sigmoid(expr: sp.Expr) -> sp.Expr:
    """sigmoid(-u) -> 1 - sigmoid(u), so terms in sigma(u) can cancel (bce of a sigmoid)."""
    return expr.replace(
        lambda e: isinstance(e, Sigmoid) and e.args[0].could_extract_minus_sign(),
        lambda e: 1 - Sigmoid(-e.args[0]))
