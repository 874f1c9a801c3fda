"""Guards: run a backward statement only when a gradient that needs it was asked for.

A generated backward pass computes the gradient of every leaf that can have one (inputs,
targets, every parameter); at run time the caller says which it wants (torch's
``ctx.needs_input_grad``, numpy's ``wrt=``). This module reads a function's statements
(``targets``, ``reads``) and says, for each, which of the function's optional outputs
depend on it, as a Python condition over one flag per output. A statement that every
output needs, or that a mandatory output (the loss) needs, runs unconditionally.

Correctness rests on one property: a statement's set of dependent outputs contains the
set of every statement that reads it, so whenever a reader runs, what it reads was
computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class _Stmt(Protocol):
    @property
    def targets(self) -> tuple[str, ...]: ...

    @property
    def reads(self) -> frozenset[str]: ...


def guards(stmts: Sequence[_Stmt], flags: Mapping[str, str | None]) -> list[str]:
    """One condition per statement ('' = always run).

    ``flags``: output variable -> the name of the boolean that asks for it, or None for
    an output that is always computed. Conditions list flags in ``flags``' order."""
    optional = [out for out, flag in flags.items() if flag is not None]
    users: dict[str, set[str]] = {}
    sets: list[set[str]] = []
    for stmt in reversed(stmts):
        # a statement with several results runs when any of them is needed
        needed = set().union(*(users.get(t, ()) for t in stmt.targets))
        needed.update(t for t in stmt.targets if t in flags)
        for name in stmt.reads:
            users.setdefault(name, set()).update(needed)
        sets.append(needed)
    sets.reverse()
    out = []
    for needed in sets:
        if (not needed or any(flags[o] is None for o in needed)
                or needed >= set(optional)):
            out.append("")
        else:
            out.append(" or ".join(str(flags[o]) for o in optional if o in needed))
    return out
