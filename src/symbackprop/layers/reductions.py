"""Reductions written in formulas (``sum(x, axis=-1)``, ``mean``, ``max``, ``logsumexp``).

Each reduction becomes an op of its own in index notation, and the formula reads it back
at the kept axes, so the result broadcasts along the reduced ones (numpy's
``keepdims=True``). For ``g = x - mean(x, axis=-1)`` over ``[N, C]``:

    g_mean1[i0] = Sum(x[i0, r1], (r1, 0, C - 1)) / C      g[i0, i1] = x[i0, i1] - g_mean1[i0]

sympy then differentiates the reduction like any op: the adjoint of ``x`` through
``g_mean1`` is ``d_g_mean1[k0] / C``, broadcast over the reduced axis. A reduction being
its own tensor is also what keeps it stable and cheap: ``logsumexp`` is ``log(Sum(exp))``,
lowered max-shifted, and its derivative's ``Sum(exp)`` is read back as ``exp(lse)``
(``exp(x - lse)``, a softmax), as for the built-in cross-entropy.

``max`` is three tensors: ``M`` (``<layer>_top<n>``) = the maximum, an IR max reduction
that nothing differentiates through, the ties ``e = [x == M]`` (``<layer>_ties<n>``, a
comparison: no gradient either), and the value ``m = Sum(x * e) / Sum(e)``, equal to
``M``. Its derivative is ``e / count``: the gradient goes to the arg-max, shared evenly
between tied maxima, as ``torch.amax`` does.
"""

from __future__ import annotations

import sympy as sp

from .. import naming
from ..formula import FormulaProblem, normalise_axes
from ..graph import ArgMaxOver, Graph, MaxOver, Node, out_index
from ..spec import Where

_LABELS = {"sum": "sum", "mean": "mean", "max": "max", "logsumexp": "logsumexp"}


class IndexReducer:
    """The :data:`~symbackprop.formula.Reducer` of one formula whose element is indexed
    by ``indices`` over ``shape`` (the formula's broadcast shape)."""

    def __init__(self, graph: Graph, layer: str, where: Where,
                 indices: tuple[sp.Symbol, ...], shape: tuple[sp.Expr, ...],
                 own: dict[sp.Symbol, sp.Expr] | None = None) -> None:
        """``own``: index symbols of tensors read at their own axes (the parameters a
        loss formula reads), with their extents: a reduction without ``axis=``
        reduces them too."""
        self.graph = graph
        self.layer = layer
        self.where = where
        self.indices = indices
        self.shape = shape
        self.own = own or {}
        self.count = 0

    def __call__(self, kind: str, arg: sp.Expr, axes: tuple[int, ...] | None,
                 col: int) -> sp.Expr:
        rank = len(self.indices)
        if axes is None:
            normalised = tuple(range(rank))
        elif rank == 0:
            raise FormulaProblem(f"{kind}(..., axis=) of a formula with no axes", col)
        else:
            normalised = normalise_axes(axes, rank, col)
        free = arg.free_symbols
        spans = [(self.indices[b], self.shape[b]) for b in normalised
                 if self.indices[b] in free]
        if axes is None:
            spans += [(i, n) for i, n in self.own.items() if i in free]
        if not spans:
            return arg  # the argument has size 1 along every reduced axis
        kept = [b for b in range(rank) if b not in normalised and self.indices[b] in free]
        mapping: dict[sp.Expr, sp.Expr] = {self.indices[b]: out_index(j)
                                           for j, b in enumerate(kept)}
        limits = []
        for index, extent in spans:
            r = self.graph.reduction_index()
            mapping[index] = r
            limits.append((r, sp.Integer(0), extent - 1))
        inner = arg.xreplace(mapping)
        shape = tuple(self.shape[b] for b in kept)
        self.count += 1
        while any(naming.reduction(self.layer, k, self.count) in self.graph.nodes
                  for k in (kind, "top", "ties")):
            self.count += 1  # another formula of the same layer (a loss's terms)
        label = (f"{_LABELS[kind]} over " + ("every axis" if axes is None else
                                             "axis " + ", ".join(map(str, axes))))
        if kind == "sum":
            body = sp.Sum(inner, *limits)
        elif kind == "mean":
            body = sp.Sum(inner, *limits) / sp.Mul(*(n for _, n in spans))
        elif kind == "logsumexp":
            body = sp.log(sp.Sum(sp.exp(inner), *limits))
        else:
            body = self._max(inner, limits, shape, label)
        name = naming.reduction(self.layer, kind, self.count)
        node = self.graph.op(name, shape, body, layer=self.layer, where=self.where,
                             kind="reduction", label=label)
        if kind == "max":
            computed_as_maximum(node, self.layer, self.count)
        return node.element(tuple(self.indices[b] for b in kept))

    def _max(self, inner: sp.Expr, limits: list[tuple[sp.Symbol, sp.Expr, sp.Expr]],
             shape: tuple[sp.Expr, ...], label: str) -> sp.Expr:
        return max_over(self.graph, self.layer, self.where, self.count, inner, limits,
                        shape, label)


def computed_as_maximum(value: Node, layer: str, count: int) -> None:
    """Mark the node holding :func:`max_over`'s value: the forward pass computes it as
    the maximum that ``max_over`` added (``Lowerer.lower`` reads the mark)."""
    value.meta["maximum"] = naming.reduction(layer, "top", count)


def max_over(graph: Graph, layer: str, where: Where, count: int, inner: sp.Expr,
             limits: list[tuple[sp.Symbol, sp.Expr, sp.Expr]], shape: tuple[sp.Expr, ...],
             label: str, after: tuple[int, ...] | None = None,
             first_at: sp.Expr | None = None) -> sp.Expr:
    """The body of a max's value tensor (``inner`` maximised over ``limits``, the kept
    axes out_index(0..) of ``shape``); adds the maximum and the ties it reads, named
    after ``layer`` and ``count``. A max pooling is one, over each window.

    The ties' axes are the kept ones, then one per reduced index; with ``after``, the
    reduced index m's axis comes right after kept axis ``after[m]`` instead (a pooling's
    [N, C, i, a, j, b]: the windows of an image they tile are the image reshaped).

    The ties are a tensor of their own (not fused into the value): a comparison inside a
    sum would be folded out of it by sympy when differentiating. The caller marks the
    value's node ``meta["maximum"]`` = the maximum's name: the forward pass computes
    the value as the maximum itself (every tie equals it, so sum(x e) / sum(e) does),
    while the chain rule differentiates the sums (:func:`computed_as_maximum`).

    With ``first_at`` (the flat position of the element ``inner`` reads, in the kept
    axes and the reduced indices), only the first maximum of each window counts, as
    torch's max pooling routes its gradient: an integer tensor ``<layer>_arg<count>``
    (:class:`~symbackprop.graph.ArgMaxOver`, no gradient) holds where it lies, the ties
    are 1 at that position alone, and the value is ``sum(x e)`` (one tie per window)."""
    top = graph.op(naming.reduction(layer, "top", count), shape, MaxOver(inner, *limits),
                   layer=layer, where=where, kind="reduction",
                   label=label + " (the maximum itself)")
    top.meta["no_gradient"] = True
    slots: list[tuple[str, int]] = [("kept", j) for j in range(len(shape))]
    for m in range(len(limits)):
        if after is None:
            slots.append(("tap", m))
        else:
            slots.insert(slots.index(("kept", after[m])) + 1, ("tap", m))
    axes = [out_index(n) for n in range(len(slots))]
    kept = tuple(axes[slots.index(("kept", j))] for j in range(len(shape)))
    at = {limits[m][0]: axes[slots.index(("tap", m))] for m in range(len(limits))}
    at.update({out_index(j): kept[j] for j in range(len(shape))})  # one simultaneous swap
    tie_shape = tuple(shape[n] if kind == "kept" else limits[n][2] + 1 for kind, n in slots)
    if first_at is None:
        condition = sp.Eq(inner.xreplace(at), top.element(kept))
        what = "1 where an element equals the maximum"
    else:
        arg = graph.op(naming.reduction(layer, "arg", count), shape,
                       ArgMaxOver(inner, *limits), layer=layer, where=where,
                       kind="reduction", label=label + " (where its first maximum lies, "
                       "as a flat position; no gradient)")
        arg.meta["no_gradient"] = True
        arg.dtype = "int64"
        condition = sp.Eq(first_at.xreplace(at), arg.element(kept))
        what = "1 at the first maximum"
    tie = graph.op(naming.reduction(layer, "ties", count), tie_shape,
                   sp.Piecewise((sp.Integer(1), condition), (sp.Integer(0), True)),
                   layer=layer, where=where, kind="reduction",
                   label=f"{label} ({what}; no gradient)")
    tie.meta["no_gradient"] = True
    if first_at is not None:
        tie.meta["one_hot_of"] = arg.name
    ties = tie.element(tuple(out_index(n) if kind == "kept" else limits[n][0]
                             for kind, n in slots))
    if first_at is not None:
        return sp.Sum(inner * ties, *limits)
    return sp.Sum(inner * ties, *limits) / sp.Sum(ties, *limits)
