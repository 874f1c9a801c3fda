"""Memory: free each array after its last use, and let a dying operand take the result.

``frees``: after the statement that reads an array last, ``del`` it — arrays this
function computed itself or was handed (``owned``) and that are not among its outputs
(``keep``) — so peak memory is what is live, not everything made. ``in_place``: a
one-argument elementwise function whose argument dies at that statement and has the
result's shape may write into the argument's buffer (numpy ``tanh(z, out=z)``); only
arrays this function allocated itself qualify, never an argument or an alias.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import sympy as sp

from ..nodes import Assign, Map, Program


def memory(stmts: list[Assign], program: Program, *, keep: Iterable[str],
           owned: Iterable[str] = ()) -> list[Assign]:
    keep = set(keep)
    last_use: dict[str, int] = {}
    defined = {t for stmt in stmts for t in stmt.targets} | set(owned)
    for i, stmt in enumerate(stmts):
        for name in stmt.reads:
            last_use[name] = i
    dead: dict[int, list[str]] = {}
    for name, i in last_use.items():
        if name in defined and name not in keep:
            dead.setdefault(i, []).append(name)
    aliases = [s for s in stmts if isinstance(s.op, Map) and isinstance(s.op.body, sp.Symbol)]
    # A bare view (x.T, x.reshape(...)) shares its source's memory: neither it nor its
    # source may take a result in place while the other may still be read.
    fresh = ({t for s in stmts for t in s.targets} - {s.target for s in aliases}
             - {name for s in aliases for name in s.reads})
    order = {t: n for n, stmt in enumerate(stmts) for t in stmt.targets}
    out = []
    for i, stmt in enumerate(stmts):
        names = sorted(dead.get(i, []), key=lambda n: (order.get(n, -1), n))
        in_place = _in_place(stmt, set(names) & fresh, program)
        out.append(replace(stmt, frees=tuple(names), in_place=in_place))
    return out


def _in_place(stmt: Assign, dying: set[str], program: Program) -> str:
    op = stmt.op
    if not isinstance(op, Map) or not isinstance(op.body, sp.Function) \
            or len(op.body.args) != 1:
        return ""
    (arg,) = op.body.args
    view = op.view_of(arg) if isinstance(arg, sp.Symbol) else None
    shape = program.shapes.get(stmt.target)
    if (view is None or not view.is_identity or view.src not in dying or not shape
            or program.shapes.get(view.src) != shape):
        return ""
    return view.src
