"""Lowering: the derivation's index notation -> IR statements.

Every forward tensor and every adjoint is an index expression (a sympy body over
``Indexed`` references, with ``Sum`` for contractions). One body is lowered once:

* ``Sum`` of a product of arrays -> pairwise :class:`~.nodes.MatMul` / :class:`~.nodes.Einsum`
  steps in the order :mod:`.contract` finds cheapest;
* ``Sum`` of one array -> :class:`~.nodes.Reduce` (``x.sum(axis)``); any other ``Sum`` ->
  a reduction of a fused elementwise body;
* ``log(Sum(exp(f)))`` -> a ``logsumexp`` :class:`~.nodes.Reduce` (max-shifted when
  printed). This is the one place log-sum-exp is recognised;
* everything else -> one :class:`~.nodes.Map` whose array references are views.

An index that is a mixed-radix digit sum of the axes (``x[i0, 8*i2 + i3]``,
``g[k0, floor(k2/8), Mod(k2, 8)]``: a reshape and its adjoint) becomes a
:class:`~.nodes.Reshape` view. An index ``s*i + a - p`` that slides a window over an
axis (a convolution's or pooling's read, ``i`` the position, ``a`` the kernel tap) becomes
a :class:`~.nodes.Window` view, and a sum of ``v * delta(s*i + a - p, k)`` over ``i`` and
``a`` (its adjoint, which the chain rule leaves) a :class:`~.nodes.WindowAdd`. Any other
index expression is refused here with a :class:`~symbackprop.errors.GraphError`, never
printed.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp
from sympy.core.relational import Relational

from .. import naming
from ..backprop import Derivation, target_indices
from ..derive import radix
from ..derive.calculus import is_index_symbol
from ..errors import GraphError
from ..graph import ArgMaxOver, MaxOver, ref, ref_name
from . import contract
from .comments import backward_comment, forward_comment
from .nodes import (
    AnyView,
    Assign,
    Einsum,
    Full,
    Gather,
    Iota,
    Map,
    MatMul,
    MaxPool,
    Phase,
    Program,
    Reduce,
    Reshape,
    ScatterAdd,
    Seed,
    Slide,
    Stack,
    View,
    Views,
    Window,
    WindowAdd,
    ordered,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def is_logsumexp(expr: sp.Expr) -> bool:
    """``log(sum_c exp(f))``: a log-sum-exp over the sum's indices."""
    return (isinstance(expr, sp.log) and isinstance(expr.args[0], sp.Sum)
            and isinstance(expr.args[0].function, sp.exp))


class Lowerer:
    """Turns a :class:`Derivation` into a :class:`Program`."""

    def __init__(self, deriv: Derivation, *, seed_argument: bool) -> None:
        """``seed_argument``: dL/dL arrives as an argument (autograd's grad_output);
        otherwise the program sets it to a one of the loss's dtype."""
        self.deriv = deriv
        self.seed_argument = seed_argument
        self.stmts: list[Assign] = []
        self.shapes: dict[str, tuple[sp.Expr, ...]] = {}
        self.like = ""
        self.counter = 0
        graph = deriv.graph
        for node in graph.nodes.values():
            if node.role != "op":
                self.shapes[node.name] = node.shape
        # The array whose dtype and device new arrays take (zeros, index ranges): a float
        # input, else a parameter; never an integer tensor of ids.
        floats = [n for n in graph.nodes.values() if n.role != "op" and n.dtype == "float"]
        self.like = next((n.name for n in floats if n.role == "input"),
                         next((n.name for n in floats if n.role == "param"), ""))
        self.dims: dict[str, tuple[str, int]] = {}
        for node in graph.nodes.values():
            if node.role in ("input", "target"):
                for axis, dim in enumerate(node.shape):
                    if dim.is_Symbol and dim.name not in self.dims:
                        self.dims[dim.name] = (node.name, axis)
        self.leaves = frozenset(n.name for n in graph.nodes.values() if n.role != "op")

    def lower(self) -> Program:
        deriv = self.deriv
        for name in deriv.computed:
            node = deriv.node(name)
            self.shapes[name] = node.shape
            body = deriv.forward[name]
            top = node.meta.get("maximum")
            if isinstance(top, str) and top in deriv.computed:
                # a max's value, sum(x e) / sum(e) over its ties e = [x == M], is M
                # itself (every tie equals the maximum): computed as M, differentiated
                # as the sums
                body = ref(top, node.indices())
            self.assign(name, body, node.indices(), "forward", forward_comment(deriv, name))
        # Without a seed argument dL/dL is the number 1, folded where it is a factor of an
        # adjoint that also multiplies an array: a 0-d array of ones costs microseconds
        # per scalar operation on it, and the product keeps the array's dtype (numpy and
        # torch do not widen an array by a Python number). Elsewhere (a where() of
        # numbers, say) the seed array stays, and gives the result its dtype.
        for adj in deriv.adjoints:
            node = deriv.node(adj.node)
            if adj.var == deriv.seed.name:
                self.shapes[adj.var] = ()
                if not self.seed_argument:
                    self.stmts.append(Assign(adj.var, Seed(deriv.graph.loss),
                                             "the seed: dL/dL = 1, in the loss's dtype",
                                             "backward"))
                continue
            self.shapes[adj.var] = node.shape
            expr = adj.expr
            if not self.seed_argument:
                expr = _fold_seed(expr, deriv.seed)
            self.assign(adj.var, expr, target_indices(node), "backward",
                        backward_comment(deriv, adj.node))
        one_hots = {name: str(deriv.node(name).meta["one_hot_of"]) for name in deriv.computed
                    if "one_hot_of" in deriv.node(name).meta}
        integers = frozenset(n.name for n in deriv.graph.nodes.values() if n.dtype == "int64")
        layer_norms = {name: node.meta["layer_norm"] for name, node in deriv.graph.nodes.items()
                       if "layer_norm" in node.meta}
        return Program(self.stmts, self.shapes, self.dims, self.leaves, one_hots, integers,
                       self.like, layer_norms)  # type: ignore[arg-type]

    # -- statements ---------------------------------------------------------------------
    def assign(self, target: str, expr: sp.Expr, axes: tuple[sp.Symbol, ...], phase: Phase,
               comment: str) -> None:
        first = len(self.stmts)
        self._assign(target, expr, axes, phase)
        stmt = self.stmts[first]
        self.stmts[first] = Assign(stmt.target, stmt.op, comment, stmt.phase)

    def _assign(self, target: str, expr: sp.Expr, axes: tuple[sp.Symbol, ...],
                phase: Phase) -> None:
        extents = dict(zip(axes, self.shapes[target], strict=True))
        stacked = _stacked(expr, axes, self.shapes[target])
        if stacked is not None:
            axis, parts = stacked
            rest = axes[:axis] + axes[axis + 1:]
            names: list[str | None] = []
            for value in parts:
                if value is None:
                    names.append(None)
                    continue
                part = self._temp()
                self.shapes[part] = tuple(extents[a] for a in rest)
                self._assign(part, value, rest, phase)
                names.append(part)
            self._emit(target, Stack(tuple(names), axis), phase)
        elif is_index_symbol(expr) and expr in axes:
            # positions 0, 1, ..., extent - 1 along an axis (an integer tensor of ids)
            iota = Iota(axes.index(expr), extents[expr], len(axes), self.like)
            self._emit(target, Map(iota.placeholder(), ((iota.placeholder(), iota),)), phase)
        elif is_logsumexp(expr):
            self._logsumexp(expr, axes, extents, phase, target)
        elif isinstance(expr, MaxOver):
            self._max_over(expr, axes, extents, phase, target)
        elif isinstance(expr, ArgMaxOver):
            self._arg_max_over(expr, axes, extents, phase, target)
        elif isinstance(expr, sp.Sum) and self._free(expr.function,
                                                      _bound(expr), axes) == axes:
            self._sum(expr, axes, extents, phase, target)
        else:
            lowered = self._nested(expr, phase, extents)
            self._map(target, lowered, axes, extents, phase)

    def _emit(self, target: str, op: object, phase: Phase) -> None:
        self.stmts.append(Assign(target, op, "", phase))  # type: ignore[arg-type]

    def _temp(self) -> str:
        self.counter += 1
        return naming.partial(self.counter)

    def _map(self, target: str, expr: sp.Expr, axes: tuple[sp.Symbol, ...],
             extents: dict[sp.Symbol, sp.Expr], phase: Phase) -> None:
        body, views = self.viewify(expr, axes, extents)
        covered = _covered(expr)
        if any(a not in covered for a in axes):
            # An axis no operand spans (a gradient constant along it): broadcast against
            # an explicit array of zeros of the full shape.
            zeros = self._temp()
            shape = tuple(extents[a] for a in axes)
            self.shapes[zeros] = shape
            self._emit(zeros, Full(shape, 0.0, self.like), phase)
            view = View(zeros, (None,) * len(axes), tuple(range(len(axes))), len(axes))
            body = body + view.placeholder()
            views = (*views, (view.placeholder(), view))
        self._emit(target, Map(body, views), phase)

    # -- sums ---------------------------------------------------------------------------
    def _nested(self, expr: sp.Expr, phase: Phase,
                extents: dict[sp.Symbol, sp.Expr]) -> sp.Expr:
        """Lower every sum inside ``expr`` into its own statement; return the rest."""
        if is_logsumexp(expr):
            return self._logsumexp(expr, None, extents, phase, None)
        if isinstance(expr, MaxOver):
            return self._max_over(expr, None, extents, phase, None)
        if isinstance(expr, sp.Sum):
            return self._sum(expr, None, extents, phase, None)
        if not expr.args or isinstance(expr, sp.Indexed):
            return expr
        return expr.func(*(self._nested(a, phase, extents) for a in expr.args))

    def _free(self, expr: sp.Expr, bound: set[sp.Symbol],
              order: tuple[sp.Symbol, ...] | None) -> tuple[sp.Symbol, ...]:
        seen: list[sp.Symbol] = []
        # indices of array references, and the row index of a scatter's delta(ids[i], k)
        carriers = [*sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key),
                    *sorted(expr.atoms(sp.KroneckerDelta), key=sp.default_sort_key)]
        for r in carriers:
            for index in (r.indices if isinstance(r, sp.Indexed) else r.args):
                for i in _index_symbols(index):
                    if i not in bound and i not in seen:
                        seen.append(i)
        if order is not None:
            return tuple(a for a in order if a in seen)
        return tuple(sorted(seen, key=_axis_order))

    def _sum(self, expr: sp.Sum, axes: tuple[sp.Symbol, ...] | None,
             extents: dict[sp.Symbol, sp.Expr], phase: Phase, target: str | None) -> sp.Expr:
        limits = _bind(expr, extents)
        body = self._nested(expr.function, phase, extents)
        free = self._free(body, set(limits), axes)
        target = target or self._temp()
        self.shapes[target] = tuple(extents[a] for a in free)
        scattered = self._scatter(target, body, limits, free, extents, phase)
        if scattered is not None:
            return scattered
        added = self._window_add(target, body, limits, free, extents, phase)
        if added is not None:
            return added
        if (not free and isinstance(body, sp.Piecewise) and len(body.args) == 2
                and body.args[0][0] == 1 and body.args[1] == (0, sp.true)):
            # sum of [condition] over every axis: a count (of the positions a loss counts)
            viewed, views = self.viewify(body.args[0][1], tuple(limits), extents)
            self._emit(target, Reduce("count", viewed, views, tuple(range(len(limits))),
                                      len(limits)), phase)
            return ref(target, free)
        factors = tuple(self._unfix(f, phase) for f in sp.Mul.make_args(body))
        if sum(isinstance(f, sp.Indexed) for f in factors) >= 2:
            factors = tuple(self._unwindow(f, extents, phase) for f in factors)
        tensors = [f for f in factors if isinstance(f, sp.Indexed)]
        rest = [f for f in factors if not isinstance(f, sp.Indexed)]
        plain = all(len(set(t.indices)) == len(t.indices)
                    and all(i.is_Symbol for i in t.indices) for t in tensors)
        if not rest and plain and len(tensors) >= 2 and self._spans(tensors, limits, free):
            self._contract(target, tensors, free, extents, phase)
            return ref(target, free)
        if not rest and plain and len(tensors) == 1:
            (tensor,) = tensors
            kept = tuple(i for i in tensor.indices if i not in limits)
            # (a summed index the tensor does not carry multiplies by its extent: the
            # general case below)
            if kept == free and set(limits) <= set(tensor.indices):
                axes_ = tuple(n for n, i in enumerate(tensor.indices) if i in limits)
                # Kept axes already come in output order: reduce in place, no transpose.
                view = View(_src(tensor), (None,) * tensor.rank, tuple(range(tensor.rank)),
                            tensor.rank)
                self._emit(target, Reduce("sum", view.placeholder(),
                                          ((view.placeholder(), view),), axes_, tensor.rank),
                           phase)
                return ref(target, free)
        covered = _covered(body) | (body.free_symbols & set(limits))
        # a summed index the body does not depend on is no axis: it scales the sum
        full = (*free, *(v for v in limits if v in covered))
        viewed, views = self.viewify(body, full, extents)
        scale = sp.Mul(*(extents[v] for v in limits if v not in covered))
        reduce_axes = tuple(n for n, v in enumerate(full) if v in limits and v in covered)
        if not reduce_axes:
            self._emit(target, Map(viewed * scale, views), phase)
        else:
            self._emit(target, Reduce("sum", viewed * scale, views, reduce_axes, len(full)),
                       phase)
        return ref(target, free)

    def _unfix(self, factor: sp.Expr, phase: Phase) -> sp.Expr:
        """A factor ``w[0, h, d, c]`` of a product (a fixed index on some axes, distinct
        symbols on the rest) as a reference to its sub-array ``w[0]`` taken once (a view
        in both backends), so the product can still be contracted by matmul/einsum."""
        if not isinstance(factor, sp.Indexed):
            return factor
        fixed = [i for i in factor.indices if i.is_Integer]
        symbols = tuple(i for i in factor.indices if not i.is_Integer)
        if (not fixed or not all(i.is_Symbol for i in symbols)
                or len(set(symbols)) != len(symbols)):
            return factor
        source = self.shapes[_src(factor)]
        if any(n == 1 for i, n in zip(factor.indices, source, strict=True) if i.is_Integer):
            return factor  # a broadcast (size-1) axis: the view handles it
        sub = self._temp()
        shape = tuple(n for i, n in zip(factor.indices, source, strict=True)
                      if not i.is_Integer)
        self.shapes[sub] = shape
        self._map(sub, factor, symbols, dict(zip(symbols, shape, strict=True)), phase)
        return ref(sub, symbols)

    def _unwindow(self, factor: sp.Expr, extents: dict[sp.Symbol, sp.Expr],
                  phase: Phase) -> sp.Expr:
        """A factor read through sliding windows, ``x[n, c, 2*i + a - 1]``, as a reference
        ``xw[n, c, i, a]`` to its windowed view (strided, no copy), so the product can be
        contracted by matmul/einsum like any other."""
        if not isinstance(factor, sp.Indexed) or all(
                i.is_Integer or i.is_Symbol for i in factor.indices):
            return factor
        plain: list[sp.Symbol] = []
        taps: list[sp.Symbol] = []
        for index in factor.indices:
            if index.is_Integer:
                continue
            if index.is_Symbol:
                plain.append(index)
                continue
            found = slide(index, extents)
            if found is None:
                return factor
            plain.append(found[0])
            if found[1] is not None:
                taps.append(found[1])
        layout = (*plain, *taps)
        if len(set(layout)) != len(layout):
            return factor
        sub = self._temp()
        self.shapes[sub] = tuple(extents[a] for a in layout)
        self._map(sub, factor, layout, {a: extents[a] for a in layout}, phase)
        return ref(sub, layout)

    def _window_add(self, target: str, body: sp.Expr, limits: list[sp.Symbol],
                    free: tuple[sp.Symbol, ...], extents: dict[sp.Symbol, sp.Expr],
                    phase: Phase) -> sp.Expr | None:
        """``out[k] = sum_{i,a} v[i, a] delta(s*i + a - p, k)``: the adjoint of a window
        read, as windows of ``v`` added back at their positions (``k`` an output axis)."""
        slides: dict[sp.Symbol, tuple[sp.Expr, tuple[sp.Symbol, sp.Symbol | None, int, int]]]
        slides = {}
        for factor in sp.Mul.make_args(body):
            if not isinstance(factor, sp.KroneckerDelta):
                continue
            for k, other in (factor.args, factor.args[::-1]):
                if k in free and k not in slides and other.free_symbols <= set(limits):
                    found = slide(other, extents)
                    if found is not None:
                        slides[k] = (factor, found)
                        break
        if not slides:
            return None
        deltas = {d for d, _ in slides.values()}
        rest = sp.Mul(*(f for f in sp.Mul.make_args(body) if f not in deltas))
        if any(slides[k][1][1] is None for k in slides):
            raise GraphError(f"cannot lower {body}: a strided read's adjoint without a "
                             "window is not supported")
        # each slid axis as (position, tap), side by side: windows that tile the axis
        # exactly are then the axis itself, reshaped
        layout = tuple(i for k in free for i in (slides[k][1][:2] if k in slides else (k,)))
        if len(set(layout)) != len(layout) or rest.has(sp.KroneckerDelta):
            raise GraphError(f"cannot lower {body}: only windows that slide over distinct "
                             "axes are supported")
        shape = self.shapes[target]
        spec: list[tuple[int, int, int, int, int]] = []
        for k in free:
            if k not in slides:
                continue
            pos, tap, stride, pad = slides[k][1]
            count, width = extents[pos], extents[tap] if tap is not None else 1
            n = shape[free.index(k)]
            if not all(sp.sympify(v).is_Integer for v in (count, width, n)):
                raise GraphError(f"cannot lower {body}: a window over an axis of symbolic "
                                 "size")
            spec.append((free.index(k), stride, pad, int(count), int(width)))
        # sums the windows do not index (a convolution's output channels) come first
        values = self._laid_out(rest, [i for i in limits if i not in layout], layout,
                                extents, phase)
        self._emit(target, WindowAdd(values, shape, tuple(spec)), phase)
        return ref(target, free)

    def _laid_out(self, rest: sp.Expr, extra: list[sp.Symbol], layout: tuple[sp.Symbol, ...],
                  extents: dict[sp.Symbol, sp.Expr], phase: Phase) -> str:
        """The array a scatter- or window-add adds: ``rest`` summed over ``extra``, laid
        out on the axes ``layout`` (summed straight into that order where ``rest``
        spans them all, else rearranged by one elementwise statement)."""
        if extra:
            order = layout if set(layout) <= _covered(rest) else None
            rest = self._sum(sp.Sum(rest, *((i, 0, extents[i] - 1) for i in extra)), order,
                             extents, phase, None)
        if isinstance(rest, sp.Indexed) and tuple(rest.indices) == layout:
            return _src(rest)
        values = self._temp()
        self.shapes[values] = tuple(extents[i] for i in layout)
        self._map(values, rest, layout, extents, phase)
        return values

    def _scatter(self, target: str, body: sp.Expr, limits: list[sp.Symbol],
                 free: tuple[sp.Symbol, ...], extents: dict[sp.Symbol, sp.Expr],
                 phase: Phase) -> sp.Expr | None:
        """``out[k, j...] = sum_i v[i..., j...] delta(ids[i...], k)``: the adjoint of a
        gather, as a scatter-add of ``v``'s rows at the ids (``k`` the first axis)."""
        factors = sp.Mul.make_args(body)
        deltas = [f for f in factors if isinstance(f, sp.KroneckerDelta)
                  and any(isinstance(a, sp.Indexed) for a in f.args)]
        if not deltas:
            return None
        (delta,) = deltas if len(deltas) == 1 else (None,)
        index = next((a for a in delta.args if isinstance(a, sp.Indexed)), None) \
            if delta is not None else None
        row = next((a for a in delta.args if a is not index), None) if delta else None
        if (index is None or not free or row != free[0]
                or not set(index.indices) <= set(limits)
                or len(set(index.indices)) != len(index.indices)
                or not all(i.is_Symbol for i in index.indices)):
            raise GraphError(f"cannot lower {body}: only a sum over (at least) every axis "
                             "of one id array, into the first axis of the result, is "
                             "supported")
        rest = sp.Mul(*(f for f in factors if f is not delta))
        # Axes the ids do not span (the batch, for positions shared by every row) are
        # summed first; the scatter then adds one row per id.
        values = self._laid_out(rest, [i for i in limits if i not in index.indices],
                                (*index.indices, *free[1:]), extents, phase)
        self._emit(target, ScatterAdd(values, _src(index), self.shapes[target]), phase)
        return ref(target, free)

    @staticmethod
    def _spans(tensors: list[sp.Indexed], limits: list[sp.Symbol],
               free: tuple[sp.Symbol, ...]) -> bool:
        """Every summed index and every output index is carried by some operand."""
        carried = {i for t in tensors for i in t.indices}
        return set(limits) <= carried and set(free) <= carried

    def _contract(self, target: str, tensors: list[sp.Indexed], free: tuple[sp.Symbol, ...],
                  extents: dict[sp.Symbol, sp.Expr], phase: Phase) -> None:
        """A product of arrays summed over some indices, as pairwise steps."""
        for t in tensors:
            for i, n in zip(t.indices, self.shapes[_src(t)], strict=True):
                extents.setdefault(i, n)
        working: list[tuple[str, tuple[sp.Symbol, ...]]] = [
            (_src(t), tuple(t.indices)) for t in tensors]
        steps = contract.plan([ix for _, ix in working], free, extents)
        for n, step in enumerate(steps):
            (a, ia), (b, ib) = working[step.left], working[step.right]
            out = target if n == len(steps) - 1 else self._temp()
            self.shapes[out] = tuple(extents[i] for i in step.indices)
            self._emit(out, _pairwise(a, ia, b, ib, step.indices), phase)
            working.pop(step.right)
            working.pop(step.left)
            working.append((out, step.indices))

    def _logsumexp(self, expr: sp.log, axes: tuple[sp.Symbol, ...] | None,
                   extents: dict[sp.Symbol, sp.Expr], phase: Phase,
                   target: str | None) -> sp.Expr:
        inner: sp.Sum = expr.args[0]
        limits = [lim[0] for lim in inner.limits]
        for var, lo, hi in inner.limits:
            extents[var] = hi - lo + 1
        arg = self._nested(inner.function.args[0], phase, extents)
        free = self._free(arg, set(limits), axes)
        full = (*free, *limits)
        target = target or self._temp()
        self.shapes[target] = tuple(extents[a] for a in free)
        body, views = self.viewify(arg, full, extents)
        self._emit(target, Reduce("logsumexp", body, views,
                                  tuple(range(len(free), len(full))), len(full)), phase)
        return ref(target, free)

    def _max_over(self, expr: MaxOver, axes: tuple[sp.Symbol, ...] | None,
                  extents: dict[sp.Symbol, sp.Expr], phase: Phase,
                  target: str | None) -> sp.Expr:
        """``MaxOver(f, limits)`` -> a ``max`` :class:`~.nodes.Reduce` of ``f``."""
        limits = _bind(expr, extents)
        arg = self._nested(expr.function, phase, extents)
        free = self._free(arg, set(limits), axes)
        full = (*free, *limits)
        target = target or self._temp()
        self.shapes[target] = tuple(extents[a] for a in free)
        pool = self._max_pool(arg, free, limits, extents)
        if pool is not None:
            self._emit(target, pool, phase)
            return ref(target, free)
        body, views = self.viewify(arg, full, extents)
        self._emit(target, Reduce("max", body, views, tuple(range(len(free), len(full))),
                                  len(full)), phase)
        return ref(target, free)

    def _arg_max_over(self, expr: ArgMaxOver, axes: tuple[sp.Symbol, ...],
                      extents: dict[sp.Symbol, sp.Expr], phase: Phase, target: str) -> None:
        """``ArgMaxOver(x[n, c, s*i + a, ...], limits)`` -> the max pooling's indices."""
        limits = _bind(expr, extents)
        free = self._free(expr.function, set(limits), axes)
        pool = self._max_pool(expr.function, free, limits, extents)
        if pool is None or free != axes:
            raise GraphError(f"cannot lower {expr}: an arg-max is supported only over "
                             "whole windows of the trailing axes (a max pooling)")
        self._emit(target, replace(pool, indices=True), phase)

    def _max_pool(self, arg: sp.Expr, free: tuple[sp.Symbol, ...], limits: list[sp.Symbol],
                  extents: dict[sp.Symbol, sp.Expr]) -> MaxPool | None:
        """``max_{a} x[n, c, s*i + a]`` over the trailing axes, each window whole
        (no padding, as many positions as torch's floor mode gives): a max pooling."""
        d = len(limits)
        if not isinstance(arg, sp.Indexed) or d not in (1, 2) or arg.rank != len(free):
            return None
        lead = arg.rank - d
        if tuple(arg.indices[:lead]) != free[:lead]:
            return None
        kernel: list[int] = []
        stride: list[int] = []
        for m, a in enumerate(limits):
            index, pos = arg.indices[lead + m], free[lead + m]
            coeffs = index.as_coefficients_dict()
            step = coeffs.get(pos)
            n = self.shapes[_src(arg)][lead + m]
            k, q = sp.sympify(extents[a]), sp.sympify(extents[pos])
            if (set(coeffs) != {pos, a} or coeffs[a] != 1 or not step or not step.is_Integer
                    or not (n.is_Integer and k.is_Integer and q.is_Integer)
                    or (int(n) - int(k)) // int(step) + 1 != int(q)):
                return None
            kernel.append(int(k))
            stride.append(int(step))
        return MaxPool(_src(arg), tuple(kernel), tuple(stride))

    # -- views --------------------------------------------------------------------------
    def view(self, r: sp.Indexed, axes: tuple[sp.Symbol, ...],
             extents: dict[sp.Symbol, sp.Expr] | None = None,
             ) -> View | Gather | Reshape | Window:
        """How reference ``r`` lines up with ``axes``."""
        src = _src(r)
        if r.indices and isinstance(r.indices[0], sp.Indexed):
            return self._gather(r, axes)
        if extents is not None and any(not (i.is_Integer or i.is_Symbol) for i in r.indices):
            return self._reshape(r, axes, extents)
        picks: list[int | None] = []
        places: list[int] = []
        for i in r.indices:
            if i.is_Integer:
                picks.append(int(i))
                continue
            if not i.is_Symbol or i not in axes:
                raise GraphError(f"cannot lower the reference {r}: index {i} is not one of "
                                 f"the axes {', '.join(map(str, axes))} (only reshapes' "
                                 "affine indices and gathers' integer ids are supported)")
            picks.append(None)
            places.append(axes.index(i))
        if len(set(places)) != len(places):
            raise GraphError(f"cannot lower the reference {r}: a repeated index "
                             "(a diagonal) is not supported yet")
        return View(src, tuple(picks), tuple(places), len(axes))

    def _reshape(self, r: sp.Indexed, axes: tuple[sp.Symbol, ...],
                 extents: dict[sp.Symbol, sp.Expr]) -> Reshape | Window:
        """A reference whose indices are digit sums of the axes: reshape the array into
        every axis' digits, permute them into output order, merge each axis' digits."""
        src = _src(r)
        picks = tuple(int(i) if i.is_Integer else None for i in r.indices)
        kept = [i for i in r.indices if not i.is_Integer]
        sizes = [n for n, p in zip(self.shapes[src], picks, strict=True) if p is None]
        found = radix.axis_digits(kept, {a: extents[a] for a in axes}, sizes)
        if found is None:
            window = self._window(r, axes, extents)
            if window is not None:
                return window
            raise GraphError(f"cannot lower the reference {r}: its indices are not a "
                             "regrouping of the axes "
                             f"{', '.join(map(str, axes))} (a row-major reshape); strided "
                             "or padded windows are not supported")
        per_axis, fines = found
        flat = [f for digits in per_axis for f in digits]
        read = sorted(fines, key=axes.index)
        if len(set(flat)) != len(flat) or {f for v in read for f in fines[v]} != set(flat):
            raise GraphError(f"cannot lower the reference {r}: an axis read twice or in "
                             "part (a diagonal or a repeat) is not supported")
        wanted = [f for v in read for f in fines[v]]
        return Reshape(src, picks, tuple(f.size for f in flat),
                       tuple(flat.index(f) for f in wanted),
                       tuple(extents[v] for v in read), tuple(axes.index(v) for v in read),
                       len(axes))

    def _window(self, r: sp.Indexed, axes: tuple[sp.Symbol, ...],
                extents: dict[sp.Symbol, sp.Expr]) -> Window | None:
        """A reference whose indices slide windows over its axes (``x[n, c, 2*i + a - 1]``),
        each position and tap an axis of the output; None when it is not one."""
        src = _src(r)
        picks: list[int | None] = []
        out: list[int | Slide] = []
        seen: list[sp.Symbol] = []
        for index, size in zip(r.indices, self.shapes[src], strict=True):
            if index.is_Integer:
                picks.append(int(index))
                continue
            picks.append(None)
            if index.is_Symbol:
                if index not in axes:
                    return None
                out.append(axes.index(index))
                seen.append(index)
                continue
            found = slide(index, extents)
            if found is None or not size.is_Integer:
                return None
            pos, tap, stride, pad = found
            if pos not in axes or (tap is not None and tap not in axes):
                return None
            count = sp.sympify(extents[pos])
            width = sp.sympify(extents[tap]) if tap is not None else sp.Integer(1)
            if not (count.is_Integer and width.is_Integer):
                return None
            out.append(Slide(axes.index(pos), -1 if tap is None else axes.index(tap),
                             stride, pad, int(count), int(width)))
            seen += [pos] if tap is None else [pos, tap]
        if len(set(seen)) != len(seen):
            return None
        return Window(src, tuple(picks), tuple(out), len(axes))

    def _gather(self, r: sp.Indexed, axes: tuple[sp.Symbol, ...]) -> Gather:
        """``E[ids[i...], j...]``: rows of E picked by an integer array."""
        index, *rest = r.indices
        plain = [*index.indices, *rest]
        if (not all(i.is_Symbol and i in axes for i in plain) or len(set(plain)) != len(plain)
                or any(isinstance(i, sp.Indexed) for i in rest)):
            raise GraphError(f"cannot lower the reference {r}: only rows picked by ids "
                             "indexed by plain axes are supported")
        return Gather(_src(r), _src(index), tuple(axes.index(i) for i in index.indices),
                      tuple(axes.index(i) for i in rest), len(axes))

    def viewify(self, expr: sp.Expr, axes: tuple[sp.Symbol, ...],
                extents: dict[sp.Symbol, sp.Expr] | None = None) -> tuple[sp.Expr, Views]:
        """``expr`` with each array reference replaced by its view's placeholder, and each
        index compared in a condition (a mask ``s <= t``) by an index array."""
        mapping: dict[sp.Expr, sp.Symbol] = {}
        views: dict[sp.Symbol, AnyView] = {}
        for i in sorted(_loose_indices(expr), key=lambda s: s.name):
            if i not in axes or extents is None:
                raise GraphError(f"cannot lower {expr}: the index {i} is not an axis here")
            if i in _loose_indices(expr, conditions=False):
                raise GraphError(f"cannot lower {expr}: the index {i} is used as a value "
                                 "(only comparisons of indices are supported)")
            iota = Iota(axes.index(i), extents[i], len(axes), self.like)
            mapping[i] = iota.placeholder()
            views[iota.placeholder()] = iota
        for r in expr.atoms(sp.Indexed):
            if any(r in q.indices for q in expr.atoms(sp.Indexed)):
                continue  # an id array read inside a gather, not a value
            view = self.view(r, axes, extents)
            mapping[r] = view.placeholder()
            views[view.placeholder()] = view
        for s in expr.free_symbols:
            name = ref_name(s)
            if name is not None and not isinstance(s, sp.Indexed):
                view = View(name, (), (), len(axes))
                mapping[s] = view.placeholder()
                views[view.placeholder()] = view
        return expr.xreplace(mapping), ordered(views)


def _loose_indices(expr: sp.Expr, *, conditions: bool = True) -> set[sp.Symbol]:
    """Index symbols ``expr`` mentions outside its array references (and, with
    ``conditions=False``, outside comparisons too: indices used as values)."""
    found: set[sp.Symbol] = set()
    bound: set[sp.Symbol] = set()
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, sp.Indexed) or (not conditions and isinstance(e, Relational)):
            continue
        if isinstance(e, sp.Sum | MaxOver):
            bound |= {lim[0] for lim in e.limits}
        if is_index_symbol(e):
            found.add(e)
        stack.extend(e.args)
    return found - bound


def slide(index: sp.Expr, extents: dict[sp.Symbol, sp.Expr],
          ) -> tuple[sp.Symbol, sp.Symbol | None, int, int] | None:
    """``stride*i + a - pad`` as (position i, tap a, stride, pad): two index symbols
    (one with coefficient 1: the tap; of two such, the one of smaller extent) or one
    with a stride above 1 or an offset (no tap); None for anything else."""
    coeffs = index.as_coefficients_dict()
    const = coeffs.pop(sp.Integer(1), sp.Integer(0))
    if (not const.is_Integer or const > 0 or not 1 <= len(coeffs) <= 2
            or not all(is_index_symbol(v) and c.is_Integer and c > 0 and v in extents
                       for v, c in coeffs.items())):
        return None
    pad = int(-const)
    if len(coeffs) == 1:
        ((pos, stride),) = coeffs.items()
        if stride == 1 and pad == 0:
            return None
        return pos, None, int(stride), pad
    ones = [v for v, c in coeffs.items() if c == 1]
    if not ones:
        return None
    def size(v: sp.Symbol) -> tuple[int, str]:
        n = sp.sympify(extents[v])
        return (int(n) if n.is_Integer else 1 << 62), v.name

    tap = min(ones, key=size)
    (pos,) = [v for v in coeffs if v != tap]
    return pos, tap, int(coeffs[pos]), pad


def _axis_order(s: sp.Symbol) -> tuple[int, int, str]:
    """The axes of a nested sum's result, in the order the statement around it most
    likely has them: a gradient's own axes (k0, k1, ...), then the operation's output
    axes (i0, i1, ...), each by number (so no transpose is needed to read it back)."""
    head, number = s.name[:1], s.name[1:]
    rank = {"k": 0, "i": 1}.get(head, 2)
    return (rank, int(number) if number.isdigit() else 0, s.name)


def _index_symbols(index: sp.Expr) -> list[sp.Symbol]:
    """The index symbols an index expression reads (``8*i2 + i3``: i2, i3)."""
    if index.is_Symbol:
        return [index]
    return sorted((s for s in index.free_symbols if is_index_symbol(s)), key=lambda s: s.name)


def _covered(expr: sp.Expr) -> set[sp.Symbol]:
    """The index symbols some array reference of ``expr`` spans."""
    return {i for r in expr.atoms(sp.Indexed) for index in r.indices
            for i in _index_symbols(index)}


def _bind(expr: sp.Sum | MaxOver | ArgMaxOver, extents: dict[sp.Symbol, sp.Expr]
          ) -> list[sp.Symbol]:
    """The indices ``expr`` reduces over, each one's extent recorded in ``extents``."""
    for var, lo, hi in expr.limits:
        extents[var] = hi - lo + 1
    return [lim[0] for lim in expr.limits]


def _bound(expr: sp.Sum) -> set[sp.Symbol]:
    return {lim[0] for lim in expr.limits}


def _src(r: sp.Indexed) -> str:
    name = ref_name(r)
    assert name is not None
    return name


def _pairwise(a: str, ia: tuple[sp.Symbol, ...], b: str, ib: tuple[sp.Symbol, ...],
              out: tuple[sp.Symbol, ...]) -> MatMul | Einsum:
    """One product of two arrays: a matrix product when the indices form one."""
    product = _matmul(a, ia, b, ib, out) or _matmul(b, ib, a, ia, out)
    if product is not None:
        return product
    letters: dict[sp.Symbol, str] = {}
    for i in (*ia, *ib):
        letters.setdefault(i, LETTERS[len(letters)])
    sub = ("".join(letters[i] for i in ia) + "," + "".join(letters[i] for i in ib)
           + "->" + "".join(letters[i] for i in out))
    return Einsum(sub, (a, b))


def _matmul(a: str, ia: tuple[sp.Symbol, ...], b: str, ib: tuple[sp.Symbol, ...],
            out: tuple[sp.Symbol, ...]) -> MatMul | None:
    """``op(a) @ op(b)`` when ``a`` (a matrix, or rows of a stack) and ``b`` (a matrix)
    share exactly one summed index and the result's indices are a's rest then b's."""
    shared = [i for i in ia if i in ib]
    if len(shared) != 1 or len(ib) != 2 or len(ia) < 2:
        return None
    (c,) = shared
    if c in out:
        return None
    (q,) = [i for i in ib if i != c]
    a_rest = tuple(i for i in ia if i != c)
    if out != (*a_rest, q):
        return None
    if len(ia) == 2:
        ta = ia[0] == c
    elif ia[-1] == c:
        ta = False
    else:
        return None
    return MatMul(a, b, ta=ta, tb=ib[1] == c, a_rank=len(ia))


def _fold_seed(expr: sp.Expr, seed: sp.Symbol) -> sp.Expr:
    """``expr`` with the factor ``seed`` (= 1) dropped, when another factor reads an array."""
    factors = sp.Mul.make_args(expr)
    if seed not in factors:
        return expr
    rest = [f for f in factors if f != seed]
    def numeric(factor: sp.Expr) -> bool:  # an array of numbers, not of truth values
        return not factor.has(sp.Piecewise) and (
            bool(factor.atoms(sp.Indexed))
            or any(ref_name(s) is not None for s in factor.free_symbols))

    return sp.Mul(*rest) if any(numeric(f) for f in rest) else expr


def _stacked(expr: sp.Expr, axes: tuple[sp.Symbol, ...], shape: tuple[sp.Expr, ...],
             ) -> tuple[int, list[sp.Expr | None]] | None:
    """``expr`` as entries along one axis, when it is a sum of terms ``[k = c] * A``
    (k an output axis, c a constant, A free of k): (the axis, the value at each entry,
    None where no term reaches it). The adjoint of reads at fixed indices comes out so;
    lowering it as a stack keeps each entry's contraction, instead of masking the whole
    array once per term."""
    axis: int | None = None
    parts: dict[int, sp.Expr] = {}
    for term in sp.Add.make_args(expr):
        masks = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.Piecewise)]
        if len(masks) != 1:
            return None
        (mask,) = masks
        if len(mask.args) != 2 or mask.args[1] != (0, True):
            return None
        (value, cond), _ = mask.args
        if not isinstance(cond, sp.Eq):
            return None
        k, c = cond.args if cond.args[0] in axes else cond.args[::-1]
        if k not in axes or not c.is_Integer:
            return None
        if axis is None:
            axis = axes.index(k)
        if axes.index(k) != axis:
            return None
        body = sp.Mul(*(f for f in sp.Mul.make_args(term) if f is not mask)) * value
        if k in _loose_indices(body) or k in body.free_symbols:
            return None
        parts[int(c)] = parts.get(int(c), sp.Integer(0)) + body
    if axis is None or not shape[axis].is_Integer:
        return None
    size = int(shape[axis])
    if not all(0 <= c < size for c in parts):
        return None
    return axis, [parts.get(c) for c in range(size)]


def gradient_statements(deriv: Derivation) -> tuple[Program, list[Assign]]:
    """The program of ``deriv`` and the optimised statements of its ``loss_and_grad``
    (the loss and every trainable parameter's gradient): what the torch module's
    ``loss_and_grad`` runs and ``latex --program`` prints. (The numpy module's computes
    the same from the program with every leaf's adjoint, for ``wrt=``.)"""
    from .passes import function

    program = Lowerer(deriv, seed_argument=False).lower()
    return program, function(program, [deriv.graph.loss, *deriv.grads.values()])
