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

import sympy as sp
from sympy.printing.latex import LatexPrinter

from ..ir.nodes import (
    AnyView,
    Assign,
    Conv,
    Einsum,
    Full,
    Gather,
    Iota,
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
from .notation import _esc


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
    """``And`` / ``Or`` / ``Not`` over entries of boolean arrays: the first argument names
    the connective (a Symbol), the rest are its operands."""


def _boolean_free(expr: sp.Expr) -> sp.Expr:
    """``expr`` with its conditions made plain functions, so that a boolean placeholder
    (a mask array) can be replaced by the entry it reads."""
    def swap(e: sp.Basic) -> sp.Basic:
        if isinstance(e, sp.Piecewise):
            return Cases(*(x for pair in e.args for x in pair))
        return Logic(sp.Symbol(type(e).__name__), *e.args)

    return expr.replace(lambda e: isinstance(e, sp.Piecewise | sp.And | sp.Or | sp.Not), swap)


class Operator(sp.Function):
    """An array read through a named operator, ``op(array)`` entry by entry: the first
    argument is the LaTeX of the operator applied to the array (a Symbol), the rest are
    the entry's indices."""


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

    def _print_Operator(self, expr: sp.Expr, exp: object = None) -> str:
        op, *indices = expr.args
        out = rf"\left[{op.name}\right]_{{{self.sub(indices)}}}"
        return rf"{out}^{{{exp}}}" if exp is not None else out

    def _print_Iverson(self, expr: sp.Expr, exp: object = None) -> str:
        return rf"\left[{self._print(expr.args[0])}\right]"

    def _print_Cases(self, expr: sp.Expr, exp: object = None) -> str:
        rows = []
        args = expr.args
        for value, cond in zip(args[::2], args[1::2], strict=True):
            when = r"\text{otherwise}" if cond == sp.true else rf"\text{{if }} {self._print(cond)}"
            rows.append(f"{self._print(value)} & {when}")
        return r"\begin{cases} " + r" \\ ".join(rows) + r" \end{cases}"

    def _print_Logic(self, expr: sp.Expr, exp: object = None) -> str:
        kind, *args = expr.args
        if kind.name == "Not":
            return rf"\neg {self._print(args[0])}"
        joint = r" \wedge " if kind.name == "And" else r" \vee "
        return joint.join(rf"\left({self._print(a)}\right)" for a in args)

    # The kernels the passes form, as the formula each computes.
    def _print_TanhBackward(self, expr: sp.Expr, exp: object = None) -> str:
        g, y = expr.args
        return self._print(g * (1 - y**2))

    def _print_SigmoidBackward(self, expr: sp.Expr, exp: object = None) -> str:
        g, y = expr.args
        return self._print(g * y * (1 - y))

    def _print_ReluBackward(self, expr: sp.Expr, exp: object = None) -> str:
        g, x = expr.args
        return self._print(g * Iverson(sp.StrictGreaterThan(x, 0)))

    def _print_GeluTanh(self, expr: sp.Expr, exp: object = None) -> str:
        out = rf"\operatorname{{gelu}}_{{\tanh}}\left({self._print(expr.args[0])}\right)"
        return rf"{out}^{{{exp}}}" if exp is not None else out

    def _print_GeluTanhBackward(self, expr: sp.Expr, exp: object = None) -> str:
        g, x = expr.args
        return rf"{self._print(g)}\,\operatorname{{gelu}}_{{\tanh}}'\left({self._print(x)}\right)"


class ProgramPrinter:
    """Each statement of one program as ``(lhs, "= rhs")``, one method per op type."""

    def __init__(self, program: Program, stmts: Sequence[Assign]) -> None:
        self.program = program
        self.ranks = {name: len(shape) for name, shape in program.shapes.items()}
        for stmt in stmts:
            if stmt.target not in self.ranks:  # a temporary a pass made
                self.ranks[stmt.target] = self._rank_of(stmt.op)
        self.printer = CodeIndexPrinter(list(self.ranks))

    def _rank_of(self, op: object) -> int:
        """How many axes the result of ``op`` has."""
        if isinstance(op, Map):
            # A shared subexpression (CSE) is laid out in the axes of the bodies it came
            # from: as wide as its widest read. An array read as it is has its own axes
            # (its view's out_rank is that of whichever body CSE took the symbol from).
            return max((self.rank(v.src) if isinstance(v, View) and not v.picks
                        and not v.places else v.out_rank for _, v in op.views), default=0)
        if isinstance(op, Reduce):
            return op.rank - len(op.axes) if op.kind != "count" else 0
        if isinstance(op, MatMul):
            return op.a_rank
        if isinstance(op, Linear):
            return op.product.a_rank
        if isinstance(op, Einsum):
            return len(op.subscripts.split("->")[1])
        if isinstance(op, LogSoftmax | Softmax | MaxPool):
            return self.rank(op.src)
        if isinstance(op, SoftmaxBackward | LogSoftmaxBackward):
            return self.rank(op.out)
        if isinstance(op, NllLossBackward):
            return self.rank(op.logp)
        if isinstance(op, TakeAt):
            return self.rank(op.index)
        if isinstance(op, Full | ScatterAdd | WindowAdd | Conv | MaxPoolBackward):
            return len(op.shape)
        if isinstance(op, Stack):
            return 1 + next(self.rank(p) for p in op.parts if p is not None)
        return 0  # NllLoss, Seed: the loss and dL/dL

    # -- reads ---------------------------------------------------------------------------
    def rank(self, name: str) -> int:
        if name not in self.ranks:
            raise KeyError(f"no shape for {name!r} in the program")  # pragma: no cover
        return self.ranks[name]

    def ref(self, name: str, indices: Sequence[sp.Expr]) -> sp.Expr:
        """``name[indices]`` (the bare name for a 0-d array)."""
        return sp.Indexed(name, *indices) if indices else sp.Symbol(name)

    def read(self, view: AnyView, axes: Sequence[sp.Expr]) -> sp.Expr:
        """The entry a view reads where the body's axes take the values ``axes``."""
        if isinstance(view, Iota):
            return axes[view.axis]
        if isinstance(view, View):
            if not view.picks and not view.places:  # as it is: the body's axes, or 0-d
                return self.ref(view.src, axes if self.rank(view.src) else ())
            placed = iter(view.places)
            return self.ref(view.src, [sp.Integer(p) if p is not None else axes[next(placed)]
                                       for p in view.picks])
        if isinstance(view, Gather):
            row = self.ref(view.index, [axes[p] for p in view.index_places])
            return self.ref(view.src, [row, *(axes[p] for p in view.places)])
        if isinstance(view, Window):
            out: list[sp.Expr] = []
            kept = iter(a for a in view.axes)
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
            return self._reshaped(view, axes)
        raise TypeError(f"no LaTeX for the view {view!r}")  # pragma: no cover

    def _reshaped(self, view: Reshape, axes: Sequence[sp.Expr]) -> sp.Expr:
        """A reshape (then a permutation, then a reshape) of the array's kept axes, read
        at the output axes it lands on: written as the operators it applies."""
        p = self.printer
        text = p.array(view.src)
        if any(pick is not None for pick in view.picks):
            fixed = ",".join("" if pick is None else str(pick) for pick in view.picks)
            text = rf"{text}_{{{fixed}}}"  # the kept axes are the empty places
        if view.perm != tuple(range(len(view.perm))):
            fine = r"\times ".join(p._print(d) for d in view.fine)
            perm = ",".join(str(a) for a in view.perm)
            text = (rf"\operatorname{{permute}}_{{({perm})}}\left("
                    rf"\operatorname{{reshape}}_{{{fine}}}\left({text}\right)\right)")
        shape = r"\times ".join(p._print(d) for d in view.shape)
        text = rf"\operatorname{{reshape}}_{{{shape}}}\left({text}\right)"
        return Operator(sp.Symbol(text), *(axes[a] for a in view.places))

    def body(self, op: Map | Reduce, axes: Sequence[sp.Expr]) -> sp.Expr:
        return _boolean_free(op.body).xreplace({sym: self.read(view, axes)
                                                for sym, view in op.views})

    # -- statements ----------------------------------------------------------------------
    def row(self, stmt: Assign) -> tuple[str, str]:
        rank = self.rank(stmt.target)
        axes = [out_index(n) for n in range(rank)]
        lhs = self.printer._print(self.ref(stmt.target, axes))
        method = getattr(self, "_" + type(stmt.op).__name__)
        rhs = method(stmt.op, axes)
        return lhs, f"= {rhs if isinstance(rhs, str) else self.printer._print(rhs)}"

    def _Map(self, op: Map, axes: list[sp.Expr]) -> sp.Expr:
        return self.body(op, axes)

    def _Reduce(self, op: Reduce, axes: list[sp.Expr]) -> str:
        free = iter(axes)
        summed = iter(sum_index(n) for n in range(op.rank))
        full = [next(summed) if a in op.axes else next(free) for a in range(op.rank)]
        over = [full[a] for a in op.axes]
        body = self.body(op, full)
        p = self.printer
        under = ",".join(p._print(s) for s in over)
        if op.kind == "sum":
            return rf"\sum_{{{under}}} {self._group(body)}"
        if op.kind == "max":
            return rf"\max_{{{under}}} {self._group(body)}"
        if op.kind == "logsumexp":
            return rf"\log \sum_{{{under}}} \exp\left({p._print(body)}\right)"
        # count: how many entries of a condition hold, over every axis
        return rf"\sum_{{{under}}} \left[{p._print(body)}\right]"

    def _group(self, expr: sp.Expr) -> str:
        text = self.printer._print(expr)
        return rf"\left({text}\right)" if isinstance(expr, sp.Add) else text

    def _sum(self, over: Sequence[sp.Expr], expr: sp.Expr) -> str:
        under = ",".join(self.printer._print(s) for s in over)
        return rf"\sum_{{{under}}} {self._group(expr)}"

    def _product(self, op: MatMul, axes: list[sp.Expr]) -> tuple[sp.Symbol, sp.Expr]:
        s = sum_index(0)
        *rows, col = axes
        a_idx = [*rows[:-1], s, rows[-1]] if op.ta else [*rows, s]
        b_idx = [col, s] if op.tb else [s, col]
        return s, self.ref(op.a, a_idx) * self.ref(op.b, b_idx)

    def _MatMul(self, op: MatMul, axes: list[sp.Expr]) -> str:
        s, term = self._product(op, axes)
        return self._sum([s], term)

    def _Linear(self, op: Linear, axes: list[sp.Expr]) -> str:
        s, term = self._product(op.product, axes)
        bias = self.printer._print(self.read(op.bias, axes))
        return f"{self._sum([s], term)} + {bias}"

    def _Einsum(self, op: Einsum, axes: list[sp.Expr]) -> str:
        inputs, output = op.subscripts.split("->")
        letters: dict[str, sp.Expr] = dict(zip(output, axes, strict=True))
        summed: list[sp.Expr] = []
        for letter in dict.fromkeys("".join(inputs.split(","))):
            if letter not in letters:
                letters[letter] = sum_index(len(summed))
                summed.append(letters[letter])
        term = sp.Mul(*(self.ref(name, [letters[c] for c in subs])
                        for name, subs in zip(op.operands, inputs.split(","), strict=True)))
        return self._sum(summed, term) if summed else self.printer._print(term)

    def _along(self, axes: list[sp.Expr], axis: int) -> tuple[list[sp.Expr], sp.Symbol]:
        """``axes`` with the one at ``axis`` replaced by a summed index."""
        s = sum_index(0)
        out = list(axes)
        out[axis] = s
        return out, s

    def _LogSoftmax(self, op: LogSoftmax, axes: list[sp.Expr]) -> str:
        other, s = self._along(axes, op.axis)
        p = self.printer
        return (rf"{p._print(self.ref(op.src, axes))} - \log \sum_{{{p._print(s)}}} "
                rf"\exp {p._print(self.ref(op.src, other))}")

    def _Softmax(self, op: Softmax, axes: list[sp.Expr]) -> str:
        other, s = self._along(axes, op.axis)
        p = self.printer
        return (rf"\frac{{\exp {p._print(self.ref(op.src, axes))}}}"
                rf"{{\sum_{{{p._print(s)}}} \exp {p._print(self.ref(op.src, other))}}}")

    def _SoftmaxBackward(self, op: SoftmaxBackward, axes: list[sp.Expr]) -> str:
        other, s = self._along(axes, op.axis)
        p = self.printer
        total = self._sum([s], self.ref(op.out, other) * self.ref(op.grad, other))
        return (rf"{p._print(self.ref(op.out, axes))} \left({p._print(self.ref(op.grad, axes))}"
                rf" - {total}\right)")

    def _LogSoftmaxBackward(self, op: LogSoftmaxBackward, axes: list[sp.Expr]) -> str:
        other, s = self._along(axes, op.axis)
        p = self.printer
        total = self._sum([s], self.ref(op.grad, other))
        return (rf"{p._print(self.ref(op.grad, axes))} - \exp\left("
                rf"{p._print(self.ref(op.out, axes))}\right) {total}")

    def _counted(self, ids: str, ignore: int) -> tuple[list[sp.Expr], sp.Expr, str]:
        """The rows of ``ids`` (summed indices), whether each counts, and how many do."""
        rows = [sum_index(n) for n in range(self.rank(ids))]
        counted = Iverson(sp.Ne(self.ref(ids, rows), ignore))
        return rows, counted, self._sum(rows, counted)

    def _NllLoss(self, op: NllLoss, axes: list[sp.Expr]) -> str:
        rows, counted, count = self._counted(op.ids, op.ignore)
        picked = self.ref(op.logp, [*rows, self.ref(op.ids, rows)])
        return rf"-\frac{{{self._sum(rows, counted * picked)}}}{{{count}}}"

    def _NllLossBackward(self, op: NllLossBackward, axes: list[sp.Expr]) -> str:
        *rows, cls = axes
        _, _, count = self._counted(op.ids, op.ignore)
        at = self.ref(op.ids, rows)
        hit = Iverson(sp.Eq(cls, at)) * Iverson(sp.Ne(at, op.ignore))
        p = self.printer
        return rf"-\frac{{{p._print(sp.Symbol(op.seed))}}}{{{count}}} {p._print(hit)}"

    def _Full(self, op: Full, axes: list[sp.Expr]) -> sp.Expr:
        return sp.sympify(op.value)

    def _Seed(self, op: Seed, axes: list[sp.Expr]) -> str:
        return r"1 \quad (\partial L / \partial L)"

    def _ScatterAdd(self, op: ScatterAdd, axes: list[sp.Expr]) -> str:
        k = self.rank(op.index)
        rows = [sum_index(n) for n in range(k)]
        row, *rest = axes
        term = Iverson(sp.Eq(self.ref(op.index, rows), row)) * self.ref(op.values, [*rows, *rest])
        return self._sum(rows, term)

    def _WindowAdd(self, op: WindowAdd, axes: list[sp.Expr]) -> str:
        slid = {axis: (stride, pad) for axis, stride, pad, _, _ in op.slides}
        index: list[sp.Expr] = []
        summed: list[sp.Expr] = []
        where: list[sp.Expr] = []
        for a, ax in enumerate(axes):
            if a not in slid:
                index.append(ax)
                continue
            stride, pad = slid[a]
            pos, tap = sum_index(len(summed)), sum_index(len(summed) + 1)
            summed += [pos, tap]
            index += [pos, tap]
            where.append(Iverson(sp.Eq(stride * pos + tap - pad, ax)))
        return self._sum(summed, sp.Mul(*where) * self.ref(op.values, index))

    def _spatial(self, d: int, start: int) -> list[sp.Symbol]:
        return [sum_index(start + n) for n in range(d)]

    def _Conv(self, op: Conv, axes: list[sp.Expr]) -> str:
        d = len(op.stride)
        taps = self._spatial(d, 1)
        if op.mode == "forward":
            n, o, *pos = axes
            c = sum_index(0)
            read = [st * i + t - pd for st, i, t, pd in zip(op.stride, pos, taps, op.pad,
                                                              strict=True)]
            term = self.ref(op.b, [o, c, *taps]) * self.ref(op.a, [n, c, *read])
            out = self._sum([c, *taps], term)
            if op.bias:
                out += f" + {self.printer._print(self.ref(op.bias, [o]))}"
            return out
        if op.mode == "weight":
            o, c, *tap = axes
            n = sum_index(0)
            pos = self._spatial(d, 1)
            read = [st * i + t - pd for st, i, t, pd in zip(op.stride, pos, tap, op.pad,
                                                              strict=True)]
            term = self.ref(op.b, [n, o, *pos]) * self.ref(op.a, [n, c, *read])
            return self._sum([n, *pos], term)
        # input: the adjoint spread back over every window that read each position
        n, c, *at = axes
        o = sum_index(0)
        pos = self._spatial(d, 1)
        taps = self._spatial(d, 1 + d)
        where = sp.Mul(*(Iverson(sp.Eq(st * i + t - pd, h)) for st, i, t, pd, h in
                         zip(op.stride, pos, taps, op.pad, at, strict=True)))
        term = where * self.ref(op.a, [n, o, *pos]) * self.ref(op.b, [o, c, *taps])
        return self._sum([o, *pos, *taps], term)

    def _MaxPool(self, op: MaxPool, axes: list[sp.Expr]) -> str:
        d = len(op.kernel)
        lead, pos = axes[:-d], axes[-d:]
        taps = self._spatial(d, 0)
        read = self.ref(op.src, [*lead, *(st * i + t for st, i, t in
                                          zip(op.stride, pos, taps, strict=True))])
        p = self.printer
        under = ",".join(p._print(t) for t in taps)
        if not op.indices:
            return rf"\max_{{{under}}} {p._print(read)}"
        flat = self._flat([st * i + t for st, i, t in zip(op.stride, pos, taps, strict=True)],
                          self.program.shapes[op.src][-d:])
        return (rf"{p._print(flat)} \quad \text{{at the first }} {under} "
                rf"\text{{ where }} {p._print(read)} \text{{ is largest}}")

    @staticmethod
    def _flat(index: Sequence[sp.Expr], shape: Sequence[sp.Expr]) -> sp.Expr:
        """The row-major flat position of ``index`` in an array of ``shape``."""
        out: sp.Expr = sp.Integer(0)
        for i, extent in zip(index, shape, strict=True):
            out = out * extent + i
        return out

    def _unflat(self, flat: sp.Expr, shape: Sequence[sp.Expr]) -> list[sp.Expr]:
        """The row-major position of ``flat`` in an array of ``shape``."""
        out: list[sp.Expr] = []
        for n in range(len(shape)):
            stride = math.prod(shape[n + 1:]) if shape[n + 1:] else 1
            part = sp.floor(flat / stride) if stride != 1 else flat
            out.append(part if n == 0 else sp.Mod(part, shape[n], evaluate=False))
        return out

    def _TakeAt(self, op: TakeAt, axes: list[sp.Expr]) -> sp.Expr:
        shape = self.program.shapes[op.src]
        at = self.ref(op.index, axes)
        lead = axes[:len(shape) - op.d]
        return self.ref(op.src, [*lead, *self._unflat(at, shape[-op.d:])])

    def _MaxPoolBackward(self, op: MaxPoolBackward, axes: list[sp.Expr]) -> str:
        d = len(op.kernel)
        lead, at = axes[:-d], axes[-d:]
        pos = self._spatial(d, 0)
        flat = self._flat(at, op.shape[-d:])
        term = (Iverson(sp.Eq(self.ref(op.index, [*lead, *pos]), flat))
                * self.ref(op.grad, [*lead, *pos]))
        return self._sum(pos, term)

    def _Stack(self, op: Stack, axes: list[sp.Expr]) -> str:
        rest = [a for n, a in enumerate(axes) if n != op.axis]
        p = self.printer
        rows = [f"{p._print(self.ref(part, rest)) if part else '0'} & "
                rf"\text{{if }} {p._print(axes[op.axis])} = {j}"
                for j, part in enumerate(op.parts)]
        return r"\begin{cases} " + r" \\ ".join(rows) + r" \end{cases}"


def section(program: Program, stmts: Sequence[Assign], function: str) -> list[Block]:
    """The statements of the generated ``function``, forward and backward, one equation
    each (the document's last section when asked for)."""
    printer = ProgramPrinter(program, stmts)
    out: list[Block] = [Heading(2, spans("The computation as generated")), Para(spans(
        "The statements of the generated ", code(function), " after fusion and the kernel "
        "passes, in order, with the code's names: each is one line of the numpy and of the "
        "torch module, and the adjoint of ", code("x"), " is ", code("d_x"), ". Indices "
        "count from 0 as in the code: ", inline("i_0, i_1, \\ldots"), " are a statement's "
        "own axes, ", inline("s_0, s_1, \\ldots"), " the axes it sums over; ",
        inline("[c]"), " is 1 where the condition ", inline("c"), " holds, else 0; a "
        "window read outside its array is 0."))]
    for phase, title in (("forward", "Forward"), ("backward", "Backward")):
        rows = tuple(printer.row(s) for s in stmts if s.phase == phase)
        if rows:
            out += [Heading(3, spans(title)), Display(rows)]
    return out


__all__ = ["CodeIndexPrinter", "Iverson", "ProgramPrinter", "out_index", "section",
           "sum_index"]
