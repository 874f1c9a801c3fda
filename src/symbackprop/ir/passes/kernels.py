"""Activation-backward kernels: ``g*(1 - y**2)`` and ``g*y*(1 - y)`` as one call each.

These are the products autograd runs for tanh and sigmoid; as one call with one output
buffer they save two temporaries and two passes over memory. The identities hold for
any arrays ``g`` and ``y``, so the rule needs no knowledge of where ``y`` came from; the
backends print :class:`TanhBackward` / :class:`SigmoidBackward` as their fused kernels
(torch ``aten.tanh_backward``; numpy helpers that work in one buffer).
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..nodes import Assign, Map, Program, Reduce


class TanhBackward(sp.Function):
    """tanh_backward(g, y) = g (1 - y²)."""

    nargs = 2


class SigmoidBackward(sp.Function):
    """sigmoid_backward(g, y) = g y (1 - y)."""

    nargs = 2


def kernels(stmts: list[Assign], program: Program) -> list[Assign]:
    out = []
    for stmt in stmts:
        op = stmt.op
        if isinstance(op, Map | Reduce) and op.body.has(sp.Mul):
            # 0-d arrays (the seed) are scalars; shared temporaries count as arrays.
            arrays = {s for s, v in op.views if program.shapes.get(v.src, (None,)) != ()}
            body = op.body.replace(lambda e: isinstance(e, sp.Mul),
                                   lambda e, arrays=arrays: _fuse(e, arrays))
            if body != op.body:
                stmt = replace(stmt, op=replace(op, body=body))
        out.append(stmt)
    return out


def _fuse(expr: sp.Mul, arrays: set[sp.Symbol]) -> sp.Expr:
    args = list(expr.args)
    for n, factor in enumerate(args):
        if not (isinstance(factor, sp.Add) and len(factor.args) == 2
                and sp.Integer(1) in factor.args):
            continue
        (other,) = [a for a in factor.args if a != 1]
        rest = args[:n] + args[n + 1:]
        neg = -other
        if neg.is_Pow and neg.exp == 2 and neg.base in arrays:
            kernel, y = TanhBackward, neg.base
        elif neg in arrays and neg in rest:
            kernel, y = SigmoidBackward, neg
            rest.remove(neg)
        else:
            continue
        coeff = sp.Mul(*(f for f in rest if not (f.free_symbols & arrays)))
        grad = sp.Mul(*(f for f in rest if f.free_symbols & arrays))
        if grad == 1:
            continue
        return coeff * kernel(grad, y)
    return expr
