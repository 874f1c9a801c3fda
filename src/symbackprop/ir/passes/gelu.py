"""GPT-2's tanh GELU and the chain rule through it, as one call each.

``gelu_tanh`` is a formula (``layers/activations.py``); sympy differentiates it and CSE
shares ``tanh(√(2/π) (z + 0.044715 z³))`` and ``z/2`` between the forward value and the
derivative. torch computes that ``tanh`` slowly on CPU (~165 µs over [8, 64, 128]
float32, where its fused ``gelu`` kernel takes ~110 µs in all), so a statement whose body
— with those shared temporaries put back — is exactly the formula becomes
``GeluTanh(z)``, and one that is exactly ``g`` times sympy's derivative of it becomes
``GeluTanhBackward(g, z)``: torch's ``gelu(z, approximate="tanh")`` and
``gelu_backward``, autograd's own pair; numpy prints the formula and sympy's derivative
of it (its ``tanh`` is fast). The check expands both sides (polynomials in z, g and the
tanh), so nothing else matches.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import sympy as sp

from ...naming import TEMP_PREFIX
from ..nodes import Assign, Map, Program, View, join_comments, ordered, readers

_U = sp.Dummy("u")


@lru_cache(maxsize=1)
def formula() -> tuple[sp.Expr, sp.Expr]:
    """The activation's own formula in ``u`` (from the registry, not restated here) and
    sympy's derivative of it."""
    from ...layers.base import ACTIVATIONS

    value = ACTIVATIONS["gelu_tanh"].formula(_U, {})
    return value, sp.diff(value, _U)


class GeluTanh(sp.Function):
    """gelu_tanh(z) = z/2 (1 + tanh(√(2/π) (z + 0.044715 z³)))."""

    nargs = 1


class GeluTanhBackward(sp.Function):
    """gelu_tanh_backward(g, z) = g · gelu_tanh'(z)."""

    nargs = 2


def expanded(expr: sp.Expr) -> sp.Expr:
    """``GeluTanh(z)`` as the formula, ``GeluTanhBackward(g, z)`` as g times sympy's
    derivative of it (what a backend without the kernels prints)."""
    value, prime = formula()
    if isinstance(expr, GeluTanh):
        return value.xreplace({_U: expr.args[0]})
    grad, z = expr.args
    return grad * prime.xreplace({_U: z})


def _same(expr: sp.Expr, target: sp.Expr) -> bool:
    return sp.expand(expr - target) == 0


def gelu(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    if not any(isinstance(s.op, Map) and s.op.body.has(sp.tanh) for s in stmts):
        return stmts
    count = readers(stmts)
    small: dict[str, Assign] = {}  # Map temporaries a GELU body may have been cut into
    out: list[Assign | None] = list(stmts)
    changed: set[str] = set()
    for pos, stmt in enumerate(stmts):
        op = stmt.op
        if not isinstance(op, Map):
            continue
        if stmt.target.startswith(TEMP_PREFIX) and sp.count_ops(op.body) <= 12:
            small[stmt.target] = stmt
        body, views = op.body, dict(op.views)
        for sym, view in op.views:
            source = small.get(view.src)
            if source is None or source is stmt or not (isinstance(view, View)
                                                        and view.is_identity):
                continue
            body = body.xreplace({sym: source.op.body})  # type: ignore[union-attr]
            views.pop(sym)
            views.update(source.op.views)  # type: ignore[union-attr]
        if not isinstance(body, sp.Expr) or not body.has(sp.tanh):
            continue  # (a condition such as tanh(x) + x > 0 is no GELU)
        z = next((s for s in _arguments(body) if s in views), None)
        if z is None:
            continue
        value, prime = formula()
        if _same(body, value.xreplace({_U: z})):
            new_body = GeluTanh(z)
            what = f"gelu_tanh({z}), in one call"
        else:
            prime = prime.xreplace({_U: z})
            grads = [g for g in body.free_symbols if g in views and g != z
                     and _same(body, g * prime)]
            if not grads:
                continue
            new_body = GeluTanhBackward(grads[0], z)
            what = f"gelu_tanh'({z}) times {grads[0]}, in one call"
        keep = {s: v for s, v in views.items() if s in new_body.free_symbols}
        out[pos] = replace(stmt, op=Map(new_body, ordered(keep)),
                           comment=join_comments(stmt.comment, what))
        changed.add(stmt.target)
    if not changed:
        return stmts
    # the shared temporaries nothing reads any more
    live = readers(s for s in out if s is not None)
    return [s for s in out if s is not None and not (
        s.target in small and s.target not in protected and s.target not in changed
        and live.get(s.target, 0) == 0 and count.get(s.target, 0) > 0)]


def _arguments(body: sp.Expr) -> list[sp.Symbol]:
    """The symbols z inside ``tanh(k (z + a z³))``: the GELU's argument."""
    found = []
    for node in body.atoms(sp.tanh):
        free = node.args[0].free_symbols
        if len(free) == 1:
            found.append(next(iter(free)))
    return found
