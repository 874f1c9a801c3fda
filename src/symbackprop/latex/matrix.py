"""Matrix notation recognised by structure: an index-notation body as arrays, or nothing.

Nothing here knows a layer type. A ``Sum`` over one index of two tensor groups is a
matrix product (with transposes where the indices ask for them, a column of ones where
one side is missing), an elementwise body is a function applied elementwise with
``\\odot`` between tensor factors, and whatever has no matrix form gives ``None``: the
document then shows the index form only.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import sympy as sp
from sympy.core.parameters import global_parameters

from .notation import (
    IndexPrinter,
    MatrixPrinter,
    Names,
    RowSoftmax,
    _integer_symbols,
    _is_plain_array,
    _needs_paren,
    _paren,
)
from .rewrite import _bound, _build_neutral, _Node, _set_distribute


class MatrixForms:
    """Matrix notation for the expressions of one derivation (its names and functions)."""

    def __init__(self, names: Names, fnames: Mapping[str, str]) -> None:
        self.names = names
        self.graph = names.graph
        self.fnames = fnames
        self.dims = set(self.graph.dims.values())

    def idx(self, expr: sp.Expr, letters: Mapping[sp.Symbol, str]) -> str:
        return IndexPrinter(self.names, letters, self.fnames).doprint(expr)

    def matrix(self, expr: sp.Expr, axes: tuple[sp.Symbol, ...]) -> str | None:
        """``expr`` (indexed by ``axes``) in matrix notation, or None when it has none."""
        if len(axes) > 2:
            return None
        verbatim: dict[sp.Symbol, str] = {}
        products: set[sp.Symbol] = set()
        cache: dict[tuple[str, str], sp.Symbol] = {}

        def holder(key: tuple[str, str], latex: str, product: bool = False) -> sp.Symbol:
            if key not in cache:
                # Named after the tensor, so sympy orders terms as in the index form.
                stem = key[0] if key[1] != "p" else "~" + key[0]
                taken = {str(v) for v in cache.values()}
                label = next(f"{stem}{'~' * n}" for n in itertools.count()
                             if f"{stem}{'~' * n}" not in taken)
                sym = sp.Symbol(label)
                cache[key] = sym
                verbatim[sym] = latex
                if product:
                    products.add(sym)
            return cache[key]

        # Two passes: ``walk`` places the arrays (in the caller's sympy setting) and
        # returns a plan; ``build`` then makes every node of it under distribute(False),
        # switching the flag (which clears sympy's cache) twice, not twice per node.
        def walk(e: sp.Expr, ax: tuple[sp.Symbol, ...]) -> object:
            if isinstance(e, sp.Indexed):
                name = e.base.name
                idx = tuple(e.indices)
                if idx == ax:
                    return holder((name, "n"), self.names.array(name))
                if len(ax) == 2 and idx == (ax[1], ax[0]):
                    return holder((name, "t"), self.names.array(name, transpose=True))
                if 0 < len(idx) < len(ax) and idx == ax[len(ax) - len(idx):]:
                    return holder((name, "n"), self.names.array(name))
                return None
            if isinstance(e, sp.Sum):
                latex = self._contraction(e, ax)
                if latex is None:
                    return None
                return holder((latex, "p"), latex, product=True)
            if isinstance(e, sp.KroneckerDelta):
                return None
            if isinstance(e, sp.Symbol):
                return None if e.is_integer and e not in self.dims else e
            if not e.args:
                return e
            if isinstance(e, RowSoftmax):
                (z,) = e.args
                name = z.base.name
                if tuple(z.indices) != ax:
                    return None
                return RowSoftmax(holder((name, "n"), self.names.array(name)))
            args = [walk(a, ax) for a in e.args]
            if any(a is None for a in args):
                return None
            return _Node(e.func, args)

        def build(plan: object) -> sp.Expr:
            if isinstance(plan, _Node):
                return plan.func(*(build(a) for a in plan.args))
            return plan  # type: ignore[return-value]

        plan = walk(expr, axes)
        if plan is None:
            return None
        if isinstance(plan, _Node):
            outer = global_parameters.distribute
            # Most plans build the same under either setting; only the others pay for
            # the switch (which clears sympy's whole cache, twice).
            placed = _build_neutral(plan) if outer else None
            if placed is None:
                _set_distribute(False)
                try:
                    placed = build(plan)
                finally:
                    _set_distribute(outer)
        else:
            placed = plan
        return MatrixPrinter(self.names, self.fnames, verbatim, products).doprint(placed)

    def _contraction(self, e: sp.Sum, axes: tuple[sp.Symbol, ...]) -> str | None:
        """A single-index Sum of tensor groups as a matrix (or matrix-vector) product."""
        if len(e.limits) != 1:
            return None
        (c, _, _), = e.limits
        groups: dict[sp.Symbol | None, list[sp.Expr]] = {}
        scalars: list[sp.Expr] = []
        for f in sp.Mul.make_args(e.function):
            ids = _integer_symbols(f) - set(self.dims)
            inner = {s for s in ids if s in axes}
            if not ids:
                scalars.append(f)
            elif len(inner) > 1:
                return None
            else:
                groups.setdefault(next(iter(inner)) if inner else None, []).append(f)
        if any(s not in (*axes, c) for g in groups.values() for f in g
               for s in _integer_symbols(f) - set(self.dims)
               if s not in _bound(f)):
            return None
        scale = sp.Mul(*scalars)
        lead = "" if scale == 1 else self.idx(scale, {}) + " "
        if len(axes) == 2:
            a, b = axes
            left = groups.pop(a, []) + groups.pop(None, [])
            right = groups.pop(b, [])
            if groups or not left or not right:
                return None
            lm = self._oriented(sp.Mul(*left), a, c)
            rm = self._oriented(sp.Mul(*right), c, b)
            if lm is None or rm is None:
                return None
            return lead + f"{lm} {rm}"
        if len(axes) == 1:
            (a,) = axes
            mat = groups.pop(a, [])
            vec = groups.pop(None, [])
            if groups or not mat:
                return None
            if vec:
                mm = self._oriented(sp.Mul(*mat), a, c)
                vm = self.matrix(sp.Mul(*vec), (c,))
                if mm is None or vm is None:
                    return None
                return lead + f"{mm} {_paren(vm)}"
            # Sum over c of G[c, a] (1^T G: column sums) or of G[a, c] (G 1: row sums).
            options = []
            cols = self._oriented(sp.Mul(*mat), c, a)
            if cols is not None:
                options.append(rf"\mathbf{{1}}^{{\top}} {cols}")
            rows = self._oriented(sp.Mul(*mat), a, c)
            if rows is not None:
                options.append(rf"{rows} \mathbf{{1}}")
            if not options:
                return None
            return lead + min(options, key=lambda o: (o.count(r"\top") - 1 if o.startswith(
                r"\mathbf{1}") else o.count(r"\top"), options.index(o)))
        return None

    def _oriented(self, e: sp.Expr, a: sp.Symbol, b: sp.Symbol) -> str | None:
        """``e[a, b]`` as a matrix, choosing between ``E`` and ``(E')^T`` by transposes."""
        straight = self.matrix(e, (a, b))
        flipped = self.matrix(e, (b, a))
        if flipped is not None:
            flipped = (flipped + r"^{\top}" if _is_plain_array(flipped) and "^" not in flipped
                       else rf"\left({flipped}\right)^{{\top}}")
        options = [o for o in (straight, flipped) if o is not None]
        if not options:
            return None
        best = min(options, key=lambda s: (s.count(r"\top"), options.index(s)))
        if best is straight and _needs_paren(best):
            return rf"\left({best}\right)"
        return best

