"""The array IR: typed, backend-free statements between derivation and printing.

A :class:`Program` is a straight-line list of :class:`Assign` statements, ``target = op``.
Each op is a frozen dataclass that names the arrays it reads; nothing here holds printed
code. Elementwise work lives in sympy bodies (:class:`Map`, :class:`Reduce`) whose free
array symbols are *placeholders*, each bound to a :class:`View` that says how the
array's axes line up with the output's axes (transpose, new broadcast axes, fixed
indices), an :class:`Iota` (the position along an axis, for masks) or a :class:`Gather`
(rows picked by integer ids). Printers turn a view into ``W.T`` or ``lse[:, None]``;
passes never need to.

Ops:

* :class:`Map` — ``out = body`` elementwise, with broadcasting through views;
* :class:`Reduce` — ``out = reduce(body)`` over axes (``sum``, ``max``, ``logsumexp``;
  ``count``: how many entries of a boolean body are true, over every axis, as a plain
  integer, so dividing by it keeps the dtype);
* :class:`MatMul` — ``a @ b`` of two matrices (or a stack of rows against a matrix),
  each operand optionally transposed;
* :class:`Einsum` — any other contraction of two arrays, in subscript form;
* :class:`Linear` — ``a @ b + bias`` as one call (a pass forms it);
* :class:`LogSoftmax` — ``a - logsumexp(a)`` along the last axis (a pass forms it);
* :class:`Softmax` — ``exp(a - logsumexp(a))`` along the last axis (the same pass);
* :class:`SoftmaxBackward` — ``y * (g - sum(y * g))`` along the last axis, the chain
  rule through a softmax as one call (a pass forms it);
* :class:`LogSoftmaxBackward` — ``g - exp(t) * sum(g)`` along the last axis, the chain
  rule through a log-softmax as one call (a pass forms it);
* :class:`NllLoss` / :class:`NllLossBackward` — the mean of ``-logp`` at each counted
  row's class id, and its adjoint (a pass forms them);
* :class:`Full` — an array of one value, shaped by dims (axes no operand covers);
* :class:`ScatterAdd` — rows added at integer ids (the adjoint of a :class:`Gather` view);
* :class:`WindowAdd` — windows added back at their positions (the adjoint of a
  :class:`Window` view: a convolution's input gradient, a pooling's);
* :class:`Conv` — a convolution or one of its two gradients (a pass forms it);
* :class:`DenseKernel` — a small convolution's kernel as a dense matrix (the same pass);
* :class:`MaxPool` — the maximum of each window (a max over a window read);
* :class:`Stack` — arrays stacked along a new axis (the adjoint of fixed-index reads);
* :class:`LayerNorm` / :class:`LayerNormBackward` — a layer norm over the last axis and
  its adjoints, one call each (a pass forms them); the first ops with several results,
  named by the statement's ``target`` and ``also``;
* :class:`Seed` — dL/dL = 1, in the loss's dtype.

A :class:`Reshape` view reads an array through an affine index map (reshape, permute,
reshape): what a reshape layer and its adjoint lower to. A :class:`Window` view reads it
through strided, zero-padded sliding windows (``x[n, c, 2*i + a - 1]``): what
convolutions and poolings read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import sympy as sp

Phase = Literal["forward", "backward"]
ReduceKind = Literal["sum", "max", "logsumexp", "count"]


@dataclass(frozen=True)
class View:
    """How array ``src`` is read inside an elementwise body of rank ``out_rank``.

    ``picks`` has one entry per axis of ``src``: an integer fixes that axis (a size-1
    broadcast axis read at 0), ``None`` keeps it. ``places`` gives, for each kept axis in
    order, the output axis it lines up with. Output axes no kept axis lands on broadcast.
    """

    src: str
    picks: tuple[int | None, ...]
    places: tuple[int, ...]
    out_rank: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src})

    @property
    def is_identity(self) -> bool:
        """The array read as it is: same axes as the output, or a 0-d array (which
        broadcasts the same way in a body of any rank)."""
        if not self.picks and not self.places:
            return True
        return (all(p is None for p in self.picks)
                and self.places == tuple(range(self.out_rank)))

    def placeholder(self) -> sp.Symbol:
        """The symbol that stands for this view in a body: one symbol per distinct view,
        so equal reads are equal symbols (CSE and fusion see them as the same thing)."""
        if self.is_identity:
            return sp.Symbol(self.src)
        picks = ",".join("" if p is None else str(p) for p in self.picks)
        places = ",".join(str(p) for p in self.places)
        return sp.Symbol(f"{self.src}<{picks}|{places}|{self.out_rank}>")


@dataclass(frozen=True)
class Iota:
    """The index along output axis ``axis`` (0, 1, ..., extent - 1) of a body of rank
    ``out_rank``: what an index predicate (a causal mask ``s <= t``) compares. ``like``
    names an array whose device the index array is made on (the model's first input, so
    forward and backward share one mask)."""

    axis: int
    extent: sp.Expr
    out_rank: int
    like: str

    @property
    def src(self) -> str:
        return self.like

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.like})

    @property
    def is_identity(self) -> bool:
        return False

    def placeholder(self) -> sp.Symbol:
        return sp.Symbol(f"<iota{self.axis}:{self.extent}|{self.out_rank}>")


@dataclass(frozen=True)
class Gather:
    """Rows of ``src`` picked by the integer array ``index``: ``src[index[i...], j...]``
    (an embedding lookup). ``index_places`` are the output axes of the index array's
    axes, ``places`` those of ``src``'s other axes."""

    src: str
    index: str
    index_places: tuple[int, ...]
    places: tuple[int, ...]
    out_rank: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src, self.index})

    @property
    def is_identity(self) -> bool:
        return False

    def placeholder(self) -> sp.Symbol:
        places = ",".join(map(str, self.index_places)) + ";" + ",".join(map(str, self.places))
        return sp.Symbol(f"{self.src}[{self.index}]<{places}|{self.out_rank}>")


@dataclass(frozen=True)
class Reshape:
    """``src`` read through an affine index map (a row-major reshape, see
    :mod:`symbackprop.derive.radix`): fixed axes picked (``picks`` as in :class:`View`),
    the rest reshaped to ``fine`` (every output axis cut into its digits), permuted by
    ``perm`` into output order, reshaped to ``shape`` (the digits of each output axis
    merged), whose axes land on the output axes ``places`` (increasing; the others
    broadcast). ``x.reshape(N, T, 4, 8).transpose(0, 2, 1, 3)`` is one."""

    src: str
    picks: tuple[int | None, ...]
    fine: tuple[sp.Expr, ...]
    perm: tuple[int, ...]
    shape: tuple[sp.Expr, ...]
    places: tuple[int, ...]
    out_rank: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src})

    @property
    def is_identity(self) -> bool:
        return False

    def placeholder(self) -> sp.Symbol:
        picks = ",".join("" if p is None else str(p) for p in self.picks)
        dims = ";".join(",".join(map(str, d)) for d in (self.fine, self.perm, self.shape,
                                                        self.places))
        return sp.Symbol(f"{self.src}<{picks}|{dims}|{self.out_rank}>")


@dataclass(frozen=True)
class Slide:
    """One axis of a :class:`Window`: the source axis read at ``stride * i + k - pad``,
    ``i`` the output axis ``place`` (the window's position, ``count`` of them) and ``k``
    the output axis ``kernel_place`` (the tap, ``size`` of them). ``kernel_place`` -1:
    no tap, a strided read ``stride * i - pad`` (``size`` 1)."""

    place: int
    kernel_place: int
    stride: int
    pad: int
    count: int
    size: int


@dataclass(frozen=True)
class Window:
    """``src`` read through sliding windows (a convolution's or a pooling's input): each
    source axis is fixed (``picks``), lined up with one output axis (``axes`` entry an
    ``int``) or slid (a :class:`Slide`). A read outside the source is zero: the array
    is padded with zeros first. Printed as a strided view (numpy's
    ``sliding_window_view``, torch's ``unfold``), never a copy per window; the kernel
    axes of the view come last, in source-axis order."""

    src: str
    picks: tuple[int | None, ...]
    axes: tuple[int | Slide, ...]
    out_rank: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src})

    @property
    def is_identity(self) -> bool:
        return False

    @property
    def places(self) -> tuple[int, ...]:
        """Output axes of the view's axes: kept source axes in order, then kernel axes (a
        strided read without a tap, ``kernel_place`` -1, has none)."""
        return (*(a if isinstance(a, int) else a.place for a in self.axes),
                *(a.kernel_place for a in self.axes
                  if isinstance(a, Slide) and a.kernel_place >= 0))

    def placeholder(self) -> sp.Symbol:
        picks = ",".join("" if p is None else str(p) for p in self.picks)
        axes = ",".join(str(a) if isinstance(a, int) else
                        f"{a.place}:{a.kernel_place}:{a.stride}:{a.pad}:{a.count}:{a.size}"
                        for a in self.axes)
        return sp.Symbol(f"{self.src}<{picks}|{axes}|{self.out_rank}>")


AnyView = View | Iota | Gather | Reshape | Window
Views = tuple[tuple[sp.Symbol, AnyView], ...]


def ordered(views: Mapping[sp.Symbol, AnyView]) -> Views:
    """A body's views as a tuple sorted by placeholder name (deterministic output)."""
    return tuple(sorted(views.items(), key=lambda kv: kv[0].name))


def _view_reads(views: Views, body: sp.Expr) -> frozenset[str]:
    used = body.free_symbols
    return frozenset().union(*(v.reads for s, v in views if s in used))


@dataclass(frozen=True)
class Map:
    """``out[...] = body``: one fused elementwise expression over viewed arrays."""

    body: sp.Expr
    views: Views

    @property
    def reads(self) -> frozenset[str]:
        return _view_reads(self.views, self.body)

    def view_of(self, sym: sp.Symbol) -> AnyView | None:
        return dict(self.views).get(sym)


@dataclass(frozen=True)
class Reduce:
    """``out = kind over axes of body`` (the body is laid out on ``rank`` axes)."""

    kind: ReduceKind
    body: sp.Expr
    views: Views
    axes: tuple[int, ...]
    rank: int

    @property
    def reads(self) -> frozenset[str]:
        return _view_reads(self.views, self.body)


@dataclass(frozen=True)
class MatMul:
    """``op(a) @ op(b)`` where op transposes the last two axes when asked.

    ``a`` may have more than two axes (rows of a stack); ``b`` is a matrix."""

    a: str
    b: str
    ta: bool = False
    tb: bool = False
    a_rank: int = 2

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.a, self.b})


@dataclass(frozen=True)
class Einsum:
    """A contraction in subscript form over two or more arrays (``ij,jk->ik``)."""

    subscripts: str
    operands: tuple[str, ...]

    @property
    def reads(self) -> frozenset[str]:
        return frozenset(self.operands)


@dataclass(frozen=True)
class Linear:
    """``product + bias`` in one call, ``bias`` read through a view of the output."""

    product: MatMul
    bias: View

    @property
    def reads(self) -> frozenset[str]:
        return self.product.reads | {self.bias.src}


@dataclass(frozen=True)
class LogSoftmax:
    """``src - logsumexp(src)`` along ``axis`` (the last one)."""

    src: str
    axis: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src})


@dataclass(frozen=True)
class Softmax:
    """``exp(src - logsumexp(src))`` along ``axis`` (the last one), one call (a pass forms
    it)."""

    src: str
    axis: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src})


@dataclass(frozen=True)
class SoftmaxBackward:
    """``out * (grad - sum(out * grad, axis))`` (``axis`` the last one): what the chain
    rule gives for a softmax's input from its output ``out`` and output adjoint ``grad``,
    one call (a pass forms it)."""

    grad: str
    out: str
    axis: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.grad, self.out})


@dataclass(frozen=True)
class LogSoftmaxBackward:
    """``grad - exp(out) * sum(grad, axis)`` (``axis`` the last one): what the chain rule
    gives for a log-softmax's input from its output ``out`` and output adjoint ``grad``,
    one call (a pass forms it)."""

    grad: str
    out: str
    axis: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.grad, self.out})


@dataclass(frozen=True)
class NllLoss:
    """The mean over counted rows of ``-logp[row, ids[row]]``, a row counted where its id
    is not ``ignore`` (the class axis the last one): cross-entropy from a log-softmax, one
    call (a pass forms it). With a further result (the statement's ``also``): how many
    rows are counted, in ``logp``'s dtype, for :class:`NllLossBackward`."""

    logp: str
    ids: str
    ignore: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.logp, self.ids})


@dataclass(frozen=True)
class NllLossBackward:
    """:class:`NllLoss`'s adjoint for ``logp``: ``-seed / count`` at each counted row's id,
    0 elsewhere (a pass forms it). ``count``: the array that holds how many rows are
    counted, where the forward's :class:`NllLoss` statement gave it as a further result
    (its ``also``); else the rows are counted again."""

    seed: str
    logp: str
    ids: str
    ignore: int
    count: str = ""

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.seed, self.logp, self.ids} | ({self.count} if self.count
                                                             else set()))


@dataclass(frozen=True)
class Full:
    """An array of ``value`` with shape ``shape`` (sympy dims), dtype and device of ``like``."""

    shape: tuple[sp.Expr, ...]
    value: float
    like: str

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.like})


@dataclass(frozen=True)
class Seed:
    """dL/dL = 1 as a 0-d array of the loss's dtype (so every gradient has that dtype)."""

    like: str

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.like})


@dataclass(frozen=True)
class ScatterAdd:
    """The adjoint of a gather: an array of zeros shaped ``shape`` to which each
    ``values[i..., j...]`` is added at row ``index[i...]`` (repeated ids sum)."""

    values: str
    index: str
    shape: tuple[sp.Expr, ...]

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.values, self.index})


@dataclass(frozen=True)
class WindowAdd:
    """The adjoint of a :class:`Window` read: an array of zeros shaped ``shape`` to which
    ``values[..., i, ..., k...]`` is added at ``stride * i + k - pad`` along each slid
    axis (overlapping windows sum; positions in the padding are dropped). ``values``
    has ``shape``'s axes, each slid one replaced by two: its positions (``count``) and
    its kernel taps (``size``), so windows that tile an axis exactly are that axis
    reshaped. ``slides`` holds (axis, stride, pad, count, size) per slid axis.
    """

    values: str
    shape: tuple[sp.Expr, ...]
    slides: tuple[tuple[int, int, int, int, int], ...]

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.values})


@dataclass(frozen=True)
class Conv:
    """A convolution over the last ``len(stride)`` axes (a cross-correlation, as
    ``torch.nn.functional.conv2d``) or one of its gradients; the conv pass forms it from
    a window read and the contraction around it:

    * ``forward``: ``out[n, o, i] = sum_{c,t} B[o, c, t] A[n, c, s*i + t - p] (+ bias[o])``
      (A = the input, B = the kernel);
    * ``weight``: ``out[o, c, t] = sum_{n,i} B[n, o, i] A[n, c, s*i + t - p]`` (A = the
      input, B = the output's adjoint);
    * ``input``: ``out[n, c, h] = sum_{o,i,t: s*i + t - p = h} A[n, o, i] B[o, c, t]``
      (A = the output's adjoint, B = the kernel).

    ``a`` and ``b`` name A and B; t is the kernel tap. ``shape``: the result's shape (the
    gradients need it: several input sizes give one output size)."""

    mode: Literal["forward", "weight", "input"]
    a: str
    b: str
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    shape: tuple[sp.Expr, ...]
    bias: str = ""
    #: computed as matrix products against the kernel written out densely (see
    #: :class:`DenseKernel`); ``matrix`` names that array (forward and input modes)
    dense: bool = False
    matrix: str = ""

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.a, self.b} | ({self.bias} if self.bias else set())
                         | ({self.matrix} if self.matrix else set()))


@dataclass(frozen=True)
class DenseKernel:
    """A convolution's kernel written out as the matrix of the linear map it applies to
    one example: ``out[o*P + i, c*S + h] = kernel[o, c, t]`` where ``h = s*i + t - p``
    (per spatial axis) lies inside the input, else 0. ``i`` runs over the output's ``P``
    positions, ``h`` over the input's ``S`` (``size``), both row-major, as the
    examples' arrays flatten. The conv pass forms it for a convolution small enough
    that one matrix product beats a convolution call; the forward convolution is then
    ``x.flatten(1) @ out.T`` and the input gradient ``g.flatten(1) @ out``."""

    kernel: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    shape: tuple[sp.Expr, ...]

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.kernel})


@dataclass(frozen=True)
class MaxPool:
    """The maximum of each window of ``kernel`` over the last ``len(kernel)`` axes of
    ``src``, every ``stride``-th position, no padding (torch's floor mode): a max
    reduction over a window read, recognised where max reductions are lowered. With
    ``indices``, where each window's first maximum lies instead (row-major over the
    window), as the flat position ``h * W + w`` in those axes (an integer array, what
    torch's ``max_pool2d(..., return_indices=True)`` returns)."""

    src: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    indices: bool = False

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src})


@dataclass(frozen=True)
class TakeAt:
    """``src`` read at the flat positions ``index`` of its last ``d`` axes:
    ``out[..., i, j] = src[..., index[..., i, j] // W, index[..., i, j] % W]`` (for d = 2);
    ``out`` has ``index``'s shape. A max pooling's values, read at its arg-max indices
    (one pooling instead of two, see the max-pool pass)."""

    src: str
    index: str
    d: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src, self.index})


@dataclass(frozen=True)
class MaxPoolBackward:
    """The adjoint of a max pooling that routes each window's gradient to its first
    maximum: an array of zeros shaped ``shape`` to which ``grad[..., i, j]`` is added at
    the flat position ``index[..., i, j]`` of the last ``len(kernel)`` axes (windows that
    overlap add). Formed by the max-pool pass from the window-add of the gradient times
    the one-hot ties."""

    grad: str
    index: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    shape: tuple[sp.Expr, ...]

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.grad, self.index})


@dataclass(frozen=True)
class Stack:
    """Arrays of one shape stacked along a new axis ``axis``: entry j of that axis is
    ``parts[j]``, or zeros where ``parts[j]`` is None. The adjoint of an array read at
    fixed indices of one axis (attention's stacked projection, read per part)."""

    parts: tuple[str | None, ...]
    axis: int

    @property
    def reads(self) -> frozenset[str]:
        return frozenset(p for p in self.parts if p is not None)


@dataclass(frozen=True)
class LayerNorm:
    """Layer norm over the last axis of ``src`` (as ``torch.nn.functional.layer_norm``):
    ``(src - mean) * rstd * weight + bias`` with ``rstd = 1/sqrt(var + eps)``, the biased
    variance (no ``bias``: none added). With ``stats``, the statement's ``also`` names
    the row means and reciprocal standard deviations (``src``'s shape, the last axis
    kept as 1), what :class:`LayerNormBackward` reads; without, the output alone."""

    src: str
    weight: str
    bias: str
    eps: float
    stats: bool = True

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.src, self.weight} | ({self.bias} if self.bias else set()))


@dataclass(frozen=True)
class LayerNormBackward:
    """The adjoints of a :class:`LayerNorm` from its output's adjoint ``grad``, each as
    ``outputs`` asks: the input's ``rstd * (g' - mean(g') - xhat * mean(g' * xhat))``
    along the last axis, with ``g' = grad * weight`` and ``xhat = (src - mean) * rstd``;
    the weight's ``sum(grad * xhat)`` and the bias's ``sum(grad)`` over every other
    axis. The statement's ``target`` and ``also`` name those asked for, in that order."""

    grad: str
    src: str
    mean: str
    rstd: str
    weight: str
    bias: str
    outputs: tuple[bool, bool, bool] = (True, False, False)

    @property
    def reads(self) -> frozenset[str]:
        return frozenset({self.grad, self.src, self.mean, self.rstd, self.weight}
                         | ({self.bias} if self.bias else set()))


Op = (Map | Reduce | MatMul | Einsum | Linear | LogSoftmax | Softmax | SoftmaxBackward
      | LogSoftmaxBackward | NllLoss | NllLossBackward | Full | Seed | ScatterAdd | WindowAdd
      | Conv | DenseKernel | MaxPool | MaxPoolBackward | TakeAt | Stack | LayerNorm
      | LayerNormBackward)


@dataclass(frozen=True)
class Assign:
    """``target = op``, with the comment that names the layer and formula it implements.

    ``frees``: arrays that die right after this statement (set by the memory pass);
    ``in_place``: the op may write into this dying operand's buffer (numpy ``out=``);
    ``also``: the op's further results, after ``target``, for an op with several (an
    empty name: a result nobody reads, not computed where the op can skip it).
    """

    target: str
    op: Op
    comment: str = ""
    phase: Phase = "forward"
    frees: tuple[str, ...] = ()
    in_place: str = ""
    also: tuple[str, ...] = ()

    @property
    def reads(self) -> frozenset[str]:
        return self.op.reads

    @property
    def targets(self) -> tuple[str, ...]:
        """Every array this statement defines: ``target``, then ``also``'s names."""
        return (self.target, *(name for name in self.also if name))


@dataclass
class Program:
    """A model's statements (forward, then backward) and the facts printers need."""

    stmts: list[Assign]
    shapes: dict[str, tuple[sp.Expr, ...]]
    dims: dict[str, tuple[str, int]] = field(default_factory=dict)
    leaves: frozenset[str] = frozenset()
    # ties array -> the arg-max indices it is the one-hot of (a max pooling's first
    # maximum, see layers/reductions.max_over): what the max-pool pass reads
    one_hots: dict[str, str] = field(default_factory=dict)
    # arrays of integers (ids, positions, arg-max indices), and the float array whose
    # dtype a body of integers and numbers alone takes (a one-hot of indices)
    integers: frozenset[str] = frozenset()
    like: str = ""
    # layer norm output -> (input, mean, variance, weight, bias or "", eps), as the
    # layer built them (layers/normalization.py): what the layer-norm pass reads
    layer_norms: dict[str, tuple[str, str, str, str, str, float]] = field(
        default_factory=dict)


def readers(stmts: Iterable[Assign]) -> dict[str, int]:
    """How many statements read each array."""
    count: dict[str, int] = {}
    for stmt in stmts:
        for name in stmt.reads:
            count[name] = count.get(name, 0) + 1
    return count


def row_view(view: object, rank: int) -> bool:
    """``view`` reads an array of ``rank - 1`` axes as it is, broadcast along the last of
    ``rank`` axes (a per-row value next to the rows)."""
    return (isinstance(view, View) and view.out_rank == rank
            and view.places == tuple(range(rank - 1)) and all(p is None for p in view.picks))


def by_source(expr: sp.Expr, views: Views | Mapping[sp.Symbol, AnyView]) -> sp.Expr:
    """``expr`` with each symbol that reads an array as it is (an identity view) replaced
    by a symbol named after the array, so that bodies of different statements, each
    binding its own symbols, compare in one space. Any other read becomes a symbol of
    its own that equals nothing outside this expression."""
    views = dict(views)
    return expr.xreplace({s: sp.Symbol(v.src) if isinstance(v, View) and v.is_identity
                          else sp.Dummy(s.name) for s, v in views.items()})


def free_name(name: str, shape: tuple[sp.Expr, ...], taken: set[str],
              program: Program) -> bool:
    """Whether a pass may name a new array ``name`` of ``shape`` in a function whose
    statements define or read ``taken``: not taken there, not an argument of the module,
    and not a program array of another shape or of integers. (The program is shared by
    the module's functions: an array a pass made with this name and shape for an earlier
    function may be made again.)"""
    known = program.shapes.get(name)
    return (name not in taken and (known is None or tuple(known) == tuple(shape))
            and name not in program.integers and name not in program.leaves)


def join_comments(first: str, second: str) -> str:
    if not first:
        return second
    if not second or first == second:
        return first
    return f"{first}\n{second}"
