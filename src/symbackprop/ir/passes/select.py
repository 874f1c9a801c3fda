"""Dead-code elimination: keep the statements an output (transitively) reads."""

from __future__ import annotations

from collections.abc import Sequence

from ..nodes import Assign


def select(stmts: Sequence[Assign], outputs: Sequence[str]) -> list[Assign]:
    needed = set(outputs)
    kept: list[Assign] = []
    for stmt in reversed(stmts):
        if stmt.target in needed:
            kept.append(stmt)
            needed |= stmt.reads
    kept.reverse()
    return kept
