"""``lse = logsumexp(a, last axis); t = a - lse`` -> ``t = log_softmax(a)``, and
``p = exp(a - lse)`` -> ``p = softmax(a)``, when nothing else reads ``lse``.

Softmax cross-entropy's forward and its gradient share ``a - lse`` (CSE finds it); the
backends compute it in one call that never materialises ``lse`` (torch's log_softmax
kernel; numpy's helper shifts by the row max once instead of twice). A softmax layer (and
attention's probabilities) computes ``exp(a - lse)``: one softmax call instead of a
logsumexp reduction and a second exponential over the whole array.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..nodes import Assign, LogSoftmax, Map, Program, Reduce, Softmax, join_comments, readers


def log_softmax(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    count = readers(stmts)
    out = list(stmts)
    for lse in stmts:
        op = lse.op
        if (not isinstance(op, Reduce) or op.kind != "logsumexp" or lse.target in protected
                or count.get(lse.target) != 1 or op.axes != (op.rank - 1,)):
            continue
        (sym, view) = op.views[0] if len(op.views) == 1 else (None, None)
        if view is None or op.body != sym or not view.is_identity:
            continue
        src = view.src
        for pos, stmt in enumerate(out):
            if not isinstance(stmt.op, Map) or lse.target not in stmt.reads:
                continue
            views = dict(stmt.op.views)
            by_src = {v.src: s for s, v in views.items()}
            a, m = by_src.get(src), by_src.get(lse.target)
            if a is None or m is None or stmt.op.body not in (a - m, sp.exp(a - m)):
                continue
            kind = LogSoftmax if stmt.op.body == a - m else Softmax
            if not views[a].is_identity or views[a].out_rank != op.rank:
                continue
            lse_view = views[m]
            if lse_view.places != tuple(range(op.rank - 1)) or any(
                    p is not None for p in lse_view.picks):
                continue
            what = (f"log-softmax: {stmt.target} = {src} - {lse.target}" if kind is LogSoftmax
                    else f"softmax: {stmt.target} = exp({src} - {lse.target})")
            out[pos] = replace(stmt, op=kind(src, op.rank - 1),
                               comment=join_comments(lse.comment, f"{what}, in one call"))
            out.remove(lse)
            break
    return out

