"""Array printers: IR statements -> one line of numpy or torch code each.

Each backend is one class with one method per IR op. Elementwise bodies are printed by
the backend's sympy printer (:mod:`.printers`) after each view placeholder is replaced
by the view's code (``W.T``, ``lse[:, None]``). Helpers the printed code calls
(``_linear``, ``_logsumexp``, ...) are recorded in ``helpers`` so the template emits
exactly those.
"""

from __future__ import annotations

import math

import sympy as sp

from ..ir.nodes import (
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
from .printers import NumpyCodePrinter, TorchCodePrinter

# numpy ufuncs that take out= (what the printer emits for one-argument functions).
NUMPY_UFUNCS = frozenset(f"numpy.{name}" for name in (
    "tanh", "exp", "log", "sqrt", "sin", "cos", "tan", "sinh", "cosh", "arcsin", "arccos",
    "arctan", "arcsinh", "arccosh", "arctanh", "log1p", "expm1", "abs", "absolute",
    "square", "negative", "sign", "exp2", "log2", "log10"))


class ArrayPrinter:
    """What both backends share: views, bodies, dispatch on the op."""

    module: str
    swap_last: str  # a method call swapping an array's last two axes
    tensordot_call: tuple[str, str]  # the library's tensordot and its axes keyword
    tensordot_helpers: tuple[str, ...] = ()  # the template helpers that call needs

    def __init__(self, program: Program) -> None:
        self.program = program
        self.scalar = self._scalar_printer()
        self.scalar.scalars = frozenset(n for n, shape in program.shapes.items() if not shape)
        self.scalar.like = program.like
        self.helpers: set[str] = self.scalar.helpers
        self.masks: set[str] = set()  # arrays printed so far that hold a comparison

    def _scalar_printer(self) -> NumpyCodePrinter | TorchCodePrinter:
        raise NotImplementedError

    # -- pieces -------------------------------------------------------------------------
    def view(self, v: View | Iota | Gather | Reshape | Window) -> str:
        if isinstance(v, Reshape):
            return self.reshaped(v)
        if isinstance(v, Window):
            return self.windowed(v)
        if isinstance(v, Iota):
            return self.place(self.arange(v), (v.axis,), v.out_rank)
        if isinstance(v, Gather):
            # src[index] has the index's axes first, then src's other axes
            return self.arrange(f"{v.src}[{v.index}]", (*v.index_places, *v.places),
                                v.out_rank)
        code = v.src
        if any(p is not None for p in v.picks):
            code += "[" + ", ".join(":" if p is None else str(p) for p in v.picks) + "]"
        return self.arrange(code, v.places, v.out_rank)

    def reshaped(self, v: Reshape) -> str:
        """``src.reshape(fine).transpose(perm).reshape(shape)``, each step only where it
        changes something, then broadcast axes. Row-major (C order) on both backends."""
        code = v.src
        kept = tuple(n for n, p in zip(self.program.shapes[v.src], v.picks, strict=True)
                     if p is None)
        if any(p is not None for p in v.picks):
            code += "[" + ", ".join(":" if p is None else str(p) for p in v.picks) + "]"
        if v.fine != kept:
            code = self._reshape(code, v.fine)
        if v.perm != tuple(range(len(v.perm))):
            code = self.transpose(code, v.perm)
        if v.shape != tuple(v.fine[p] for p in v.perm):
            code = self._reshape(code, v.shape)
        return self.place(code, v.places, v.out_rank)

    def _reshape(self, code: str, shape: tuple[sp.Expr, ...]) -> str:
        # (an empty shape, every extent 1 dropped, is the tuple (): .reshape() is an error)
        return f"{code}.reshape{self.shape(shape)}" if shape else f"{code}.reshape(())"

    def windowed(self, v: Window) -> str:
        """Zero padding where a window reaches past the array, then the windows as a
        strided view (kernel axes last), every ``stride``-th position, then broadcast."""
        code = v.src
        if any(p is not None for p in v.picks):
            code += "[" + ", ".join(":" if p is None else str(p) for p in v.picks) + "]"
        sizes = [n for n, p in zip(self.program.shapes[v.src], v.picks, strict=True)
                 if p is None]
        pads: list[tuple[int, int]] = []
        for a, n in zip(v.axes, sizes, strict=True):
            if isinstance(a, Slide):
                reach = a.stride * (a.count - 1) + a.size - 1
                pads.append((a.pad, max(0, reach - a.pad - (int(n) - 1))))
            else:
                pads.append((0, 0))
        if any(lo or hi for lo, hi in pads):
            code = self.pad(code, pads)
        slid = [(n, a) for n, a in enumerate(v.axes)
                if isinstance(a, Slide) and a.kernel_place >= 0]
        if slid:
            code = self.slide(code, slid)
        cuts = []
        for n, (a, size) in enumerate(zip(v.axes, sizes, strict=True)):
            if not isinstance(a, Slide):
                cuts.append(":")
                continue
            padded = int(size) + sum(pads[n])
            if a.kernel_place < 0:  # a strided read, no window
                available, step = padded, a.stride
            elif self.module == "numpy":  # every position slid, then every stride-th
                available, step = padded - a.size + 1, a.stride
            else:  # unfold steps by the stride itself
                available, step = (padded - a.size) // a.stride + 1, 1
            cuts.append(_every(step, a.count, available))
        if any(c != ":" for c in cuts):
            while cuts[-1] == ":":
                cuts.pop()
            code = f"{code}[{', '.join(cuts)}]"
        return self.arrange(code, v.places, v.out_rank)

    def arrange(self, code: str, places: tuple[int, ...], out_rank: int) -> str:
        """Transpose ``code``'s axes into output order, then insert broadcast axes."""
        if not places:
            return code
        order = tuple(sorted(range(len(places)), key=lambda n: places[n]))
        if order != tuple(range(len(order))):
            code = self.transpose(code, order)
        return self.place(code, places, out_rank)

    @staticmethod
    def place(code: str, places: tuple[int, ...], out_rank: int) -> str:
        """Insert new axes so axes ``places`` of ``code`` line up with ``out_rank`` axes
        under trailing-axis broadcasting."""
        placed = sorted(places)
        parts = [":" if p in placed else "None" for p in range(placed[0], out_rank)]
        if "None" in parts:
            while parts and parts[-1] == ":":
                parts.pop()
            code = f"{code}[{', '.join(parts)}]"
        return code

    def expression(self, op: Map | Reduce) -> sp.Expr:
        """The body with each placeholder replaced by a symbol named as its view's code
        (an integer symbol for a read of integers: index ranges, ids, indices)."""
        # (a plain symbol otherwise: integer=False would make it nonzero, and a where()
        # on it always true)
        return op.body.xreplace({sym: sp.Symbol(self.view(v), integer=True)
                                 if self._integral(v) else sp.Symbol(self.view(v))
                                 for sym, v in op.views})

    def _integral(self, v: View | Iota | Gather | Reshape | Window) -> bool:
        if isinstance(v, Iota):
            return True
        return not isinstance(v, Gather) and v.src in self.program.integers

    def body(self, op: Map | Reduce) -> str:
        expr = self.expression(op)
        self.scalar.integer_reads = frozenset(s.name for s in expr.free_symbols
                                              if s.is_integer)
        self.scalar.booleans = frozenset(self.view(v) for _, v in op.views
                                         if getattr(v, "src", None) in self.masks)
        if expr.has(sp.Piecewise):
            # Fold each term on its own: a product with a mask becomes one where(), but
            # a sum is not pulled into both branches (that would compute the other terms
            # twice, as in softmax(z) + where(c == t, -1, 0) for a cross-entropy).
            expr = sp.Add(*(sp.piecewise_fold(t) for t in sp.Add.make_args(expr)))
        return self.scalar.doprint(expr)

    def shape(self, shape: tuple[sp.Expr, ...]) -> str:
        parts = [self.scalar.doprint(d) for d in shape]
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"

    def operand(self, name: str, transposed: bool) -> str:
        return f"{name}.T" if transposed else name

    # -- statements ---------------------------------------------------------------------
    def left_side(self, stmt: Assign) -> str:
        """What a statement assigns to: its target, or the names its op's results unpack
        into (``_`` for a result nobody reads)."""
        op = stmt.op
        if isinstance(op, LayerNormBackward) and sum(op.outputs) > 1:
            names = iter(stmt.targets)
            return ", ".join(next(names) if on else "_" for on in op.outputs)
        if stmt.also:
            return ", ".join([stmt.target, *(name or "_" for name in stmt.also)])
        return stmt.target

    def code(self, stmt: Assign) -> str:
        op = stmt.op
        if isinstance(op, Map):
            if isinstance(op.body, sp.logic.boolalg.Boolean):
                self.masks.add(stmt.target)
            text = self.body(op)
            return self.in_place(text, stmt.in_place) if stmt.in_place else text
        if isinstance(op, Reduce):
            return self.reduce(op, stmt)
        if isinstance(op, MatMul):
            return self.matmul(op)
        if isinstance(op, Einsum):
            return self.einsum(op)
        if isinstance(op, Linear):
            return self.linear(op)
        if isinstance(op, LogSoftmax):
            return self.log_softmax(op)
        if isinstance(op, Softmax):
            return self.softmax(op)
        if isinstance(op, SoftmaxBackward):
            self.helpers.add("softmax_backward")
            return f"_softmax_backward({op.grad}, {op.out}, {op.axis})"
        if isinstance(op, LogSoftmaxBackward):
            self.helpers.add("log_softmax_backward")
            return f"_log_softmax_backward({op.grad}, {op.out}, {op.axis})"
        if isinstance(op, NllLoss):
            self.helpers.add("nll_loss")
            count = ", count=True" if stmt.also else ""  # (the loss, how many rows count)
            return f"_nll_loss({op.logp}, {op.ids}, {op.ignore}{count})"
        if isinstance(op, NllLossBackward):
            self.helpers.add("nll_loss_backward")
            count = f", {op.count}" if op.count else ""
            return f"_nll_loss_backward({op.seed}, {op.logp}, {op.ids}, {op.ignore}{count})"
        if isinstance(op, Full):
            return self.full(op)
        if isinstance(op, Seed):
            return self.seed(op)
        if isinstance(op, ScatterAdd):
            self.helpers.add("scatter_add")
            return f"_scatter_add({op.values}, {op.index}, {self.shape(op.shape)})"
        if isinstance(op, Conv):
            return self.dense_conv(op) if op.dense else self.conv(op)
        if isinstance(op, DenseKernel):
            self.helpers.add("dense_kernel")
            return f"_dense_kernel({op.kernel}, {op.size!r}, {op.stride!r}, {op.pad!r})"
        if isinstance(op, MaxPool):
            # with ``also``: the maxima and their indices from one call
            return self.max_pool(op, both=bool(stmt.also))
        if isinstance(op, TakeAt):
            self.helpers.add("take_at")
            return f"_take_at({op.src}, {op.index}, {op.d})"
        if isinstance(op, MaxPoolBackward):
            self.helpers.add("max_pool_backward")
            return (f"_max_pool_backward({op.grad}, {op.index}, {self.shape(op.shape)}, "
                    f"{len(op.kernel)})")
        if isinstance(op, WindowAdd):
            self.helpers.update(("window_add", "taps"))
            return f"_window_add({op.values}, {self.shape(op.shape)}, {op.slides!r})"
        if isinstance(op, LayerNorm):
            return self.layer_norm(op)
        if isinstance(op, LayerNormBackward):
            # (d_input, d_weight, d_bias), None where not asked for: unpacked (see
            # left_side), or the one asked for taken
            wanted = [k for k, on in enumerate(op.outputs) if on]
            call = self.layer_norm_backward(op)
            return call if len(wanted) > 1 else f"{call}[{wanted[0]}]"
        if isinstance(op, Stack):
            present = next(p for p in op.parts if p is not None)
            parts = ", ".join(p if p is not None else f"{self.module}.zeros_like({present})"
                              for p in op.parts)
            axis = "axis" if self.module == "numpy" else "dim"
            return f"{self.module}.stack([{parts}], {axis}={op.axis})"
        raise TypeError(f"no printing rule for {type(op).__name__}")  # pragma: no cover

    def reduce(self, op: Reduce, stmt: Assign) -> str:
        everything = len(op.axes) == op.rank
        axes: tuple[int, ...] | int | None = (None if everything else
                                              op.axes[0] if len(op.axes) == 1 else op.axes)
        single = isinstance(op.body, sp.Symbol) and dict(op.views)[op.body].is_identity
        text = self.body(op)
        if op.kind == "sum":
            taps = self.short_axes_sum(op) if single else None
            if taps is not None:
                return taps
            return self.sum(text, axes, method=single)
        if op.kind == "max":
            return self.max(text, axes)
        if op.kind == "count":
            return self.count(text)
        return self.logsumexp(text, tuple(range(op.rank)) if axes is None else axes)

    def in_place(self, text: str, target: str) -> str:
        return text

    def short_axes_sum(self, op: Reduce) -> str | None:
        """A sum of one array over a few short axes (a window's taps) as one add per
        entry of them, or None for the generic sum: both libraries' reductions over
        short axes cost several times more (a 2 x 2 window's tie count: numpy 4-8x,
        torch 197 against 31 us)."""
        (sym, view), = op.views
        k = len(op.axes)
        if k == op.rank or k < 2:
            return None
        shape = self.program.shapes.get(view.src)
        if shape is None or len(shape) != op.rank:
            return None
        extents = [shape[a] for a in op.axes]
        if not all(sp.sympify(n).is_Integer for n in extents) or math.prod(
                int(n) for n in extents) > 16:
            return None
        self.helpers.update(("sum_taps", "taps"))
        return f"_sum_taps({view.src}, {op.axes!r})"


    def layer_norm(self, op: LayerNorm) -> str:
        # numpy: the helpers in the template (one pass over the rows each way)
        self.helpers.add("layer_norm")
        return (f"_layer_norm({op.src}, {op.weight}, {op.bias or None}, {op.eps!r}, "
                f"stats={op.stats})")

    def layer_norm_backward(self, op: LayerNormBackward) -> str:
        self.helpers.add("layer_norm_backward")
        return (f"_layer_norm_backward({op.grad}, {op.src}, {op.mean}, {op.rstd}, "
                f"{op.weight}, {op.outputs!r})")

    def dense_conv(self, op: Conv) -> str:
        """A small convolution (or a gradient of one) as matrix products against its
        kernel written out densely (a :class:`DenseKernel`): each example's array
        flattened to one row."""
        if op.mode == "forward":
            self.helpers.add("dense_conv")
            return f"_dense_conv({op.a}, {op.matrix}, {op.bias or None}, {self.shape(op.shape)})"
        if op.mode == "weight":
            self.helpers.add("dense_conv_weight")
            size = self.shape(self.program.shapes[op.a][2:])
            return (f"_dense_conv_weight({op.a}, {op.b}, {self.shape(op.shape)}, {size}, "
                    f"{op.stride!r}, {op.pad!r})")
        rows = self.flat_rows(op.a, self.scalar.doprint(op.shape[0]))
        return f"({rows} @ {op.matrix}).{self.reshape_method}{self.shape(op.shape)}"

    # backend hooks
    reshape_method: str  # what reshapes a contiguous array without a copy

    def flat_rows(self, name: str, rows: str) -> str:
        """``name`` with every axis after the first flattened into one."""
        raise NotImplementedError

    def conv(self, op: Conv) -> str:
        raise NotImplementedError

    def max_pool(self, op: MaxPool, *, both: bool = False) -> str:
        """The maxima, or (``op.indices``) their indices, or (``both``) the two."""
        raise NotImplementedError

    def pad(self, code: str, pads: list[tuple[int, int]]) -> str:
        raise NotImplementedError

    def slide(self, code: str, slid: list[tuple[int, Slide]]) -> str:
        raise NotImplementedError

    def arange(self, iota: Iota) -> str:
        raise NotImplementedError

    def transpose(self, code: str, perm: tuple[int, ...]) -> str:
        raise NotImplementedError

    def flatten(self, code: str, k: int) -> str:
        """``code`` with its first ``k`` axes merged into one (k = 1: as it is)."""
        raise NotImplementedError

    def sum(self, text: str, axes: tuple[int, ...] | int | None, *, method: bool) -> str:
        raise NotImplementedError

    def max(self, text: str, axes: tuple[int, ...] | int | None) -> str:
        raise NotImplementedError

    def logsumexp(self, text: str, axes: tuple[int, ...] | int) -> str:
        raise NotImplementedError

    def count(self, text: str) -> str:
        raise NotImplementedError

    def matmul(self, op: MatMul) -> str:
        raise NotImplementedError

    def einsum(self, op: Einsum) -> str:
        """A product of arrays in its cheapest spelling: one matrix product per batch
        index (attention's q kᵀ) as ``@`` over the stack (numpy.einsum runs it without
        BLAS, 2-3.5x slower at [8, 4, 64, 8]; torch.einsum plans, permutes and reshapes
        before the same bmm, 7-14 us more per call, a dozen calls a block); one matrix
        product as ``@`` (:func:`matrix_product`); a ``tensordot``; else the library's
        einsum."""
        extents = self.letter_extents(op)
        found = batched_matmul(op.subscripts)
        if found is not None and len(op.operands) == 2:
            swap, ta, tb = found
            a, b = op.operands[::-1] if swap else op.operands
            out = op.subscripts.split("->")[1]
            (summed,) = set(op.subscripts.split("->")[0].replace(",", "")) - set(out)
            rank = len(out)
            return self.product(f"{a}{self.swap_last if ta else ''}",
                                f"{b}{self.swap_last if tb else ''}",
                                rank, rank, extents.get(out[-2], sp.oo),
                                extents.get(out[-1], sp.oo), extents.get(summed, sp.oo))
        product = matrix_product(op.subscripts, op.operands, self.flatten, self.product,
                                 extents)
        if product is not None:
            return product
        call, keyword = self.tensordot_call
        dot = tensordot(op.subscripts, op.operands, call, keyword, self.transpose)
        if dot is not None:
            self.helpers.update(self.tensordot_helpers)
            return dot
        return self.einsum_call(op)

    def einsum_call(self, op: Einsum) -> str:
        raise NotImplementedError

    def letter_extents(self, op: Einsum) -> dict[str, sp.Expr]:
        """Each subscript letter's extent, from the operands' shapes (a temporary a pass
        made may have none: its letters are left out)."""
        extents: dict[str, sp.Expr] = {}
        for name, subs in zip(op.operands, op.subscripts.split("->")[0].split(","),
                              strict=True):
            shape = self.program.shapes.get(name)
            if shape is not None:
                extents.update(zip(subs, shape, strict=True))
        return extents

    def product(self, left: str, right: str, left_rank: int, right_rank: int,
                rows: sp.Expr, width: sp.Expr, depth: sp.Expr) -> str:
        """``left @ right``: a result of ``rows`` x ``width`` (per matrix of a stack)
        whose entries are sums of ``depth`` terms (sympy extents; ``oo`` where unknown)."""
        return f"{left} @ {right}"

    def linear(self, op: Linear) -> str:
        raise NotImplementedError

    def log_softmax(self, op: LogSoftmax) -> str:
        raise NotImplementedError

    def softmax(self, op: Softmax) -> str:
        raise NotImplementedError

    def full(self, op: Full) -> str:
        raise NotImplementedError

    def seed(self, op: Seed) -> str:
        raise NotImplementedError


class NumpyArrayPrinter(ArrayPrinter):
    module = "numpy"
    swap_last = ".swapaxes(-1, -2)"
    tensordot_call = ("numpy.tensordot", "axes")

    def _scalar_printer(self) -> NumpyCodePrinter:
        return NumpyCodePrinter()

    def arange(self, iota: Iota) -> str:
        return f"numpy.arange({self.scalar.doprint(iota.extent)})"

    def pad(self, code: str, pads: list[tuple[int, int]]) -> str:
        return f"numpy.pad({code}, {tuple(pads)!r})"

    def max_pool(self, op: MaxPool, *, both: bool = False) -> str:
        if both or op.indices:
            self.helpers.add("max_pool_indices")
            call = f"_max_pool_indices({op.src}, {op.kernel!r}, {op.stride!r})"
            return call if both else f"{call}[1]"
        self.helpers.add("max_pool")
        return f"_max_pool({op.src}, {op.kernel!r}, {op.stride!r})"

    reshape_method = "reshape"

    def flat_rows(self, name: str, rows: str) -> str:
        return f"{name}.reshape({rows}, -1)"

    def conv(self, op: Conv) -> str:
        # numpy has no convolution: helpers over strided windows (see the template)
        geometry = f"{op.stride!r}, {op.pad!r}"
        if op.mode == "forward":
            self.helpers.add("conv")
            bias = f", {op.bias}" if op.bias else ""
            return f"_conv({op.a}, {op.b}, {geometry}{bias})"
        if op.mode == "weight":
            self.helpers.add("conv_weight")
            return f"_conv_weight({op.a}, {op.b}, {self.shape(op.shape[2:])}, {geometry})"
        self.helpers.add("conv_input")
        return f"_conv_input({op.a}, {op.b}, {self.shape(op.shape)}, {geometry})"

    def slide(self, code: str, slid: list[tuple[int, Slide]]) -> str:
        # a view: entry [..., i, ..., a] is code[..., i + a, ...] (the stride is taken
        # by slicing the positions afterwards)
        sizes = tuple(a.size for _, a in slid)
        axes = tuple(n for n, _ in slid)
        return (f"numpy.lib.stride_tricks.sliding_window_view({code}, {sizes!r}, "
                f"axis={axes!r})")

    def transpose(self, code: str, perm: tuple[int, ...]) -> str:
        return f"{code}.T" if perm == (1, 0) else f"{code}.transpose{perm}"

    def flatten(self, code: str, k: int) -> str:
        return code if k == 1 else f"{code}.reshape(-1, {code}.shape[-1])"

    def sum(self, text: str, axes: tuple[int, ...] | int | None, *, method: bool) -> str:
        if method:
            return f"{text}.sum()" if axes is None else f"{text}.sum(axis={axes})"
        return f"numpy.sum({text})" if axes is None else f"numpy.sum({text}, axis={axes})"

    def max(self, text: str, axes: tuple[int, ...] | int | None) -> str:
        return f"numpy.max({text})" if axes is None else f"numpy.max({text}, axis={axes})"

    def logsumexp(self, text: str, axes: tuple[int, ...] | int) -> str:
        self.helpers.add("logsumexp")
        return f"_logsumexp({text}, {axes})"

    def count(self, text: str) -> str:
        # a Python int: dividing a float32 sum by it stays float32 (a numpy.int64 would
        # promote the quotient to float64)
        return f"int(numpy.count_nonzero({text}))"

    def matmul(self, op: MatMul) -> str:
        if op.a_rank == 2 and op.tb and not op.ta:
            # a @ w.T through a helper that puts the longer side in BLAS's row slot:
            # OpenBLAS runs a short-and-wide NT product (batch 16 against 256 x 784)
            # about twice as slowly as the same product transposed.
            self.helpers.add("matmul_nt")
            return f"_matmul_nt({op.a}, {op.b})"
        return f"{self.operand(op.a, op.ta)} @ {self.operand(op.b, op.tb)}"

    def einsum_call(self, op: Einsum) -> str:
        return f"numpy.einsum({op.subscripts!r}, {', '.join(op.operands)}, optimize=True)"

    def linear(self, op: Linear) -> str:
        p = op.product
        bias = self.view(op.bias)
        if p.tb and not p.ta and p.a_rank == 2:
            self.helpers.add("linear")
            return f"_linear({p.a}, {p.b}, {bias})"
        return f"{self.matmul(p)} + {bias}"

    def log_softmax(self, op: LogSoftmax) -> str:
        self.helpers.add("log_softmax")
        return f"_log_softmax({op.src}, {op.axis})"

    def softmax(self, op: Softmax) -> str:
        self.helpers.add("softmax")
        return f"_softmax({op.src}, {op.axis})"

    def full(self, op: Full) -> str:
        return f"numpy.full({self.shape(op.shape)}, {op.value!r}, dtype={op.like}.dtype)"

    def seed(self, op: Seed) -> str:
        # A numpy scalar of the loss's dtype: numpy.ones_like on a scalar costs ~5 us,
        # an eighth of a tiny network's whole step (~40 us); this costs ~1.7 us.
        return f"numpy.result_type({op.like}).type(1)"

    def in_place(self, text: str, target: str) -> str:
        func = text[: -len(target) - 2]
        if text != f"{func}({target})" or func not in NUMPY_UFUNCS:
            return text
        return f"{func}({target}, out={target})"


class TorchArrayPrinter(ArrayPrinter):
    module = "torch"
    swap_last = ".transpose(-2, -1)"
    # torch.tensordot is no autocast op: _tensordot casts operands that differ in dtype
    tensordot_call = ("_tensordot", "dims")
    tensordot_helpers = ("tensordot",)

    def _scalar_printer(self) -> TorchCodePrinter:
        return TorchCodePrinter()

    def arange(self, iota: Iota) -> str:
        return f"torch.arange({self.scalar.doprint(iota.extent)}, device={iota.like}.device)"

    def layer_norm(self, op: LayerNorm) -> str:
        # torch's own fused kernels, what F.layer_norm and its autograd node run
        size = self.shape(self.program.shapes[op.src][-1:])
        bias = op.bias or "None"
        if not op.stats:
            return (f"torch.nn.functional.layer_norm({op.src}, {size}, {op.weight}, {bias}, "
                    f"{op.eps!r})")
        self.helpers.add("layer_norm")
        return f"_layer_norm({op.src}, {size}, {op.weight}, {bias}, {op.eps!r})"

    def layer_norm_backward(self, op: LayerNormBackward) -> str:
        size = self.shape(self.program.shapes[op.src][-1:])
        self.helpers.add("layer_norm_backward")
        return (f"_layer_norm_backward({op.grad}, {op.src}, {size}, {op.mean}, {op.rstd}, "
                f"{op.weight}, {op.bias or None}, {op.outputs!r})")

    def max_pool(self, op: MaxPool, *, both: bool = False) -> str:
        call = (f"torch.nn.functional.max_pool{len(op.kernel)}d({op.src}, {op.kernel!r}, "
                f"{op.stride!r}")
        if both:
            return f"{call}, return_indices=True)"
        return f"{call}, return_indices=True)[1]" if op.indices else f"{call})"

    reshape_method = "view"

    def flat_rows(self, name: str, rows: str) -> str:
        return f"{name}.flatten(1)"

    def conv(self, op: Conv) -> str:
        d = len(op.stride)
        geometry = f"stride={op.stride!r}, padding={op.pad!r}"
        if op.mode == "forward":
            bias = f", {op.bias}" if op.bias else ""
            return f"torch.nn.functional.conv{d}d({op.a}, {op.b}{bias}, {geometry})"
        # aten's convolution_backward itself, as torch.nn.grad.conv*d_weight / _input
        # call it (their Python argument handling costs ~20 us a call here).
        if op.mode == "weight":
            self.helpers.add("conv_weight_grad")
            return (f"_conv_weight_grad({op.a}, {self.shape(op.shape)}, {op.b}, "
                    f"{geometry})")
        self.helpers.add("conv_input_grad")
        return f"_conv_input_grad({self.shape(op.shape)}, {op.b}, {op.a}, {geometry})"

    def pad(self, code: str, pads: list[tuple[int, int]]) -> str:
        first = next(n for n, p in enumerate(pads) if p != (0, 0))
        flat = tuple(v for lo_hi in reversed(pads[first:]) for v in lo_hi)
        return f"torch.nn.functional.pad({code}, {flat!r})"

    def slide(self, code: str, slid: list[tuple[int, Slide]]) -> str:
        # unfold(axis, size, step): a view whose window axis comes last
        for n, a in slid:
            code = f"{code}.unfold({n}, {a.size}, {a.stride})"
        return code

    def transpose(self, code: str, perm: tuple[int, ...]) -> str:
        return f"{code}.T" if perm == (1, 0) else f"{code}.permute{perm}"

    def flatten(self, code: str, k: int) -> str:
        return code if k == 1 else f"{code}.flatten(0, {k - 1})"

    def sum(self, text: str, axes: tuple[int, ...] | int | None, *, method: bool) -> str:
        if method:
            return f"{text}.sum()" if axes is None else f"{text}.sum(dim={axes})"
        return f"torch.sum({text})" if axes is None else f"torch.sum({text}, dim={axes})"

    def max(self, text: str, axes: tuple[int, ...] | int | None) -> str:
        return f"torch.amax({text})" if axes is None else f"torch.amax({text}, dim={axes})"

    def logsumexp(self, text: str, axes: tuple[int, ...] | int) -> str:
        return f"torch.logsumexp({text}, dim={axes})"

    def count(self, text: str) -> str:
        # an int64 tensor (no host sync); a float tensor divided by it keeps its dtype
        return f"torch.count_nonzero({text})"

    def matmul(self, op: MatMul) -> str:
        left, right = self.operand(op.a, op.ta), self.operand(op.b, op.tb)
        a_shape, b_shape = self.program.shapes.get(op.a), self.program.shapes.get(op.b)
        if a_shape is None or b_shape is None:  # a pass's temporary: as it is
            return f"{left} @ {right}"
        rows = a_shape[-1 if op.ta else -2] if op.a_rank == 2 else sp.oo  # a stack's rows
        return self.product(left, right, op.a_rank, len(b_shape), rows,
                            b_shape[-2 if op.tb else -1], a_shape[-2 if op.ta else -1])

    def product(self, left: str, right: str, left_rank: int, right_rank: int,
                rows: sp.Expr, width: sp.Expr, depth: sp.Expr) -> str:
        # A narrow product (a result at most 8 wide, with 32 or more rows of sums of 32
        # or more terms) goes through _narrow_matmul, which turns it round where torch's
        # CPU BLAS is MKL (see the helper). A batch-sized extent (a symbol) counts as
        # large.
        narrow = (width.is_Integer and int(width) <= _NARROW
                  and not (depth.is_Integer and int(depth) < _LARGE)
                  and not (rows.is_Integer and int(rows) < _LARGE)
                  and (left_rank == right_rank or right_rank == 2))
        if not narrow:
            return f"{left} @ {right}"
        self.helpers.add("narrow_matmul")
        return f"_narrow_matmul({left}, {right})"

    def einsum_call(self, op: Einsum) -> str:
        self.helpers.add("einsum")
        return f"_einsum({op.subscripts!r}, {', '.join(op.operands)})"

    def linear(self, op: Linear) -> str:
        p = op.product
        if p.a_rank > 2:  # rows of a stack times W.T, plus a vector along the last axis
            return f"torch.nn.functional.linear({p.a}, {p.b}, {op.bias.src})"
        return (f"torch.addmm({self.view(op.bias)}, {self.operand(p.a, p.ta)}, "
                f"{self.operand(p.b, p.tb)})")

    def log_softmax(self, op: LogSoftmax) -> str:
        return f"torch.log_softmax({op.src}, dim={op.axis})"

    def softmax(self, op: Softmax) -> str:
        return f"torch.softmax({op.src}, dim={op.axis})"

    def full(self, op: Full) -> str:
        return f"{op.like}.new_full({self.shape(op.shape)}, {op.value!r})"

    def seed(self, op: Seed) -> str:
        return f"torch.ones_like({op.like})"


def _every(stride: int, count: int, available: int) -> str:
    """The slice that keeps positions 0, stride, ..., stride * (count - 1) of
    ``available`` ones (``:`` when that is all of them)."""
    stop = stride * (count - 1) + 1
    if stride == 1:
        return ":" if count >= available else f":{count}"
    return f"::{stride}" if stop >= available - stride + 1 else f":{stop}:{stride}"


# A torch product at most _NARROW wide, with at least _LARGE rows of sums of at least
# _LARGE terms, goes through the module's _narrow_matmul (TorchArrayPrinter.product).
_NARROW = 8
_LARGE = 32


def matrix_product(subscripts: str, operands: tuple[str, ...], flatten,
                   product=None, extents: dict[str, sp.Expr] | None = None) -> str | None:
    """Two-array products that are one matrix product, printed as ``@`` (both libraries'
    tensordot is Python that permutes and reshapes around the same product: 3-4 us more
    per call in torch at the GPT examples' sizes, dozens of calls a step):

    * ``'ntc,rc->ntr'``: an array against a matrix over its last axis, ``x @ W.T``
      (``'ntc,cr->ntr'``: ``x @ W``);
    * ``'nto,nti->oi'``: two arrays summed over the same leading axes, each with one
      axis left (a weight's gradient), ``g.flatten(0, 1).T @ x.flatten(0, 1)``.

    ``flatten(code, k)`` merges the first k axes; ``product(left, right, left_rank,
    right_rank, rows, width, depth)`` prints the product (default ``left @ right``), with
    the extents of ``extents`` (letter -> extent). None for anything else."""
    inputs, out = subscripts.split("->")
    if inputs.count(",") != 1 or len(operands) != 2:
        return None
    a, b = inputs.split(",")
    if len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    if product is None:
        def product(left: str, right: str, *_: object) -> str:
            return f"{left} @ {right}"
    size = (extents or {}).get
    for (p, q), (x, y) in (((a, b), operands), ((b, a), operands[::-1])):
        if len(q) == 2 and len(p) >= 2 and p[-1] in q and out == p[:-1] + q.replace(p[-1], ""):
            right = f"{y}.T" if q[1] == p[-1] else y
            rows = sp.Mul(*(size(c, sp.oo) for c in p[:-1]))
            return product(x, right, len(p), 2, rows, size(out[-1], sp.oo),
                           size(p[-1], sp.oo))
    k = len(a) - 1
    if k >= 1 and len(b) == len(a) and a[:k] == b[:k] and out == a[-1] + b[-1] != a[-1] * 2:
        depth = sp.Mul(*(size(c, sp.oo) for c in a[:k]))
        return product(f"{flatten(operands[0], k)}.T", flatten(operands[1], k), 2, 2,
                       size(a[-1], sp.oo), size(b[-1], sp.oo), depth)
    return None


def tensordot(subscripts: str, operands: tuple[str, ...], call: str, keyword: str,
              transpose) -> str | None:
    """A product of two arrays without batch axes (each letter in one operand and the
    output, or in both operands and summed) as a tensordot, permuted into the output's
    order (a view); a matrix against a vector over its last axis as ``m @ v``. Both skip
    einsum's planning, 5-20 us per call at the GPT examples' sizes (numpy's
    ``optimize=True`` path search most of it). None for anything else."""
    inputs, out = subscripts.split("->")
    if inputs.count(",") != 1 or len(operands) != 2:
        return None
    a, b = inputs.split(",")
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None
    summed = [c for c in a if c in b]
    if any(c in out for c in summed) or set(out) != (set(a) | set(b)) - set(summed):
        return None
    if len(b) == 1 and summed == [a[-1]] and out == a[:-1]:
        return f"{operands[0]} @ {operands[1]}"
    if len(a) == 1 and summed == [b[-1]] and out == b[:-1]:
        return f"{operands[1]} @ {operands[0]}"
    if not summed:
        return None
    dims_a = [a.index(c) for c in summed]
    dims_b = [b.index(c) for c in summed]
    result = [c for c in a if c not in summed] + [c for c in b if c not in summed]
    code = f"{call}({operands[0]}, {operands[1]}, {keyword}=({dims_a}, {dims_b}))"
    perm = tuple(result.index(c) for c in out)
    return transpose(code, perm) if perm != tuple(range(len(perm))) else code


def batched_matmul(subscripts: str) -> tuple[bool, bool, bool] | None:
    """``'abmc,abcn->abmn'``-like subscripts: one matrix product per batch index (the
    same leading axes on both operands and the result, one summed letter). Returns
    (swap the operands, transpose the first, transpose the second), or None."""
    inputs, out = subscripts.split("->")
    if inputs.count(",") != 1:
        return None
    x, y = inputs.split(",")
    if not len(x) == len(y) == len(out) >= 3 or not x[:-2] == y[:-2] == out[:-2]:
        return None
    m, n = out[-2:]
    for swap, (p, q) in ((False, (x, y)), (True, (y, x))):
        summed = set(p[-2:]) - {m}
        if m in p[-2:] and n in q[-2:] and len(summed) == 1 and set(q[-2:]) == {*summed, n}:
            (c,) = summed
            return swap, p[-2:] == c + m, q[-2:] == n + c
    return None


def array_printer(backend: str, program: Program) -> ArrayPrinter:
    return NumpyArrayPrinter(program) if backend == "numpy" else TorchArrayPrinter(program)
