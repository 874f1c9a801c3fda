"""The LaTeX printer of the array IR: the generated computation, statement by statement.

The numpy and torch printers (:mod:`symbackprop.emit.arrays`) turn each IR statement
into one line of code; this one turns the same statements into one typeset equation
each, with the code's own names, so a reader can hold the generated ``loss_and_grad``
against mathematics line by line. It reads the :class:`~symbackprop.ir.nodes.Program`
after every pass (fusion, CSE, the kernel passes), never printed code, and has one
method per op type, as the array printers do.

Conventions (those of the code, not of the derivation above it): indices count from 0;
the statement's own axes are ``i_0, i_1, ...``, summed or reduced axes ``s_0, s_1,
...``; a window read outside its array is 0 (zero padding); ``[c]`` is 1 where the
condition ``c`` holds, else 0. A kernel (log-softmax, a convolution's gradient, ...) is
written as the formula it computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import sympy as sp
from sympy.logic.boolalg import BooleanFunction
from sympy.printing.latex import LatexPrinter

from ..graph import ArgMaxOver, MaxOver
from ..ir.nodes import (
    AnyView,
    Assign,
    Conv,
    DenseKernel,
    Einsum,
    Full,
    Gather,
    Iota,
    LayerNorm,
    LayerNormBackward,
    Linear,
    LogSoftmax,
    LogSoftmaxBackward,
    Map,
    MatMul,
    MaxPool,
    MaxPoolBackward,
    NllLoss,
    NllLossBackward,
    Program,
    Reduce,
    Reshape,
    ScatterAdd,
    Seed,
    Slide,
    Softmax,
    SoftmaxBackward,
    Stack,
    TakeAt,
    View,
    Window,
    WindowAdd,
)
from .document import Block, Display, Heading, Para, code, spans
from .document import math as inline
from .notation import _esc, cases


def _axis(stem: str, n: int) -> sp.Symbol:
    return sp.Symbol(f"{stem}_{n}", integer=True, nonnegative=True)


def out_index(n: int) -> sp.Symbol:
    """The statement's n-th axis: ``i_n``."""
    return _axis("i", n)


def sum_index(n: int) -> sp.Symbol:
    """The n-th summed (or reduced) axis: ``s_n``."""
    return _axis("s", n)


class Iverson(sp.Function):
    """[c]: 1 where the condition c holds, else 0."""

    nargs = 1


class Cases(sp.Function):
    """A ``Piecewise`` whose conditions may be entries of boolean arrays (a mask):
    arguments value, condition, value, condition, ...; printed as cases."""


class Logic(sp.Function):
    """A boolean function (``And``, ``Or``, ``Not``, ``ITE``, ...) over entries of boolean
    arrays: the first argument names it (a Symbol), the rest are its operands."""


def _boolean_free(expr: sp.Expr) -> sp.Expr:
    """``expr`` with its conditions made plain functions (:class:`Cases`, :class:`Logic`),
    so that a boolean placeholder (a mask array) can be replaced by the entry it reads."""
    done: dict[sp.Basic, sp.Basic] = {}

    def walk(e: sp.Basic) -> sp.Basic:
        if not e.args:
            return e
        if e in done:
            return done[e]
        if isinstance(e, sp.Piecewise):
            out: sp.Basic = Cases(*(walk(x) for pair in e.args for x in pair.args))
        elif isinstance(e, BooleanFunction):
            out = Logic(sp.Symbol(type(e).__name__), *(walk(a) for a in e.args))
        else:
            args = tuple(walk(a) for a in e.args)
            out = e.func(*args) if args != e.args else e
        done[e] = out
        return out

    return walk(expr)


class Reshaped(sp.Function):
    """An entry of an array read through reshape / permute / reshape (a :class:`Reshape`
    view): arguments the array (a Symbol), its picks (-1 keeps an axis), the fine shape,
    the permutation, the final shape, then the entry's indices."""


class CodeIndexPrinter(LatexPrinter):
    """sympy's LaTeX printer with arrays as the code names them (``\\mathtt{fc\\_z}``)."""

    def __init__(self, arrays: Sequence[str]) -> None:
        super().__init__({"mul_symbol": None})
        self.arrays = frozenset(arrays)

    def array(self, name: str) -> str:
        return rf"\mathtt{{{_esc(name)}}}"

    def sub(self, indices: Sequence[sp.Expr]) -> str:
        return ",".join(self._print(i) for i in indices)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        base = self.array(expr.base.name)
        return f"{base}_{{{self.sub(expr.indices)}}}" if expr.indices else base

    def _print_Symbol(self, expr: sp.Symbol, style: str = "plain") -> str:
        if expr.name in self.arrays:
            return self.array(expr.name)
        return super()._print_Symbol(expr, style)

    def _print_Reshaped(self, expr: sp.Expr, exp: object = None) -> str:
        src, picks, fine, perm, shape, *indices = expr.args
        text = self.array(src.name)
        if any(p != -1 for p in picks):
            fixed = ",".join("" if p == -1 else str(p) for p in picks)
            text = rf"{text}_{{{fixed}}}"  # the kept axes are the empty places
        if tuple(perm) != tuple(range(len(perm))):
            dims = r"\times ".join(self._print(d) for d in fine)
            order = ",".join(str(a) for a in perm)
            text = (rf"\operatorname{{permute}}_{{({order})}}\left("
                    rf"\operatorname{{reshape}}_{{{dims}}}\left({text}\right)\right)")
        dims = r"\times ".join(self._print(d) for d in shape)
        out = (rf"\left[\operatorname{{reshape}}_{{{dims}}}\left({text}\right)\right]"
               rf"_{{{self.sub(indices)}}}")
        return rf"{out}^{{{exp}}}" if exp is not None else out

    def _under(self, expr: sp.Expr) -> str:
        """The indices a sum, max or arg-max runs over, for under its sign."""
        return ",".join(self._print(lim[0]) for lim in expr.limits)

    def _print_Sum(self, expr: sp.Sum) -> str:
        under = self._under(expr)
        body = self._print(expr.function)
        if isinstance(expr.function, sp.Add):
            body = rf"\left({body}\right)"
        return rf"\sum_{{{under}}} {body}"

    def _print_MaxOver(self, expr: sp.Expr) -> str:
        under = self._under(expr)
        return rf"\max_{{{under}}} {self._print(expr.function)}"

    def _print_ArgMaxOver(self, expr: sp.Expr) -> str:
        under = self._under(expr)
        return (rf"\operatorname{{argmax}}_{{{under}}} {self._print(expr.function)}"
                r" \quad \text{(the first, as a flat position in the last axes)}")

    def _print_Add(self, expr: sp.Add, order: str | None = None) -> str:
        """Sums first, then other positive terms, then negative ones: ``x W + b``,
        ``z - log(...)``."""
        terms = sorted(expr.as_ordered_terms(), key=lambda t: (
            t.could_extract_minus_sign(), not isinstance(t, sp.Sum)))
        out = ""
        for n, term in enumerate(terms):
            if term.could_extract_minus_sign():
                text = self._print(-term)
                text = rf"\left({text}\right)" if isinstance(-term, sp.Add) else text
                out += f" - {text}" if n else f"- {text}"
            else:
                out += f" + {self._print(term)}" if n else self._print(term)
        return out

    def _print_Mul(self, expr: sp.Mul) -> str:  # type: ignore[override]
        """Factors with a negative power as a fraction's denominator (sympy's own printer
        leaves ``(sum ...)^{-1}``)."""
        coeff, rest = expr.as_coeff_Mul()
        num: list[sp.Expr] = []
        den: list[sp.Expr] = []
        for f in sp.Mul.make_args(rest):
            if f.is_Pow and f.exp.is_number and f.exp.is_negative:
                den.append(f.base ** -f.exp)
            else:
                num.append(f)
        if not den:
            return super()._print_Mul(expr)
        sign = "- " if coeff.is_negative else ""
        top = sp.Mul(abs(coeff).as_numer_denom()[0], *num)
        bottom = sp.Mul(abs(coeff).as_numer_denom()[1], *den)
        return rf"{sign}\frac{{{self._print(top)}}}{{{self._print(bottom)}}}"

    def _print_exp(self, expr: sp.Expr, exp: object = None) -> str:
        out = rf"\exp\left({self._print(expr.args[0])}\right)"
        return rf"{out}^{{{exp}}}" if exp is not None else out

    def _print_log(self, expr: sp.Expr, exp: object = None) -> str:
        (arg,) = expr.args
        inner = self._print(arg)
        out = rf"\log {inner}" if isinstance(arg, sp.Sum) else rf"\log\left({inner}\right)"
        return rf"\left({out}\right)^{{{exp}}}" if exp is not None else out

    def _powered(self, text: str, exp: object) -> str:
        """``text`` raised to ``exp`` where sympy hands one over (a power of a function)."""
        return rf"\left({text}\right)^{{{exp}}}" if exp is not None else text

    def _print_Iverson(self, expr: sp.Expr, exp: object = None) -> str:
        return self._powered(rf"\left[{self._print(expr.args[0])}\right]", exp)

    def _print_Cases(self, expr: sp.Expr, exp: object = None) -> str:
        args = expr.args
        return self._powered(cases(self._print, zip(args[::2], args[1::2], strict=True)), exp)

    def _print_Logic(self, expr: sp.Expr, exp: object = None) -> str:
        kind, *args = expr.args
        if kind.name == "Not":
            out = rf"\neg {self._print(args[0])}"
        elif kind.name == "ITE":  # if c then a else b
            c, a, b = args
            out = cases(self._print, [(a, c), (b, sp.true)])
        elif kind.name in ("And", "Or"):
            joint = r" \wedge " if kind.name == "And" else r" \vee "
            out = joint.join(rf"\left({self._print(a)}\right)" for a in args)
        else:
            inside = ", ".join(self._print(a) for a in args)
            out = rf"\operatorname{{{kind.name}}}\left({inside}\right)"
        return self._powered(out, exp)

    # The kernels the passes form, as the formula each computes.
    def _print_TanhBackward(self, expr: sp.Expr, exp: object = None) -> str:
        g, y = expr.args
        return self._powered(self._print(g * (1 - y**2)), exp)

    def _print_SigmoidBackward(self, expr: sp.Expr, exp: object = None) -> str:
        g, y = expr.args
        return self._powered(self._print(g * y * (1 - y)), exp)

    def _print_ReluBackward(self, expr: sp.Expr, exp: object = None) -> str:
        g, x = expr.args
        return self._powered(self._print(g * Iverson(sp.StrictGreaterThan(x, 0))), exp)

    def _print_GeluTanh(self, expr: sp.Expr, exp: object = None) -> str:
        out = rf"\operatorname{{gelu}}_{{\tanh}}\left({self._print(expr.args[0])}\right)"
        return rf"{out}^{{{exp}}}" if exp is not None else out

    def _print_GeluTanhBackward(self, expr: sp.Expr, exp: object = None) -> str:
        g, x = expr.args
        out = rf"{self._print(g)}\,\operatorname{{gelu}}_{{\tanh}}'\left({self._print(x)}\right)"
        return self._powered(out, exp)


class ProgramPrinter:
    """Each statement of one program as ``(lhs, "= rhs")``, one method per op type.

    Every method builds the sympy expression of one entry of the statement (sums with
    their bounds, so :meth:`expression` can be evaluated entry by entry); the printer then
    writes it."""

    def __init__(self, program: Program, stmts: Sequence[Assign]) -> None:
        self.program = program
        self.shapes: dict[str, tuple[sp.Expr, ...]] = dict(program.shapes)
        for stmt in stmts:
            if stmt.target not in self.shapes:  # a temporary a pass made
                self.shapes[stmt.target] = self._shape_of(stmt.op)
        self.printer = CodeIndexPrinter(list(self.shapes))

    # -- shapes --------------------------------------------------------------------------
    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def shape(self, name: str) -> tuple[sp.Expr, ...]:
        if name not in self.shapes:
            raise KeyError(f"no shape for {name!r} in the program")  # pragma: no cover
        return self.shapes[name]

    def _body_extents(self, views: Sequence[tuple[sp.Symbol, AnyView]], rank: int
                      ) -> list[sp.Expr]:
        """The extent of each axis of a body of ``rank`` axes, from what its views read
        there (an axis only broadcast along, extent 1 everywhere, has extent 1)."""
        out: list[sp.Expr] = [sp.Integer(1)] * rank

        def put(axis: int, extent: sp.Expr) -> None:
            if extent != 1:  # an array of extent 1 there broadcasts; it sets nothing
                out[axis] = extent

        for _, v in views:
            if isinstance(v, Iota):
                put(v.axis, v.extent)
            elif isinstance(v, View):
                src = self.shape(v.src)
                if not v.picks and not v.places:
                    for a, d in enumerate(src):
                        put(a, d)
                    continue
                kept = [d for d, p in zip(src, v.picks, strict=True) if p is None]
                for d, a in zip(kept, v.places, strict=True):
                    put(a, d)
            elif isinstance(v, Gather):
                for d, a in zip(self.shape(v.index), v.index_places, strict=True):
                    put(a, d)
                for d, a in zip(self.shape(v.src)[1:], v.places, strict=True):
                    put(a, d)
            elif isinstance(v, Reshape):
                for d, a in zip(v.shape, v.places, strict=True):
                    put(a, d)
            elif isinstance(v, Window):
                src = self.shape(v.src)
                kept = [d for d, p in zip(src, v.picks, strict=True) if p is None]
                for d, a in zip(kept, v.axes, strict=True):
                    if isinstance(a, Slide):
                        put(a.place, sp.Integer(a.count))
                        if a.kernel_place >= 0:
                            put(a.kernel_place, sp.Integer(a.size))
                    else:
                        put(a, d)
        return out

    def _shape_of(self, op: object) -> tuple[sp.Expr, ...]:
        """The shape of what ``op`` computes (for temporaries the passes made)."""
        if isinstance(op, Map):
            # A shared subexpression (CSE) is laid out in the axes of the bodies it came
            # from: as wide as its widest read. An array read as it is has its own axes
            # (its view's out_rank is that of whichever body CSE took the symbol from).
            rank = max((self.rank(v.src) if isinstance(v, View) and not v.picks
                        and not v.places else v.out_rank for _, v in op.views), default=0)
            return tuple(self._body_extents(op.views, rank))
        if isinstance(op, Reduce):
            if op.kind == "count":
                return ()
            full = self._body_extents(op.views, op.rank)
            return tuple(d for a, d in enumerate(full) if a not in op.axes)
        if isinstance(op, MatMul | Linear):
            mm = op.product if isinstance(op, Linear) else op
            a, b = self.shape(mm.a), self.shape(mm.b)
            rows = (*a[:-2], a[-1]) if mm.ta else a[:-1]
            return (*rows, b[0] if mm.tb else b[1])
        if isinstance(op, Einsum):
            inputs, output = op.subscripts.split("->")
            sizes = {c: d for name, subs in zip(op.operands, inputs.split(","), strict=True)
                     for c, d in zip(subs, self.shape(name), strict=True)}
            return tuple(sizes[c] for c in output)
        if isinstance(op, LogSoftmax | Softmax | LayerNorm):
            return self.shape(op.src)
        if isinstance(op, SoftmaxBackward | LogSoftmaxBackward):
            return self.shape(op.out)
        if isinstance(op, NllLossBackward):
            return self.shape(op.logp)
        if isinstance(op, MaxPool):
            src = self.shape(op.src)
            d = len(op.kernel)
            pooled = tuple((n - k) // s + 1 for n, k, s in zip(src[-d:], op.kernel, op.stride,
                                                              strict=True))
            return (*src[:-d], *pooled)
        if isinstance(op, TakeAt):
            return self.shape(op.index)
        if isinstance(op, Full | ScatterAdd | WindowAdd | Conv | DenseKernel | MaxPoolBackward):
            return tuple(op.shape)
        if isinstance(op, Stack):
            part = next(self.shape(p) for p in op.parts if p is not None)
            return (*part[:op.axis], sp.Integer(len(op.parts)), *part[op.axis:])
        return ()  # NllLoss, Seed: the loss and dL/dL

    # -- reads ---------------------------------------------------------------------------
    def ref(self, name: str, indices: Sequence[sp.Expr]) -> sp.Expr:
        """``name[indices]`` (the bare name for a 0-d array)."""
        return sp.Indexed(name, *indices) if indices else sp.Symbol(name)

    def read(self, view: AnyView, axes: Sequence[sp.Expr]) -> sp.Expr:
        """The entry a view reads where the body's axes take the values ``axes``."""
        if isinstance(view, Iota):
            return axes[view.axis]
        if isinstance(view, View):
            # An axis of extent 1 broadcasts: it is read at 0 whatever the body's index
            # (a shared subexpression laid out as [N, 1, C] and read in an [N, T, C] body).
            shape = self.shape(view.src)
            if not view.picks and not view.places:  # as it is: the body's axes, or 0-d
                return self.ref(view.src, [sp.Integer(0) if d == 1 else a
                                           for d, a in zip(shape, axes, strict=False)])
            placed = iter(view.places)
            out: list[sp.Expr] = []
            for d, pick in zip(shape, view.picks, strict=True):
                if pick is not None:
                    out.append(sp.Integer(pick))
                    continue
                axis = axes[next(placed)]
                out.append(sp.Integer(0) if d == 1 else axis)
            return self.ref(view.src, out)
        if isinstance(view, Gather):
            row = self.ref(view.index, [axes[p] for p in view.index_places])
            return self.ref(view.src, [row, *(axes[p] for p in view.places)])
        if isinstance(view, Window):
            out: list[sp.Expr] = []
            kept = iter(view.axes)
            for pick in view.picks:
                if pick is not None:
                    out.append(sp.Integer(pick))
                    continue
                axis = next(kept)
                if isinstance(axis, Slide):
                    tap = axes[axis.kernel_place] if axis.kernel_place >= 0 else 0
                    out.append(axis.stride * axes[axis.place] + tap - axis.pad)
                else:
                    out.append(axes[axis])
            return self.ref(view.src, out)
        if isinstance(view, Reshape):
            return Reshaped(sp.Symbol(view.src), sp.Tuple(*(-1 if p is None else p
                                                            for p in view.picks)),
                            sp.Tuple(*view.fine), sp.Tuple(*view.perm),
                            sp.Tuple(*view.shape), *(axes[a] for a in view.places))
        raise TypeError(f"no LaTeX for the view {view!r}")  # pragma: no cover

    def body(self, op: Map | Reduce, axes: Sequence[sp.Expr]) -> sp.Expr:
        return _boolean_free(op.body).xreplace({sym: self.read(view, axes)
                                                for sym, view in op.views})

    # -- statements ----------------------------------------------------------------------
    def expression(self, stmt: Assign) -> tuple[tuple[sp.Symbol, ...], sp.Expr]:
        """The statement's axes ``i_0, i_1, ...`` and one entry of its result."""
        axes = tuple(out_index(n) for n in range(self.rank(stmt.target)))
        return axes, getattr(self, "_" + type(stmt.op).__name__)(stmt.op, list(axes))

    def results(self, stmt: Assign) -> list[tuple[str, tuple[sp.Symbol, ...], sp.Expr]]:
        """Each array the statement defines, its axes and one entry of it: the target
        alone, or every result of an op with several (a layer norm's)."""
        op = stmt.op
        if isinstance(op, LayerNormBackward):
            names = iter(stmt.targets)
            return [self._layer_norm_grad(op, k, next(names))
                    for k, on in enumerate(op.outputs) if on]
        if isinstance(op, LayerNorm) and stmt.also:
            mean, rstd = stmt.also
            rows = tuple(out_index(n) for n in range(self.rank(op.src) - 1))
            stat_axes = (*rows, out_index(len(rows)))
            m, v = self._layer_norm_stats(op.src, rows)
            axes, out = self.expression(stmt)
            return [(stmt.target, axes, out), (mean, stat_axes, m),
                    (rstd, stat_axes, 1 / sp.sqrt(v + sp.Float(op.eps)))]
        axes, expr = self.expression(stmt)
        if isinstance(op, NllLoss) and stmt.also:  # the loss, then how many rows count
            return [(stmt.target, axes, expr),
                    (stmt.also[0], (), self._counted(op.ids, op.ignore)[2])]
        if isinstance(op, MaxPool) and stmt.also:  # the maxima, then their indices
            return [(stmt.target, axes, expr),
                    (stmt.also[0], axes, self._MaxPool(replace(op, indices=True), list(axes)))]
        return [(stmt.target, axes, expr)]

    def rows(self, stmt: Assign) -> list[tuple[str, str]]:
        p = self.printer
        return [(p._print(self.ref(name, axes)), f"= {p._print(expr)}")
                for name, axes, expr in self.results(stmt)]

    def _layer_norm_stats(self, src: str, rows: Sequence[sp.Expr]) -> tuple[sp.Expr, sp.Expr]:
        """A row's mean and (biased) variance over the last axis of ``src``."""
        c = self.shape(src)[-1]
        s, t = sum_index(0), sum_index(1)
        mean = self._sum([(s, c)], self.ref(src, [*rows, s])) / c
        return mean, self._sum([(t, c)], (self.ref(src, [*rows, t]) - mean) ** 2) / c

    def _LayerNorm(self, op: LayerNorm, axes: list[sp.Expr]) -> sp.Expr:
        mean, var = self._layer_norm_stats(op.src, axes[:-1])
        out = ((self.ref(op.src, axes) - mean) / sp.sqrt(var + sp.Float(op.eps))
               * self.ref(op.weight, [axes[-1]]))
        return out + self.ref(op.bias, [axes[-1]]) if op.bias else out

    def _LayerNormBackward(self, op: LayerNormBackward, axes: list[sp.Expr]) -> sp.Expr:
        # the first result asked for (the statement's target); results() gives them all
        first = op.outputs.index(True)
        return self._layer_norm_grad(op, first, "")[2]

    def _layer_norm_grad(self, op: LayerNormBackward, k: int, name: str
                         ) -> tuple[str, tuple[sp.Symbol, ...], sp.Expr]:
        shape = self.shape(op.src)
        c = shape[-1]

        def xhat(at: Sequence[sp.Expr]) -> sp.Expr:
            rows = list(at[:-1])
            return ((self.ref(op.src, at) - self.ref(op.mean, [*rows, 0]))
                    * self.ref(op.rstd, [*rows, 0]))

        if k == 0:  # the input's
            axes = tuple(out_index(n) for n in range(len(shape)))
            rows, s = list(axes[:-1]), sum_index(0)
            g, w = self.ref(op.grad, axes), self.ref(op.weight, [axes[-1]])
            gs, ws = self.ref(op.grad, [*rows, s]), self.ref(op.weight, [s])
            mean_g = self._sum([(s, c)], gs * ws) / c
            mean_gx = self._sum([(s, c)], gs * ws * xhat([*rows, s])) / c
            return name, axes, (self.ref(op.rstd, [*rows, 0])
                                * (g * w - mean_g - xhat(list(axes)) * mean_gx))
        feature = out_index(0)
        rows = [(sum_index(n), d) for n, d in enumerate(shape[:-1])]
        at = [r for r, _ in rows] + [feature]
        term = self.ref(op.grad, at) * (xhat(at) if k == 1 else 1)
        return name, (feature,), self._sum(rows, term)

    def _sum(self, over: Sequence[tuple[sp.Symbol, sp.Expr]], term: sp.Expr) -> sp.Expr:
        """``term`` summed over each (index, extent)."""
        if not over:
            return term
        return sp.Sum(term, *((s, 0, n - 1) for s, n in over))

    def _Map(self, op: Map, axes: list[sp.Expr]) -> sp.Expr:
        return self.body(op, axes)

    def _Reduce(self, op: Reduce, axes: list[sp.Expr]) -> sp.Expr:
        extents = self._body_extents(op.views, op.rank)
        free = iter(axes)
        summed = iter(sum_index(n) for n in range(op.rank))
        full = [next(summed) if a in op.axes else next(free) for a in range(op.rank)]
        over = [(full[a], extents[a]) for a in op.axes]
        body = self.body(op, full)
        if op.kind == "sum":
            return self._sum(over, body)
        if op.kind == "max":
            return MaxOver(body, *((s, 0, n - 1) for s, n in over))
        if op.kind == "logsumexp":
            return sp.log(self._sum(over, sp.exp(body)))
        return self._sum(over, Iverson(body))  # count: how many entries hold

    def _product(self, op: MatMul, axes: list[sp.Expr]) -> sp.Expr:
        s = sum_index(0)
        a = self.shape(op.a)
        *rows, col = axes
        a_idx = [*rows[:-1], s, rows[-1]] if op.ta else [*rows, s]
        b_idx = [col, s] if op.tb else [s, col]
        return self._sum([(s, a[-2] if op.ta else a[-1])],
                         self.ref(op.a, a_idx) * self.ref(op.b, b_idx))

    def _MatMul(self, op: MatMul, axes: list[sp.Expr]) -> sp.Expr:
        return self._product(op, axes)

    def _Linear(self, op: Linear, axes: list[sp.Expr]) -> sp.Expr:
        return self._product(op.product, axes) + self.read(op.bias, axes)

    def _Einsum(self, op: Einsum, axes: list[sp.Expr]) -> sp.Expr:
        inputs, output = op.subscripts.split("->")
        letters: dict[str, sp.Expr] = dict(zip(output, axes, strict=True))
        summed: list[tuple[sp.Symbol, sp.Expr]] = []
        for name, subs in zip(op.operands, inputs.split(","), strict=True):
            for c, d in zip(subs, self.shape(name), strict=True):
                if c not in letters:
                    letters[c] = sum_index(len(summed))
                    summed.append((letters[c], d))
        term = sp.Mul(*(self.ref(name, [letters[c] for c in subs])
                        for name, subs in zip(op.operands, inputs.split(","), strict=True)))
        return self._sum(summed, term)

    def _along(self, name: str, axes: list[sp.Expr], axis: int
               ) -> tuple[list[sp.Expr], list[tuple[sp.Symbol, sp.Expr]]]:
        """``axes`` with the one at ``axis`` replaced by a summed index over ``name``'s."""
        s = sum_index(0)
        out = list(axes)
        out[axis] = s
        return out, [(s, self.shape(name)[axis])]

    def _LogSoftmax(self, op: LogSoftmax, axes: list[sp.Expr]) -> sp.Expr:
        other, over = self._along(op.src, axes, op.axis)
        return self.ref(op.src, axes) - sp.log(self._sum(over, sp.exp(self.ref(op.src, other))))

    def _Softmax(self, op: Softmax, axes: list[sp.Expr]) -> sp.Expr:
        other, over = self._along(op.src, axes, op.axis)
        return sp.exp(self.ref(op.src, axes)) / self._sum(over, sp.exp(self.ref(op.src, other)))

    def _SoftmaxBackward(self, op: SoftmaxBackward, axes: list[sp.Expr]) -> sp.Expr:
        other, over = self._along(op.out, axes, op.axis)
        total = self._sum(over, self.ref(op.out, other) * self.ref(op.grad, other))
        return self.ref(op.out, axes) * (self.ref(op.grad, axes) - total)

    def _LogSoftmaxBackward(self, op: LogSoftmaxBackward, axes: list[sp.Expr]) -> sp.Expr:
        other, over = self._along(op.out, axes, op.axis)
        return (self.ref(op.grad, axes)
                - sp.exp(self.ref(op.out, axes)) * self._sum(over, self.ref(op.grad, other)))

    def _counted(self, ids: str, ignore: int
                 ) -> tuple[list[tuple[sp.Symbol, sp.Expr]], sp.Expr, sp.Expr]:
        """The rows of ``ids`` (summed indices), whether each counts, and how many do."""
        rows = [(sum_index(n), d) for n, d in enumerate(self.shape(ids))]
        counted = Iverson(sp.Ne(self.ref(ids, [r for r, _ in rows]), ignore))
        return rows, counted, self._sum(rows, counted)

    def _NllLoss(self, op: NllLoss, axes: list[sp.Expr]) -> sp.Expr:
        rows, counted, count = self._counted(op.ids, op.ignore)
        at = [r for r, _ in rows]
        picked = self.ref(op.logp, [*at, self.ref(op.ids, at)])
        return -self._sum(rows, counted * picked) / count

    def _NllLossBackward(self, op: NllLossBackward, axes: list[sp.Expr]) -> sp.Expr:
        *rows, cls = axes
        count = sp.Symbol(op.count) if op.count else self._counted(op.ids, op.ignore)[2]
        at = self.ref(op.ids, rows)
        hit = Iverson(sp.Eq(cls, at)) * Iverson(sp.Ne(at, op.ignore))
        return -sp.Symbol(op.seed) / count * hit

    def _Full(self, op: Full, axes: list[sp.Expr]) -> sp.Expr:
        return sp.sympify(op.value)

    def _Seed(self, op: Seed, axes: list[sp.Expr]) -> sp.Expr:
        return sp.Integer(1)

    def _ScatterAdd(self, op: ScatterAdd, axes: list[sp.Expr]) -> sp.Expr:
        rows = [(sum_index(n), d) for n, d in enumerate(self.shape(op.index))]
        at = [r for r, _ in rows]
        row, *rest = axes
        term = Iverson(sp.Eq(self.ref(op.index, at), row)) * self.ref(op.values, [*at, *rest])
        return self._sum(rows, term)

    def _WindowAdd(self, op: WindowAdd, axes: list[sp.Expr]) -> sp.Expr:
        slid = {axis: (stride, pad, count, size) for axis, stride, pad, count, size in op.slides}
        index: list[sp.Expr] = []
        summed: list[tuple[sp.Symbol, sp.Expr]] = []
        where: list[sp.Expr] = []
        for a, ax in enumerate(axes):
            if a not in slid:
                index.append(ax)
                continue
            stride, pad, count, size = slid[a]
            pos, tap = sum_index(len(summed)), sum_index(len(summed) + 1)
            summed += [(pos, sp.Integer(count)), (tap, sp.Integer(size))]
            index += [pos, tap]
            where.append(Iverson(sp.Eq(stride * pos + tap - pad, ax)))
        return self._sum(summed, sp.Mul(*where) * self.ref(op.values, index))

    def _Conv(self, op: Conv, axes: list[sp.Expr]) -> sp.Expr:
        d = len(op.stride)
        geometry = list(zip(op.stride, op.pad, strict=True))

        def read_at(positions: Sequence[sp.Expr], taps: Sequence[sp.Expr]) -> list[sp.Expr]:
            # the input entry tap t of the window at position i reads: s i + t - p
            return [st * i + t - pd for (st, pd), i, t in zip(geometry, positions, taps,
                                                              strict=True)]

        if op.mode == "forward":  # out[n, o, i] = sum_{c,t} B[o, c, t] A[n, c, s i + t - p]
            n, o, *pos = axes
            kernel = self.shape(op.b)
            c = sum_index(0)
            taps = [sum_index(1 + k) for k in range(d)]
            term = self.ref(op.b, [o, c, *taps]) * self.ref(op.a, [n, c, *read_at(pos, taps)])
            out = self._sum([(c, kernel[1]), *zip(taps, kernel[2:], strict=True)], term)
            return out + self.ref(op.bias, [o]) if op.bias else out
        if op.mode == "weight":  # out[o, c, t] = sum_{n,i} B[n, o, i] A[n, c, s i + t - p]
            o, c, *tap = axes
            grad = self.shape(op.b)
            n = sum_index(0)
            pos = [sum_index(1 + k) for k in range(d)]
            term = self.ref(op.b, [n, o, *pos]) * self.ref(op.a, [n, c, *read_at(pos, tap)])
            return self._sum([(n, grad[0]), *zip(pos, grad[2:], strict=True)], term)
        # input: the adjoint spread back over every window that read each position
        n, c, *at = axes
        grad, kernel = self.shape(op.a), self.shape(op.b)
        o = sum_index(0)
        pos = [sum_index(1 + k) for k in range(d)]
        taps = [sum_index(1 + d + k) for k in range(d)]
        where = sp.Mul(*(Iverson(sp.Eq(r, h)) for r, h in
                         zip(read_at(pos, taps), at, strict=True)))
        term = where * self.ref(op.a, [n, o, *pos]) * self.ref(op.b, [o, c, *taps])
        return self._sum([(o, grad[1]), *zip(pos, grad[2:], strict=True),
                          *zip(taps, kernel[2:], strict=True)], term)

    def _DenseKernel(self, op: DenseKernel, axes: list[sp.Expr]) -> sp.Expr:
        # entry [o P + i, c S + h]: the tap t of kernel[o, c] with s i + t - p = h
        cout, cin, *taps = self.shape(op.kernel)
        positions = [(n + 2 * p - k) // st + 1 for n, k, st, p in
                     zip(op.size, taps, op.stride, op.pad, strict=True)]
        o, *pos = _unflat(axes[0], [cout, *positions])
        c, *at = _unflat(axes[1], [cin, *op.size])
        t = [sum_index(k) for k in range(len(taps))]
        where = sp.Mul(*(Iverson(sp.Eq(st * i + tk - p, h)) for st, p, i, tk, h in
                         zip(op.stride, op.pad, pos, t, at, strict=True)))
        return self._sum(list(zip(t, taps, strict=True)),
                         where * self.ref(op.kernel, [o, c, *t]))

    def _MaxPool(self, op: MaxPool, axes: list[sp.Expr]) -> sp.Expr:
        d = len(op.kernel)
        lead, pos = axes[:-d], axes[-d:]
        taps = [sum_index(k) for k in range(d)]
        read = self.ref(op.src, [*lead, *(st * i + t for st, i, t in
                                          zip(op.stride, pos, taps, strict=True))])
        limits = [(t, 0, k - 1) for t, k in zip(taps, op.kernel, strict=True)]
        return ArgMaxOver(read, *limits) if op.indices else MaxOver(read, *limits)

    def _TakeAt(self, op: TakeAt, axes: list[sp.Expr]) -> sp.Expr:
        shape = self.shape(op.src)
        at = self.ref(op.index, axes)
        lead = axes[:len(shape) - op.d]
        return self.ref(op.src, [*lead, *_unflat(at, shape[-op.d:])])

    def _MaxPoolBackward(self, op: MaxPoolBackward, axes: list[sp.Expr]) -> sp.Expr:
        d = len(op.kernel)
        lead, at = axes[:-d], axes[-d:]
        pooled = self.shape(op.grad)[-d:]
        pos = [sum_index(k) for k in range(d)]
        term = (Iverson(sp.Eq(self.ref(op.index, [*lead, *pos]), _flat(at, op.shape[-d:])))
                * self.ref(op.grad, [*lead, *pos]))
        return self._sum(list(zip(pos, pooled, strict=True)), term)

    def _Stack(self, op: Stack, axes: list[sp.Expr]) -> sp.Expr:
        rest = [a for n, a in enumerate(axes) if n != op.axis]
        return Cases(*(x for j, part in enumerate(op.parts)
                       for x in (self.ref(part, rest) if part else sp.Integer(0),
                                 sp.Eq(axes[op.axis], j))))


def _flat(index: Sequence[sp.Expr], shape: Sequence[sp.Expr]) -> sp.Expr:
    """The row-major flat position of ``index`` in an array of ``shape``."""
    out: sp.Expr = sp.Integer(0)
    for i, extent in zip(index, shape, strict=True):
        out = out * extent + i
    return out


def _unflat(flat: sp.Expr, shape: Sequence[sp.Expr]) -> list[sp.Expr]:
    """The row-major position of ``flat`` in an array of ``shape``."""
    out: list[sp.Expr] = []
    for n in range(len(shape)):
        stride = math.prod(shape[n + 1:]) if shape[n + 1:] else 1
        part = sp.floor(flat / stride) if stride != 1 else flat
        out.append(part if n == 0 else sp.Mod(part, shape[n], evaluate=False))
    return out


def section(program: Program, stmts: Sequence[Assign], function: str) -> list[Block]:
    """The statements of the generated ``function``, forward and backward, one equation
    each (the document's last section when asked for)."""
    printer = ProgramPrinter(program, stmts)
    out: list[Block] = [Heading(2, spans("The computation as generated")), Para(spans(
        "The statements of the generated ", code(function), " after fusion and the kernel "
        "passes, in order, with the code's names: each is one line of the torch module's ",
        code(function), " (the numpy module's computes the same from a program that can "
        "also differentiate the inputs, so some of its temporaries are numbered "
        "differently), and the adjoint of ", code("x"), " is ", code("d_x"), ". Indices "
        "count from 0 as in the code: ", inline("i_0, i_1, \\ldots"), " are a statement's "
        "own axes, ", inline("s_0, s_1, \\ldots"), " the axes it sums over; ",
        inline("[c]"), " is 1 where the condition ", inline("c"), " holds, else 0; a "
        "window read outside its array is 0."))]
    for phase, title in (("forward", "Forward"), ("backward", "Backward")):
        rows = tuple(row for s in stmts if s.phase == phase for row in printer.rows(s))
        if rows:
            out += [Heading(3, spans(title)), Display(rows)]
    return out


__all__ = ["Cases", "CodeIndexPrinter", "Iverson", "Logic", "ProgramPrinter", "Reshaped",
           "out_index", "section", "sum_index"]
