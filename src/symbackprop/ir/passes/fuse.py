"""Fusion: an elementwise temporary read once is substituted into its reader.

A :class:`Map` whose target is a temporary (``tmp...``), read exactly once, by a later
``Map`` or ``Reduce`` of the same phase, through an identity view (same axes, no
broadcasting), becomes part of its reader's body: one fused expression per elementwise
region, one array fewer.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ...naming import TEMP_PREFIX
from ..nodes import Assign, Map, Program, Reduce, join_comments, ordered


def _occurrences(stmt: Assign, name: str) -> int:
    """How often ``stmt`` reads ``name`` as a plain identity placeholder; 2 for any
    other kind of read (never fuse into those)."""
    op = stmt.op
    if not isinstance(op, Map | Reduce):
        return 2 if name in op.reads else 0
    total = 0
    for sym, view in op.views:
        if name not in view.reads:
            continue
        count = op.body.count(sym)
        if count and not (view.is_identity and view.src == name and sym == sp.Symbol(name)):
            return 2
        total += count
    return total


def fuse(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    """One pass in program order; a fused statement's reads move to its reader, so a
    chain of temporaries collapses into the last one (cost linear in statements)."""
    out: list[Assign | None] = list(stmts)
    users: dict[str, list[int]] = {}
    for n, stmt in enumerate(out):
        for name in stmt.reads:  # type: ignore[union-attr]
            users.setdefault(name, []).append(n)
    for pos, stmt in enumerate(out):
        if (stmt is None or not isinstance(stmt.op, Map) or stmt.target in protected
                or not stmt.target.startswith(TEMP_PREFIX)):
            continue
        readers = sorted({n for n in users.get(stmt.target, []) if n > pos
                          and out[n] is not None})
        if len(readers) != 1:
            continue
        (at,) = readers
        reader = out[at]
        assert reader is not None
        if (_occurrences(reader, stmt.target) != 1 or reader.phase != stmt.phase
                or not isinstance(reader.op, Map | Reduce)):
            continue
        sym = sp.Symbol(stmt.target)
        body = reader.op.body.xreplace({sym: stmt.op.body})
        views = dict(reader.op.views)
        views.pop(sym, None)
        views.update(stmt.op.views)
        out[at] = replace(reader, op=replace(reader.op, body=body, views=ordered(views)),
                          comment=join_comments(stmt.comment, reader.comment))
        out[pos] = None
        for name in stmt.reads:
            users.setdefault(name, []).append(at)
    return [s for s in out if s is not None]
