"""Exact identities the chain rule may use: a sum of deviations from a mean is zero.

A tensor ``m[i...] = (1/n) sum_{s=0}^{n-1} f(i..., s)`` (a mean along one axis) makes
``sum_{j=0}^{n-1} c (f(i..., j) - m[i...])`` exactly zero for any ``c`` that does not
depend on ``j``. Layer norm meets it: its variance reads ``x - mean``, so the variance's
derivative with respect to the mean is ``-(2/n) sum_j (x_j - mean) = 0``. Dropping that
term is what turns the chain rule's stages into layer norm's compact backward,
``dx = (1/sigma) (g' - mean(g') - xhat mean(g' xhat))``, and saves one reduction. Nothing
here is approximate: the term is zero in exact arithmetic, and in floating point it is
rounding noise (torch's own layer-norm backward leaves it out too).

The table of means is built once per graph; each derivative is then visited once, and
each sum is tested against the few means it references (no pattern search).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

from ..graph import Graph, ref_name


@dataclass(frozen=True)
class Mean:
    """``name[indices] = (1/n) sum_{var=0}^{n-1} summand``."""

    name: str
    indices: tuple[sp.Symbol, ...]
    var: sp.Symbol
    summand: sp.Expr
    count: sp.Expr


def means(graph: Graph) -> dict[str, Mean]:
    """Every op of ``graph`` whose body is a mean along one axis."""
    found: dict[str, Mean] = {}
    for node in graph.nodes.values():
        body = node.body
        if node.role != "op" or body is None or not isinstance(body, sp.Mul):
            continue
        sums = [a for a in body.args if isinstance(a, sp.Sum)]
        if len(sums) != 1 or len(sums[0].limits) != 1:
            continue
        (total,) = sums
        var, lo, hi = total.limits[0]
        if lo != 0 or sp.simplify(body / total * (hi + 1)) != 1:
            continue
        found[node.name] = Mean(node.name, node.indices(), var, total.function, hi + 1)
    return found


def drop_deviation_sums(expr: sp.Expr, table: Mapping[str, Mean]) -> sp.Expr:
    """``expr`` with every ``sum_j c (f_j - m)`` over a mean ``m`` of ``f`` replaced by 0."""
    if not table or not expr.has(sp.Sum):
        return expr

    def is_zero(e: sp.Sum) -> bool:
        if len(e.limits) != 1:
            return False
        j, lo, hi = e.limits[0]
        for r in e.function.atoms(sp.Indexed):
            mean = table.get(ref_name(r) or "")
            if mean is None or lo != 0 or sp.simplify(hi + 1 - mean.count) != 0:
                continue
            coeff = sp.diff(e.function, r)
            if coeff == 0 or j in coeff.free_symbols or sp.diff(coeff, r) != 0:
                continue
            mapping = dict(zip(mean.indices, r.indices, strict=True))
            mapping[mean.var] = j
            f = mean.summand.xreplace(mapping)
            if sp.expand(e.function - coeff * r + coeff * f) == 0:
                return True
        return False

    return expr.replace(lambda e: isinstance(e, sp.Sum) and is_zero(e),
                        lambda e: sp.Integer(0))
