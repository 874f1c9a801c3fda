"""``r = c*sum(x, last axis); d = r*exp(t) + g`` with ``g = -c*x`` ->
``d = log_softmax_backward(g, t)``.

Through ``t = a - logsumexp(a)`` the chain rule gives ``a``'s adjoint as the direct part
``g`` (what reaches ``a`` through ``t``) plus the log-sum-exp's adjoint ``r`` times
``exp(t)``, with ``r = -sum(g)`` along the softmax axis. Softmax cross-entropy's
derivation states ``r`` through the targets (``c * sum(label)``), so the statements are a
row sum, a scaled copy of it and a four-term elementwise body: six passes over the
array. The same numbers come from one kernel, ``g - exp(t) * sum(g)`` (torch's
``_log_softmax_backward_data``, autograd's own log-softmax backward; numpy: one row sum,
one exponential, products in place), once ``g`` is an array of its own: the adjoint of
``t``, named so.

The identity ``r*exp(t) + g = g - exp(t)*sum(g)`` holds for any ``t`` once
``r = -sum(g)``, so the rule needs no knowledge of where ``t`` came from: it checks, by
expanding the sympy bodies with every array read as it is standing for the array itself
(the three statements bind their own symbols), that ``g + c*x`` is zero elementwise,
with ``x`` the summed body and ``c`` the scalar factor of ``r``; reads through any other
view stay distinct symbols and so never cancel.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ... import naming
from ..nodes import (
    Assign,
    LogSoftmax,
    LogSoftmaxBackward,
    Map,
    Program,
    Reduce,
    Seed,
    View,
    by_source,
    free_name,
    join_comments,
    ordered,
    readers,
    row_view,
)


def _zero_d(name: str, stmts: list[Assign], where: dict[str, int], program: Program) -> bool:
    """Array ``name`` is 0-d: by the program's shapes, or (a temporary without one) made
    by a body of 0-d arrays and dimensions alone, or the seed dL/dL."""
    if name in program.shapes:
        return len(program.shapes[name]) == 0
    op = stmts[where[name]].op if name in where else None
    if isinstance(op, Seed):
        return True
    return isinstance(op, Map) and all(
        isinstance(v, View) and _zero_d(v.src, stmts, where, program) for _, v in op.views)


def _row_sum(stmt: Assign, rank: int) -> sp.Expr | None:
    """The summed body ``x`` when ``stmt`` sums it over the last of ``rank`` axes, every
    array read as it is (so its placeholders name the arrays, as in any other body)."""
    op = stmt.op
    if (not isinstance(op, Reduce) or op.kind != "sum" or op.rank != rank
            or op.axes != (rank - 1,)):
        return None
    if not all(isinstance(v, View) and v.is_identity for _, v in op.views):
        return None
    return op.body


def _rank(name: str, stmts: list[Assign], where: dict[str, int], program: Program) -> int:
    """The rank of array ``name``: from the program's shapes, or for a temporary that
    has none, from the log-softmax that makes it (-1 when unknown)."""
    if name in program.shapes:
        return len(program.shapes[name])
    op = stmts[where[name]].op if name in where else None
    if isinstance(op, LogSoftmax) and op.src in program.shapes:
        return len(program.shapes[op.src])
    return -1


def log_softmax_backward(stmts: list[Assign], program: Program,
                         protected: set[str]) -> list[Assign]:
    count = readers(stmts)
    where = {s.target: n for n, s in enumerate(stmts)}
    taken = {s.target for s in stmts} | {r for s in stmts for r in s.reads}
    out: list[Assign | None] = list(stmts)
    added: dict[int, Assign] = {}
    # dL/dL, where the function makes it rather than takes it, is exactly 1: the
    # derivation folds it into some statements and not others (bodies are compared with
    # each array read as it is standing for the array's name: by_source)
    ones = {sp.Symbol(s.target): sp.Integer(1) for s in stmts if isinstance(s.op, Seed)}
    for pos, stmt in enumerate(stmts):
        op = stmt.op
        if not isinstance(op, Map) or stmt.phase != "backward":
            continue
        views = dict(op.views)
        rank = next((v.out_rank for v in views.values()
                     if isinstance(v, View) and v.out_rank), 0)
        for sym, view in op.views:
            if not row_view(view, rank) or count.get(view.src) != 1 or view.src in protected:
                continue
            # d = r*exp(t) + g, linear in r, with t an array of the output's shape
            slope = sp.diff(op.body, sym)
            if sym in slope.free_symbols or not isinstance(slope, sp.exp):
                continue
            t = slope.args[0]
            t_view = views.get(t)
            if (not isinstance(t_view, View) or not t_view.is_identity
                    or _rank(t_view.src, stmts, where, program) != rank
                    or stmt.target not in program.shapes):
                continue
            g = sp.expand(op.body - sym * slope)
            if sym in g.free_symbols or not any(
                    isinstance(v, View) and v.is_identity
                    and _rank(v.src, stmts, where, program) == rank
                    for v in (views.get(a) for a in g.free_symbols)):
                continue  # g reads no array of the rows' shape: not this pattern
            # r = c * (row sum), or the row sum itself
            r_stmt = out[where[view.src]] if view.src in where else None
            if r_stmt is None:
                continue
            dead = [r_stmt]
            s_stmt = r_stmt
            scale: sp.Expr = sp.Integer(1)
            x = _row_sum(r_stmt, rank)
            if x is None and isinstance(r_stmt.op, Map):
                r_views = dict(r_stmt.op.views)
                arrays = [s for s, v in r_views.items() if not isinstance(v, View)
                          or not _zero_d(v.src, stmts, where, program)]
                if len(arrays) != 1:
                    continue
                (inner,) = arrays
                inner_view = r_views[inner]
                scale = sp.diff(r_stmt.op.body, inner)
                if (not isinstance(inner_view, View) or not inner_view.is_identity
                        or inner in scale.free_symbols
                        or sp.expand(r_stmt.op.body - scale * inner) != 0
                        or inner_view.src not in where or inner_view.src in protected
                        or count.get(inner_view.src) != 1):
                    continue
                s_stmt = out[where[inner_view.src]]
                x = _row_sum(s_stmt, rank) if s_stmt is not None else None
                if x is None:
                    continue
                dead.append(s_stmt)
            if x is None:
                continue
            total = (by_source(g, views) + by_source(scale, r_stmt.op.views)
                     * by_source(x, s_stmt.op.views))
            if sp.expand(total.xreplace(ones)) != 0:
                continue
            grad = naming.adjoint(t_view.src)
            if not free_name(grad, program.shapes[stmt.target], taken, program):
                continue
            taken.add(grad)
            program.shapes[grad] = program.shapes[stmt.target]
            comment = ""
            for gone in reversed(dead):
                comment = join_comments(comment, gone.comment)
                out[where[gone.target]] = None
            g_views = ordered({s: v for s, v in op.views if s in g.free_symbols})
            t_op = stmts[where[t_view.src]].op if t_view.src in where else None
            made = (f" ({t_view.src} = log_softmax({t_op.src}))"
                    if isinstance(t_op, LogSoftmax) else "")
            added[pos] = Assign(grad, Map(g, g_views), f"dL/d{t_view.src}{made}", stmt.phase)
            what = (f"log-softmax backward: {stmt.target} = {grad} - exp({t_view.src})"
                    f"*sum({grad}), in one call")
            out[pos] = replace(stmt, op=LogSoftmaxBackward(grad, t_view.src, rank - 1),
                               comment=join_comments(join_comments(comment, stmt.comment),
                                                     what))
            break
    result: list[Assign] = []
    for pos, stmt in enumerate(out):
        if pos in added:
            result.append(added[pos])
        if stmt is not None:
            result.append(stmt)
    return result
