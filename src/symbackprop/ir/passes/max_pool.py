"""``d_x = window_add(g[..., i, None, j, None] * ties)`` -> ``d_x = max_pool_backward(g, arg)``;
a pooling's maxima, where its arg-max indices are computed too, read at them.

A max pooling routes each window's gradient to its first maximum: the chain rule through
the value ``sum_{a,b} x[n, c, s*i + a, s*j + b] e[n, c, i, a, j, b]`` gives the adjoint
``g`` times the one-hot ties ``e`` added back over the windows (a window-add). The ties
are the one-hot of the pooling's arg-max indices (``Program.one_hots``, recorded by the
lowering from the graph), so the same numbers come from adding each ``g`` at its
window's arg-max position: no ties array of the windows' size, no product, one kernel
(numpy: a bincount; torch: ``scatter_add_``, what ``max_pool2d``'s own backward does).

Where a function computes both a pooling's maxima and its arg-max indices, one pooling
gives both (the statement's ``also`` names the indices): torch's ``max_pool2d`` computes
them in one pass, and numpy's helper finds the maxima on the way to the indices.

The backward rule fires only on that exact shape: a window-add of a product of two
reads, one the ties as they are, the other an array laid out on the windows' positions
(broadcast along the taps), with the window-add's strides and sizes those of the
pooling. The ties statement then has no reader left and is dropped with whatever only
it read.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..nodes import (
    Assign,
    Map,
    MaxPool,
    MaxPoolBackward,
    Program,
    TakeAt,
    View,
    WindowAdd,
    join_comments,
    readers,
)
from .select import select


def max_pool(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    """The backward rule, then the maxima read at the indices (see the module)."""
    if not program.one_hots:
        return stmts
    return _values_at_indices(_backward(stmts, program, protected))


def _values_at_indices(stmts: list[Assign]) -> list[Assign]:
    """A pooling's maxima and its arg-max indices, both wanted: one statement with both
    results, at the maxima's place (a second pooling for the values alone would cost
    as much again, and reading them at the indices another gather)."""
    indices = {(s.op.src, s.op.kernel, s.op.stride): s for s in stmts
               if isinstance(s.op, MaxPool) and s.op.indices}
    if not indices:
        return stmts
    out: list[Assign] = []
    placed: set[str] = set()
    for stmt in stmts:
        op = stmt.op
        if stmt.target in placed:
            continue  # indices moved up to the values they come with
        arg = indices.get((op.src, op.kernel, op.stride)) if (
            isinstance(op, MaxPool) and not op.indices and not stmt.also) else None
        if arg is not None and arg.target not in placed:
            # the indices move up to the values' place: they read only the pooled array
            stmt = replace(stmt, also=(arg.target,),
                           comment=join_comments(stmt.comment, arg.comment))
            placed.add(arg.target)
        elif arg is not None:  # the indices came first: the values are read at them
            stmt = replace(stmt, op=TakeAt(op.src, arg.target, len(op.kernel)))
        out.append(stmt)
        placed.add(stmt.target)
    return out


def _backward(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    """Each window-add of ``g * ties`` (ties the one-hot of a pooling's indices, the
    window-add's geometry the pooling's) as one ``MaxPoolBackward``."""
    by_target = {s.target: s for s in stmts}
    count = readers(stmts)
    out = list(stmts)
    changed = False
    for pos, stmt in enumerate(out):
        op = stmt.op
        if not isinstance(op, WindowAdd) or count.get(op.values) != 1:
            continue
        values = by_target.get(op.values)
        if values is None or values.target in protected:
            continue
        found = _gradient_times_ties(values, program)
        if found is None:
            continue
        grad, ties = found
        arg = by_target.get(program.one_hots[ties])
        if arg is None or not isinstance(arg.op, MaxPool) or not arg.op.indices:
            continue
        pool = arg.op
        d = len(pool.kernel)
        rank = len(op.shape)
        expected = tuple((rank - d + m, pool.stride[m], 0,
                          int(program.shapes[arg.target][rank - d + m]), pool.kernel[m])
                         for m in range(d))
        if op.slides != expected:
            continue
        out[pos] = replace(stmt, op=MaxPoolBackward(grad, arg.target, pool.kernel,
                                                    pool.stride, op.shape),
                           comment=join_comments(values.comment, stmt.comment))
        changed = True
    if not changed:
        return stmts
    return select(out, sorted(protected))


def _gradient_times_ties(stmt: Assign, program: Program) -> tuple[str, str] | None:
    """(g, ties) when ``stmt`` is ``g * ties``: the ties (a one-hot of ``program``) read
    as they are, ``g`` read on the ties' position axes, broadcast along the taps."""
    op = stmt.op
    if not isinstance(op, Map):
        return None
    views = dict(op.views)
    factors = sp.Mul.make_args(op.body)
    if len(factors) != 2 or not all(f in views for f in factors):
        return None
    first, second = (views[f] for f in factors)
    for ties, grad in ((first, second), (second, first)):
        if not (isinstance(ties, View) and ties.is_identity and ties.src in program.one_hots
                and isinstance(grad, View) and all(p is None for p in grad.picks)):
            continue
        rank = ties.out_rank
        d = rank - len(grad.places)
        lead = rank - 2 * d
        positions = tuple(range(lead)) + tuple(lead + 2 * m for m in range(d))
        if grad.places == positions:
            return grad.src, ties.src
    return None
