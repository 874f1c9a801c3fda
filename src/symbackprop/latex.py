"""Derivations people can read: the chain rule for every parameter, printed from sympy.

This pass turns a :class:`~symbackprop.backprop.Derivation` — the very sympy objects the
generated code is lowered from — into a document: the forward equations, the chain of
partial derivatives from each trainable parameter to the loss (every factor as sympy
derived it), the cross-layer simplifications that fusion made possible, the delta
recursion between layers, and the final gradient in matrix and index form.

Nothing here knows a layer type. Index-notation bodies become matrix notation by
structure alone: a ``Sum`` over one index of two tensor groups is a matrix product (with
transposes where the indices ask for them), an elementwise body is a function applied
elementwise with ``\\odot`` between tensor factors, and whatever has no matrix form is
shown in index notation only. Names print from one table (``fc1_weight`` as
``W^{(\\mathrm{fc1})}``), index symbols get textbook letters (``n`` runs over the batch).

The document renders as Markdown (``$$`` blocks), a standalone LaTeX document, an HTML
page with presentation MathML (offline: no script, no font download), or one LaTeX math
fragment per parameter (``DERIVATIONS`` in the generated modules). Output depends only
on the spec: the same spec gives byte-identical text.
"""

from __future__ import annotations

import functools
import html
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import sympy as sp
from sympy.core.parameters import distribute, global_parameters
from sympy.printing.latex import LatexPrinter

from . import naming
from .backprop import Adjoint, Derivation
from .derive.calculus import (
    eliminate_deltas,
    local_derivative,
    simplify_local,
    substitute_known,
    vjp,
)
from .derive.fusion import inline
from .errors import UsageError
from .graph import Node, ref
from .layers import ACTIVATIONS, LOSSES
from .spec import ModelSpec

FORMATS = ("md", "tex", "html")
# --expand writes one formula per scalar parameter: refuse past these sizes.
EXPAND_MAX_PARAMS = 64       # trainable scalars in the whole network
EXPAND_MAX_ELEMENTS = 256    # forward scalars of one example (batch axes stay symbolic)
MAX_PATHS = 12               # chains longer than this are described by the recursion only
# A gradient is unrolled into forward quantities only while at most this many
# contractions lie between its layer and the loss: each one nests another sum over a
# hidden layer, and past three the formula is longer than anyone reads (and unrolling
# every layer of a deep network would cost time quadratic in its depth). Deeper
# gradients keep the delta recursion as their readable form.
UNROLL_MAX_NESTING = 3

_BATCH_LETTERS = ("n", "m", "p", "q")
_POOLS = {
    "i": ("i", "j", "k", "l", "c", "p", "q", "r", "u", "v"),
    "k": ("k", "l", "i", "j", "c", "p", "q", "r", "u", "v"),
    "s": ("j", "c", "i", "k", "l", "p", "q", "r", "u", "v"),
}


# ----------------------------------------------------------------------------------------
# The document model: headings, paragraphs (text, inline math, code) and display blocks.

@dataclass(frozen=True)
class Span:
    kind: Literal["text", "math", "code"]
    value: str


@dataclass(frozen=True)
class Heading:
    level: int
    spans: tuple[Span, ...]


@dataclass(frozen=True)
class Para:
    spans: tuple[Span, ...]


@dataclass(frozen=True)
class Display:
    """Equations; each row is ``(lhs, rhs)`` aligned at ``rhs``, or ``(formula,)``."""

    rows: tuple[tuple[str, ...], ...]


Block = Heading | Para | Display


def _spans(*parts: str | Span) -> tuple[Span, ...]:
    return tuple(p if isinstance(p, Span) else Span("text", p) for p in parts)


def _m(latex: str) -> Span:
    return Span("math", latex)


def _c(code: str) -> Span:
    return Span("code", code)


@dataclass
class GradientFormula:
    """The final gradient of one parameter in index notation, unrolled.

    ``expr`` reads only inputs, targets, parameters and forward tensors (whose bodies
    are ``Document.forward_bodies``); ``indices`` are its free index symbols, one per
    parameter axis. It is built on first use: a deep layer's unrolled formula is not
    printed (see ``UNROLL_MAX_NESTING``), so nobody pays for it unless they ask.
    """

    param: str
    tensor: str
    indices: tuple[sp.Symbol, ...]
    unroll: Callable[[], sp.Expr] = field(repr=False, compare=False)

    @functools.cached_property
    def expr(self) -> sp.Expr:
        return self.unroll()


@dataclass
class Document:
    """A derivation, ready to render as Markdown, LaTeX, HTML or per-parameter LaTeX."""

    model: str
    source: str
    preamble: list[Block]
    forward: list[Block]
    params: dict[str, list[Block]]
    expand: list[Block] = field(default_factory=list)
    gradients: dict[str, GradientFormula] = field(default_factory=dict)
    forward_bodies: dict[str, sp.Expr] = field(default_factory=dict)

    def blocks(self) -> list[Block]:
        out = [*self.preamble, *self.forward]
        for blocks in self.params.values():
            out += blocks
        return out + self.expand

    def render(self, fmt: str) -> str:
        if fmt == "md":
            return self.markdown()
        if fmt == "tex":
            return self.tex()
        if fmt == "html":
            return self.html()
        raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")

    def markdown(self) -> str:
        return render_markdown(self.blocks())

    def tex(self) -> str:
        return render_tex(self.blocks(), self.title())

    def html(self) -> str:
        return render_html(self.blocks(), self.title())

    def title(self) -> str:
        return f"Backpropagation in {self.model}"

    def latex(self, param: str) -> str:
        """One parameter's derivation (with the forward pass) as one LaTeX math fragment."""
        if param not in self.params:
            raise UsageError(f"no derivation for {param!r} in this document")
        return render_fragment([*self.forward, *self.params[param]])

    def __str__(self) -> str:
        return self.markdown()

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def _repr_latex_(self) -> str:
        sections = [self.forward, *self.params.values()]
        if self.expand:
            sections.append(self.expand)
        return "\n\n".join(f"$${render_fragment(s)}$$" for s in sections if s)


# ----------------------------------------------------------------------------------------
# Display-only sympy functions: printed by the printers below, evaluated by the tests.

class FnApply(sp.Function):
    """``f(x)`` for a named elementwise function whose body is defined separately."""

    nargs = 2


class FnPrime(sp.Function):
    """``f'(x)``: the derivative of a named elementwise function."""

    nargs = 2


class Indicator(sp.Function):
    """``I[cond]``: 1 where the condition holds, 0 elsewhere."""

    nargs = 1


class Select(sp.Function):
    """``Select(c, a, b)``: a where c holds, else b (a Piecewise that sums cannot fold)."""

    nargs = 3


class RowSoftmax(sp.Function):
    """``softmax(z)[.., c]``, over the last axis of ``z`` (the argument is ``z[.., c]``)."""

    nargs = 1


# ----------------------------------------------------------------------------------------
# Names: one table from tensor names to LaTeX.

def _esc(name: str) -> str:
    return name.replace("_", r"\_")


def _rm(name: str) -> str:
    return rf"\mathrm{{{_esc(name)}}}"


def _opname(name: str) -> str:
    return rf"\operatorname{{{name}}}" if "_" not in name else _rm(name)


@dataclass(frozen=True)
class _Sym:
    letter: str          # "z", "W", r"\delta" or a word printed upright
    sup: str = ""        # r"(\mathrm{fc1})"
    word: bool = False

    def base(self) -> str:
        return _rm(self.letter) if self.word else self.letter

    def array(self, transpose: bool = False) -> str:
        if self.word:
            bold = rf"\mathbf{{{_esc(self.letter)}}}"
        elif self.letter.startswith("\\"):
            bold = rf"\boldsymbol{{{self.letter}}}"
        else:
            bold = rf"\mathbf{{{self.letter}}}"
        sup = self.sup + (r"\top" if transpose else "")
        return bold + (f"^{{{sup}}}" if sup else "")

    def element(self, sub: str) -> str:
        out = self.base() + (f"^{{{self.sup}}}" if self.sup else "")
        return out + (f"_{{{sub}}}" if sub else "")


_PARAM_LETTERS = {"weight": "W", "bias": "b", "scale": r"\gamma", "gamma": r"\gamma",
                  "gain": r"\gamma", "shift": r"\beta", "beta": r"\beta"}


class Names:
    """LaTeX for every tensor of a derivation and for the adjoint of each."""

    def __init__(self, deriv: Derivation) -> None:
        graph = deriv.graph
        self.graph = graph
        self.seed = deriv.seed.name
        self.syms: dict[str, _Sym] = {}
        self.order = {name: n for n, name in enumerate(graph.nodes)}
        self.order[graph.prediction] = len(graph.nodes)  # y, then t, lead a product
        for node in graph.nodes.values():
            if node.role == "target":
                self.order[node.name] = len(graph.nodes)
        used: set[str] = set()
        for node in graph.nodes.values():
            sym = self._choose(node)
            if sym.array() in used:
                sym = _Sym(node.name, "", True)
            used.add(sym.array())
            self.syms[node.name] = sym

    def _choose(self, node: Node) -> _Sym:
        graph = self.graph
        if node.role in ("input", "target"):
            return _Sym(node.name, "", len(node.name) > 1)
        sup = f"({_rm(node.layer)})"
        if node.role == "param":
            role = (node.param or node.name).rsplit(".", 1)[-1]
            letter = _PARAM_LETTERS.get(role)
            return _Sym(letter, sup) if letter else _Sym(role, sup, True)
        if node.name == graph.loss:
            return _Sym("L")
        if node.kind == "contraction":
            return _Sym("z", sup)
        if node.name == graph.prediction and node.kind == "map":
            return _Sym("y")
        if node.kind == "map":
            return _Sym("h", sup)
        for other in graph.nodes:
            if node.name.startswith(other + "_") and other != node.name:
                owner = graph.nodes[other]
                return _Sym(node.name[len(other) + 1:], f"({_rm(owner.layer)})", True)
        return _Sym(node.name, "", True)

    def has(self, name: str) -> bool:
        return name in self.syms or self.adjoint_of(name) is not None

    def adjoint_of(self, name: str) -> str | None:
        if name.startswith("d_") and name[2:] in self.syms:
            return name[2:]
        return None

    def is_delta(self, node: str) -> bool:
        """Adjoints of contractions (the pre-activations z) print as delta."""
        return self.graph.nodes[node].kind == "contraction" and node != self.graph.loss

    def array(self, name: str, transpose: bool = False) -> str:
        of = self.adjoint_of(name)
        if of is None:
            return self.syms[name].array(transpose)
        if of == self.graph.loss:
            return "1"
        if self.is_delta(of):
            return _Sym(r"\delta", self.syms[of].sup).array(transpose)
        frac = rf"\frac{{\partial L}}{{\partial {self.syms[of].array()}}}"
        return rf"\left({frac}\right)^{{\top}}" if transpose else frac

    def element(self, name: str, sub: str) -> str:
        of = self.adjoint_of(name)
        if of is None:
            return self.syms[name].element(sub)
        if of == self.graph.loss:
            return "1"
        if self.is_delta(of):
            return _Sym(r"\delta", self.syms[of].sup).element(sub)
        return rf"\frac{{\partial L}}{{\partial {self.syms[of].element(sub)}}}"

    def partial(self, num: str, den: str, num_sub: str = "", den_sub: str = "",
                arrays: bool = True) -> str:
        """d(num)/d(den) for two tensors, as arrays or as elements."""
        top = self.array(num) if arrays else self.element(num, num_sub)
        bottom = self.array(den) if arrays else self.element(den, den_sub)
        top = "L" if num == self.graph.loss else top
        return rf"\frac{{\partial {top}}}{{\partial {bottom}}}"


# ----------------------------------------------------------------------------------------
# Index letters.

_INDEX_SYMBOLS: dict[tuple[str, int], sp.Symbol] = {}


def _index(stem: str, n: int) -> sp.Symbol:
    """The integer index symbol ``<stem><n>``, made once per process.

    Equal to a fresh ``Symbol(..., integer=True)``, but the same object every time: a
    new one costs an assumption deduction, and sympy's own symbol cache does not survive
    the cache clears that switching ``distribute`` causes.
    """
    sym = _INDEX_SYMBOLS.get((stem, n))
    if sym is None:
        sym = _INDEX_SYMBOLS[stem, n] = sp.Symbol(f"{stem}{n}", integer=True)
    return sym


def _integer_symbols(expr: sp.Basic) -> set[sp.Symbol]:
    return {s for s in expr.atoms(sp.Symbol) if s.is_integer}


def _natural(sym: sp.Symbol) -> tuple[int, str, int]:
    stem = sym.name.rstrip("0123456789")
    digits = sym.name[len(stem):]
    return ({"i": 0, "k": 1}.get(stem, 2), stem, int(digits) if digits else -1)


def index_letters(exprs: Iterable[sp.Basic], first: Sequence[sp.Symbol],
                  extent: Callable[[sp.Symbol], sp.Expr | None],
                  dims: Iterable[sp.Symbol] = ()) -> dict[sp.Symbol, str]:
    """Textbook letters for the index symbols of one equation (batch axes get n, m, ...)."""
    dims = set(dims)
    found: set[sp.Symbol] = set()
    for expr in exprs:
        found |= _integer_symbols(expr)
    found -= dims
    rest = sorted(found - set(first), key=_natural)
    order = [*dict.fromkeys(first), *rest]
    letters: dict[sp.Symbol, str] = {}
    taken: set[str] = set()
    for sym in order:
        size = extent(sym)
        batch = size is not None and not size.is_number
        pool = _BATCH_LETTERS if batch else _POOLS.get(sym.name[0], _POOLS["s"])
        pick = next((c for c in pool if c not in taken), None)
        if pick is None:
            pick = next(f"{pool[0]}_{{{n}}}" for n in itertools.count(1)
                        if f"{pool[0]}_{{{n}}}" not in taken)
        taken.add(pick)
        letters[sym] = pick
    return letters


# ----------------------------------------------------------------------------------------
# Printers: index notation, and matrix notation over placeholders.

class IndexPrinter(LatexPrinter):
    """sympy's LaTeX printer with tensor names, index letters and readable products."""

    def __init__(self, names: Names, letters: Mapping[sp.Symbol, str],
                 fnames: Mapping[str, str], verbatim: Mapping[sp.Symbol, str] | None = None
                 ) -> None:
        super().__init__({"mul_symbol": None})
        self.names = names
        self.dims = frozenset(names.graph.dims.values())
        self.letters = dict(letters)
        self.fnames = fnames
        self.verbatim = dict(verbatim or {})

    # -- atoms -------------------------------------------------------------------------
    def index(self, i: sp.Expr) -> str:
        if i in self.letters:
            return self.letters[i]
        if i.is_Integer:
            return str(int(i) + 1)
        return self._print(i)

    def sub(self, indices: Sequence[sp.Expr]) -> str:
        parts = [self.index(i) for i in indices]
        return "".join(parts) if all(len(p) == 1 for p in parts) else ",".join(parts)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        return self.names.element(expr.base.name, self.sub(expr.indices))

    def _print_Symbol(self, expr: sp.Symbol, style: str = "plain") -> str:
        if expr in self.verbatim:
            return self.verbatim[expr]
        if expr in self.letters:
            return self.letters[expr]
        if expr.is_real and not expr.is_integer and self.names.has(expr.name):
            return self.names.element(expr.name, "")
        if len(expr.name) > 1 and not expr.name.isalpha():
            return _rm(expr.name)
        return super()._print_Symbol(expr)

    def _print_KroneckerDelta(self, expr: sp.KroneckerDelta, exp: object = None) -> str:
        out = rf"\delta_{{{self.sub(expr.args)}}}"
        return rf"\left({out}\right)^{{{exp}}}" if exp is not None else out

    def _print_Sum(self, expr: sp.Sum) -> str:
        head = []
        for var, lo, hi in expr.limits:
            if lo == 0:
                head.append(rf"\sum_{{{self.index(var)}=1}}^{{{self._print(hi + 1)}}}")
            else:
                head.append(rf"\sum_{{{self.index(var)}={self.index(lo)}}}^{{{self.index(hi)}}}")
        body = self._print(expr.function)
        if isinstance(expr.function, sp.Add):
            body = rf"\left({body}\right)"
        return " ".join(head) + " " + body

    def _print_FnApply(self, expr: sp.Expr, exp: object = None) -> str:
        tag, arg = expr.args
        out = rf"{self.fnames[tag.name]}\left({self._print(arg)}\right)"
        return rf"{out}^{{{exp}}}" if exp is not None else out

    def _print_FnPrime(self, expr: sp.Expr, exp: object = None) -> str:
        tag, arg = expr.args
        out = rf"{self.fnames[tag.name]}'\left({self._print(arg)}\right)"
        return rf"\left({out}\right)^{{{exp}}}" if exp is not None else out

    def _print_Indicator(self, expr: sp.Expr, exp: object = None) -> str:
        return rf"\mathbb{{I}}\left[{self._print(expr.args[0])}\right]"

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        rows = []
        for value, cond in expr.args:
            when = r"\text{otherwise}" if cond == sp.true else rf"\text{{if }} {self._print(cond)}"
            rows.append(f"{self._print(value)} & {when}")
        return r"\begin{cases} " + r" \\ ".join(rows) + r" \end{cases}"

    def _print_Select(self, expr: sp.Expr, exp: object = None) -> str:
        cond, a, b = expr.args
        return (rf"\begin{{cases}} {self._print(a)} & \text{{if }} {self._print(cond)} \\ "
                rf"{self._print(b)} & \text{{otherwise}} \end{{cases}}")

    def _print_RowSoftmax(self, expr: sp.Expr, exp: object = None) -> str:
        (arg,) = expr.args
        name = arg.base.name
        out = (rf"\operatorname{{softmax}}\left({self.names.array(name)}\right)"
               rf"_{{{self.sub(arg.indices)}}}")
        return rf"\left({out}\right)^{{{exp}}}" if exp is not None else out

    # -- structure ---------------------------------------------------------------------
    def _is_constant(self, expr: sp.Expr) -> bool:
        # The cheap test first: a Sum's free_symbols rebuilds its whole body.
        return not expr.has(sp.Indexed) and not any(
            (s.is_integer and s not in self.dims) or s in self.verbatim
            or self.names.has(s.name) for s in expr.free_symbols)

    def _is_adjoint(self, expr: sp.Expr) -> bool:
        return isinstance(expr, sp.Indexed) and self.names.adjoint_of(
            expr.base.name) is not None

    def _depth(self, expr: sp.Expr) -> int:
        """How far from the input the tensors of ``expr`` are (the loss side is deepest)."""
        order = self.names.order
        found = [order.get(self.names.adjoint_of(r.base.name) or r.base.name, -1)
                 for r in expr.atoms(sp.Indexed)]
        return max(found, default=-1)

    def _factor_rank(self, expr: sp.Expr) -> tuple[int, int, int]:  # type: ignore[override]
        """Adjoints (and sums over them) first, then the factors in chain order: the
        loss side first, the input side last; a difference after the plain factors."""
        if self._is_adjoint(expr) or isinstance(expr, sp.Sum) and any(
                self._is_adjoint(r) for r in expr.atoms(sp.Indexed)):
            return (0, 0, 0)
        if isinstance(expr, sp.KroneckerDelta):
            return (0, 1, 0)
        if isinstance(expr, sp.Sum):
            return (2, 0, 0)
        return (1, -self._depth(expr), 1 if isinstance(expr, sp.Add) else 0)

    def _print_Add(self, expr: sp.Add, order: str | None = None) -> str:
        """Sums and products of arrays before lone terms: x W^T + b, not b + x W^T."""
        terms = list(expr.as_ordered_terms())
        terms.sort(key=lambda t: (0 if t.has(sp.Sum) or (t.free_symbols & self.products)
                                  else 1, 1 if t.could_extract_minus_sign() else 0))
        out = ""
        for n, term in enumerate(terms):
            if n == 0:
                out = self._print(term)
            elif term.could_extract_minus_sign():
                out += " - " + self._print(-term)
            else:
                out += " + " + self._print(term)
        return out

    products: frozenset[sp.Symbol] | set[sp.Symbol] = frozenset()

    def _join(self, factors: list[sp.Expr]) -> str:
        parts = []
        for n, f in enumerate(factors):
            s = self._print(f)
            if isinstance(f, sp.Add) or (isinstance(f, sp.Sum) and n < len(factors) - 1):
                s = rf"\left({s}\right)"
            elif isinstance(f, sp.Piecewise) and len(factors) > 1:
                s = rf"\left({s}\right)"
            parts.append(s)
        return " ".join(parts)

    def _print_Mul(self, expr: sp.Mul) -> str:  # type: ignore[override]
        factors = list(expr.as_ordered_factors())
        const = [f for f in factors if self._is_constant(f)]
        other = [f for f in factors if not self._is_constant(f)]
        if not other:
            return super()._print_Mul(expr)
        c = sp.Mul(*const)
        sign = ""
        if c.could_extract_minus_sign():
            sign, c = "- ", -c
        num = [f for f in other if not (f.is_Pow and f.exp.is_negative)]
        den = [1 / f for f in other if f.is_Pow and f.exp.is_negative]
        num.sort(key=self._factor_rank)
        head = "" if c == 1 else self._print(c) + " "
        body = self._join(num) if num else "1"
        if len(num) == 1 and isinstance(num[0], sp.Add) and (head or den) \
                and not body.startswith(r"\left("):
            body = rf"\left({body}\right)"
        if den:
            body = rf"\frac{{{body}}}{{{self._join(den)}}}"
        return sign + head + body

    def _print_Pow(self, expr: sp.Pow) -> str:  # type: ignore[override]
        base, exp = expr.args
        if exp.is_Integer and int(exp) > 1 and (
                isinstance(base, sp.Indexed) or base in self.verbatim
                or isinstance(base, sp.Symbol) and self.names.has(base.name)):
            return rf"\left({self._print(base)}\right)^{{{self._print(exp)}}}"
        return super()._print_Pow(expr)


class MatrixPrinter(IndexPrinter):
    """Placeholders stand for whole arrays; products of arrays are Hadamard products."""

    def __init__(self, names: Names, fnames: Mapping[str, str],
                 verbatim: Mapping[sp.Symbol, str], products: set[sp.Symbol]) -> None:
        super().__init__(names, {}, fnames, verbatim)
        self.products = products

    def _factor_rank(self, expr: sp.Expr) -> tuple[int, int, int]:  # type: ignore[override]
        if expr in self.products:
            return (0, 0, 0)
        if expr in self.verbatim and self.verbatim[expr].startswith((r"\boldsymbol{\delta}",
                                                                      r"\frac{\partial L}")):
            return (1, 0, 0)
        return (2, 0, 1 if isinstance(expr, sp.Add) else 0)

    def _join(self, factors: list[sp.Expr]) -> str:
        parts = []
        for f in factors:
            s = self._print(f)
            wrap = (isinstance(f, sp.Add | sp.Piecewise) or
                    (f in self.products and len(factors) > 1) or s.startswith(r"\frac"))
            if wrap and len(factors) > 1:
                s = rf"\left({s}\right)"
            parts.append(s)
        return r" \odot ".join(parts)

    def _print_Pow(self, expr: sp.Pow) -> str:  # type: ignore[override]
        base, exp = expr.args
        if exp.is_Integer and int(exp) > 1 and not self._is_constant(base):
            inner = self._print(base)
            if not (base in self.verbatim and base not in self.products) or "^" in inner:
                inner = rf"\left({inner}\right)"
            return rf"{inner}^{{\circ {self._print(exp)}}}"
        return super()._print_Pow(expr)

    def _print_RowSoftmax(self, expr: sp.Expr, exp: object = None) -> str:
        return rf"\operatorname{{softmax}}\left({self._print(expr.args[0])}\right)"


# ----------------------------------------------------------------------------------------
# Rewrites for display (mathematically identities; never change a value).

def _set_distribute(flag: bool) -> None:
    """``sympy.core.parameters.distribute`` without the ``with``: sympy clears its whole
    cache on every change of the flag, so callers switch it only when it must change."""
    if global_parameters.distribute != flag:
        global_parameters.distribute = flag


def _rebuild(expr: sp.Expr, rule: Callable[[sp.Expr], sp.Expr],
             kinds: type | tuple[type, ...] | None = None, *,
             neutral: bool = False) -> sp.Expr:
    """Apply ``rule`` bottom-up (rebuilding only the nodes whose arguments changed).

    A rebuilt node and the rule on it are evaluated with ``distribute(False)``; the rule
    on an untouched node with the caller's setting. ``kinds``: the types the rule can
    change (it returns every other node as it is), so untouched nodes of other types are
    left alone without switching. The flag is switched lazily (each switch clears sympy's
    cache, which made printing cost several times what it computes).

    ``neutral``: what the rule builds does not depend on the flag (it wraps a tensor
    reference, or returns a number). Then a rebuild whose every rebuilt node is
    ``_neutral`` is done without switching at all, which gives the same expression.
    """
    if kinds is not None and not expr.has(*(kinds if isinstance(kinds, tuple) else (kinds,))):
        return expr  # the rule changes nothing here: no walk (has() is cached by sympy)
    outer = global_parameters.distribute
    if neutral and outer:
        out = _rebuild_neutral(expr, rule, kinds)
        if out is not None:
            return out
    try:
        return _rebuild_in(expr, rule, kinds, outer)
    finally:
        _set_distribute(outer)


def _rebuild_neutral(expr: sp.Expr, rule: Callable[[sp.Expr], sp.Expr],
                     kinds: type | tuple[type, ...] | None) -> sp.Expr | None:
    """``_rebuild_in`` in the current setting; None at the first node that might build
    differently under ``distribute(False)``."""
    if not expr.args or isinstance(expr, sp.Indexed | sp.IndexedBase):
        if kinds is not None and not isinstance(expr, kinds):
            return expr
        return rule(expr)
    args = []
    for old in expr.args:
        new = _rebuild_neutral(old, rule, kinds)
        if new is None:
            return None
        args.append(new)
    if all(new is old for new, old in zip(args, expr.args, strict=True)):
        if kinds is not None and not isinstance(expr, kinds):
            return expr
        return rule(expr)
    built = expr.func(*args)
    return rule(built) if _neutral(expr.func, args, built) else None


def _rebuild_in(expr: sp.Expr, rule: Callable[[sp.Expr], sp.Expr],
                kinds: type | tuple[type, ...] | None, outer: bool) -> sp.Expr:
    if not expr.args or isinstance(expr, sp.Indexed | sp.IndexedBase):
        if kinds is not None and not isinstance(expr, kinds):
            return expr
        _set_distribute(outer)
        return rule(expr)
    args = tuple(_rebuild_in(a, rule, kinds, outer) for a in expr.args)
    if all(new is old for new, old in zip(args, expr.args, strict=True)):
        if kinds is not None and not isinstance(expr, kinds):
            return expr
        _set_distribute(outer)
        return rule(expr)
    _set_distribute(False)
    return rule(expr.func(*args))


def _indicators(expr: sp.Expr) -> sp.Expr:
    """Piecewise((e, c), (0, True)) -> e * I[c]; any other Piecewise -> Select.

    Besides reading better, this keeps Piecewise out of sums: sympy's ``Sum`` folds a
    Piecewise in its body outwards (``piecewise_fold``), past the index it depends on.
    """
    expr = _tidy_logic(expr)

    def rule(e: sp.Expr) -> sp.Expr:
        if not isinstance(e, sp.Piecewise) or e.args[-1].cond != sp.true:
            return e
        out = e.args[-1].expr
        for value, cond in reversed(e.args[:-1]):
            if out == 0:
                out = value * Indicator(cond) if value != 1 else Indicator(cond)
            else:
                out = Select(cond, value, out)
        return out
    return _rebuild(expr, rule, sp.Piecewise)


def _tidy_logic(expr: sp.Expr) -> sp.Expr:
    """Simplify boolean conditions (ITE(c, c, False) -> c) and fold nested Piecewise."""
    def rule(e: sp.Expr) -> sp.Expr:
        if isinstance(e, sp.logic.boolalg.BooleanFunction) and not isinstance(
                e, sp.core.relational.Relational):
            return sp.logic.boolalg.simplify_logic(e)
        return e
    out = _rebuild(expr, rule, sp.logic.boolalg.BooleanFunction)
    return sp.piecewise_fold(out) if out.has(sp.Piecewise) and not out.has(sp.Sum) else out


def _pull_constants(expr: sp.Expr) -> sp.Expr:
    """Sum(c * f) -> c * Sum(f) for factors c that do not depend on the summed indices."""
    def rule(e: sp.Expr) -> sp.Expr:
        if isinstance(e, sp.Sum):
            bound = {lim[0] for lim in e.limits}
            inside, outside = [], []
            for f in sp.Mul.make_args(e.function):
                (inside if f.free_symbols & bound else outside).append(f)
            if outside and inside:
                return sp.Mul(*outside) * sp.Sum(sp.Mul(*inside), *e.limits)
        return e
    return _rebuild(expr, rule, sp.Sum)


def _flip_signs(expr: sp.Expr) -> sp.Expr:
    """-c (h - 1) x -> c (1 - h) x: absorb a negative coefficient into a difference."""
    def rule(e: sp.Expr) -> sp.Expr:
        if not isinstance(e, sp.Mul):
            return e
        coeff, rest = e.as_coeff_Mul()
        if not coeff.is_negative:
            return e
        adds = [f for f in sp.Mul.make_args(rest) if isinstance(f, sp.Add)]
        if not adds:
            return e
        adds.sort(key=lambda a: 0 if any(t.is_number and t.is_negative for t in a.args) else 1)
        pick = adds[0]
        others = list(sp.Mul.make_args(rest))
        others.remove(pick)
        flipped = sp.Add(*(-t for t in pick.args))
        with distribute(False):
            return sp.Mul(-coeff, flipped, *others) if -coeff != 1 else sp.Mul(flipped, *others)
    return _rebuild(expr, rule, sp.Mul)


@dataclass(frozen=True)
class _Node:
    """A node of :meth:`_Builder.matrix`'s plan: ``func(*args)``, made once all are placed."""

    func: type
    args: list[object]


def _neutral(func: type, args: Sequence[sp.Basic], built: sp.Basic) -> bool:
    """Whether ``func(*args)``, which gave ``built`` in the current setting, gives the
    same under ``distribute(False)`` (conservatively: False where unsure).

    In sympy the flag is read in two places of ``Mul.flatten`` only, both of which turn
    a product whose commutative part is a number times a sum into a sum (and in
    ``Add.__neg__``, which construction calls only through function ``eval`` code). So
    a node is the same either way when it is an Add (``Add.flatten`` never
    distributes: a ``c * Add`` term is rebuilt unevaluated), a Mul that did not come
    out as a sum, has no Mul to flatten and combines no powers (no exponent sums, no
    ``exp`` merging), a power with a number exponent that did not come out as a sum, a
    tensor reference, a Sum with no Piecewise to fold, or a function with atomic
    arguments (no sum for its ``eval`` to negate).
    """
    if func is sp.Add:
        return True
    if built.is_Add:
        return False
    if func is sp.Mul:
        bases = [a.as_base_exp()[0] for a in args]  # type: ignore[attr-defined]
        return len(set(bases)) == len(bases) and not any(
            isinstance(a, sp.Mul) or isinstance(a, sp.Pow) and not a.exp.is_Number
            for a in args)
    if func is sp.Pow:
        return bool(args[1].is_Number)
    if func in (sp.Indexed, sp.Tuple):
        return True
    if func is sp.Sum:
        return not args[0].has(sp.Piecewise)
    return isinstance(func, type) and issubclass(func, sp.Function) and all(
        not a.args for a in args)


def _build_neutral(plan: _Node) -> sp.Expr | None:
    """``plan`` built in the current setting where every node of it is ``_neutral``;
    None elsewhere (the caller then builds it under ``distribute(False)``)."""
    args = [_build_neutral(a) if isinstance(a, _Node) else a for a in plan.args]
    if any(a is None for a in args):
        return None
    built: sp.Expr = plan.func(*args)
    return built if _neutral(plan.func, args, built) else None


# ----------------------------------------------------------------------------------------
# The builder.

class _Builder:
    def __init__(self, spec: ModelSpec, deriv: Derivation) -> None:
        self.spec = spec
        self.deriv = deriv
        self.graph = deriv.graph
        self.names = Names(deriv)
        self.nodes = self.graph.nodes
        self.adjoints: dict[str, Adjoint] = {a.var: a for a in deriv.adjoints}
        self.known = [deriv.node(n) for n in deriv.computed]
        # The forward equations as the layers wrote them (before fusion), in order.
        self.forward_order = [n for n, node in self.nodes.items() if node.role == "op"]
        # Forward bodies worth recognising in a derivative: sigma(z) -> h, log-sum-exp.
        # Compound bodies (sums, products) are left out: matching them with wildcards is
        # slow, and the engine's own simplified forms, shown beside, already use them.
        self.patterns = [n for n in reversed(self.known) if isinstance(n.body, sp.Function)]
        self.consumers = self.graph.consumers()
        self.reaches = self._reaches_loss()
        self.fresh = 0
        self.fnames: dict[str, str] = {}
        self._edge_cache: dict[tuple[str, str], list[Block]] = {}
        self._simplified: dict[sp.Expr, sp.Expr] = {}
        self._generic_vjps: dict[tuple[str, str], sp.Expr] = {}
        self._fused_cache: dict[tuple[str, str], list[Block]] = {}
        self._displayed: dict[sp.Expr, sp.Expr] = {}
        self._delta_cache: dict[str, list[Block]] = {}
        self._summed_cache: dict[tuple[sp.Expr, tuple[sp.Symbol, ...]], list[sp.Symbol]] = {}
        self._seeded: dict[sp.Expr, bool] = {}
        self._generic_cache: dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] | None = None
        self._engine_table: dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] | None = None
        self.definitions: dict[str, tuple[sp.Symbol, sp.Expr]] = {}
        for node in self.nodes.values():
            self._describe_function(node)
        self.lse = self._logsumexps()
        self.gradients: dict[str, GradientFormula] = {}

    # -- graph helpers -----------------------------------------------------------------
    def _reaches_loss(self) -> set[str]:
        out = {self.graph.loss}
        for name in reversed(list(self.nodes)):
            if any(c in out for c in self.consumers[name]):
                out.add(name)
        return out

    def shape(self, name: str) -> tuple[sp.Expr, ...]:
        of = self.names.adjoint_of(name)
        node = self.nodes.get(of if of is not None else name)
        return node.shape if node is not None else ()

    def extents(self, *exprs: sp.Basic) -> Callable[[sp.Symbol], sp.Expr | None]:
        """How far each index runs: from the first tensor reference that uses it (in
        ``default_sort_key`` order), else from the first sum over it."""
        table: dict[sp.Symbol, sp.Expr] = {}
        for expr in exprs:
            _set_first(table, [
                (r, [(i, n) for i, n in zip(r.indices, self.shape(r.base.name),
                                            strict=False) if isinstance(i, sp.Symbol)])
                for r in expr.atoms(sp.Indexed)])
            _set_first(table, [(s, [(var, hi - lo + 1) for var, lo, hi in s.limits])
                               for s in expr.atoms(sp.Sum)])
        return table.get

    def _elementwise_operand(self, node: Node) -> sp.Indexed | None:
        """The single tensor operand read at the node's own indices, for f(x) nodes."""
        if node.kind != "map" or node.body is None or node.body.has(sp.Sum):
            return None
        refs = [r for r in node.body.atoms(sp.Indexed)]
        names = {r.base.name for r in refs}
        if len(names) != 1 or any(tuple(r.indices) != node.indices() for r in refs):
            return None
        if isinstance(node.body, sp.Indexed):
            return None
        return refs[0]

    def _describe_function(self, node: Node) -> None:
        """Name the elementwise function of an activation-like node: sigma, tanh, relu."""
        operand = self._elementwise_operand(node)
        if operand is None:
            return
        body = node.body
        assert body is not None
        if isinstance(body, sp.Function) and body.args == (operand,) and \
                type(body).__name__ not in ("exp",):
            marker = sp.Symbol("MARKER")
            text = LatexPrinter({"mul_symbol": None}).doprint(body.func(marker))
            for cut in (r"{\left(MARKER", r"\left(MARKER"):
                if cut in text:
                    self.fnames[node.name] = text[:text.index(cut)]
                    return
        label = node.label
        if label in ACTIVATIONS and label not in ("identity",):
            self.fnames[node.name] = _opname(label)
        else:
            self.fnames[node.name] = rf"f_{{{_rm(node.layer)}}}"
        u = sp.Symbol("u", real=True)
        self.definitions[node.name] = (u, body.xreplace({operand: u}))

    # -- printing ----------------------------------------------------------------------
    def letters(self, *exprs: sp.Basic, first: Sequence[sp.Symbol] = (),
                context: Sequence[sp.Basic] = ()) -> dict[sp.Symbol, str]:
        """Letters for the indices of ``exprs``; ``context`` (the left-hand side's tensor
        references) only tells the extent of each index."""
        return index_letters(exprs, first, self.extents(*exprs, *context),
                             self.graph.dims.values())

    def idx(self, expr: sp.Expr, letters: Mapping[sp.Symbol, str],
            verbatim: Mapping[sp.Symbol, str] | None = None) -> str:
        """Index notation; a sum over one value (j = 1..1) is written as its one term."""
        return IndexPrinter(self.names, letters, self.fnames, verbatim).doprint(
            _trivial_sums(expr))

    def element(self, name: str, indices: Sequence[sp.Expr],
                letters: Mapping[sp.Symbol, str]) -> str:
        sub = IndexPrinter(self.names, letters, self.fnames).sub(indices)
        if name == self.graph.loss:
            return "L"
        return self.names.element(name, sub)

    def display(self, expr: sp.Expr) -> sp.Expr:
        """Rewrites for reading (identities all): seed = 1, indicators, softmax, constants
        out of sums, signs, canonical summation indices."""
        if expr not in self._displayed:
            self._displayed[expr] = self._display(expr)
        return self._displayed[expr]

    def _display(self, expr: sp.Expr) -> sp.Expr:
        expr = expr.xreplace({self.deriv.seed: sp.Integer(1)})
        expr = _indicators(expr)
        expr = self._softmax(expr)
        expr = _pull_constants(expr)
        expr = _flip_signs(expr)
        return _canonical_bound(expr)

    def _logsumexps(self) -> dict[str, str]:
        """{lse node: z} for every node whose body is log(sum_c exp(z[.., c]))."""
        lse: dict[str, str] = {}
        for node in self.nodes.values():
            body = node.body
            if (isinstance(body, sp.log) and isinstance(body.args[0], sp.Sum)
                    and len(body.args[0].limits) == 1
                    and isinstance(body.args[0].function, sp.exp)
                    and isinstance(body.args[0].function.args[0], sp.Indexed)):
                inner = body.args[0].function.args[0]
                var = body.args[0].limits[0][0]
                if tuple(inner.indices) == (*node.indices(), var):
                    lse[node.name] = inner.base.name
        return lse

    def _softmax(self, expr: sp.Expr) -> sp.Expr:
        """exp(z[.., c] - lse[..]) -> softmax(z)[.., c] where lse = log sum_c exp(z[.., c])."""
        lse = self.lse

        def rule(e: sp.Expr) -> sp.Expr:
            if not isinstance(e, sp.exp):
                return e
            terms = sp.Add.make_args(e.args[0])
            if len(terms) != 2:
                return e
            pos = [t for t in terms if isinstance(t, sp.Indexed)]
            neg = [-t for t in terms if isinstance(-t, sp.Indexed)]
            if len(pos) != 1 or len(neg) != 1:
                return e
            (z,), (m,) = pos, neg
            if lse.get(m.base.name) == z.base.name and \
                    tuple(m.indices) == tuple(z.indices)[:-1]:
                return RowSoftmax(z)
            return e
        return _rebuild(expr, rule, sp.exp, neutral=True) if lse else expr

    # -- matrix form -------------------------------------------------------------------
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
                return None if e.is_integer and e not in self.graph.dims.values() else e
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
            ids = _integer_symbols(f) - set(self.graph.dims.values())
            inner = {s for s in ids if s in axes}
            if not ids:
                scalars.append(f)
            elif len(inner) > 1:
                return None
            else:
                groups.setdefault(next(iter(inner)) if inner else None, []).append(f)
        if any(s not in (*axes, c) for g in groups.values() for f in g
               for s in _integer_symbols(f) - set(self.graph.dims.values())
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
            flipped = (flipped[:-1] + r"\top}" if _is_plain_array(flipped) and
                       flipped.endswith(")}") else rf"\left({flipped}\right)^{{\top}}")
        options = [o for o in (straight, flipped) if o is not None]
        if not options:
            return None
        best = min(options, key=lambda s: (s.count(r"\top"), options.index(s)))
        if best is straight and _needs_paren(best):
            return rf"\left({best}\right)"
        return best

    # -- adjoints ----------------------------------------------------------------------
    def instantiate(self, expr: sp.Expr, targets: tuple[sp.Symbol, ...],
                    indices: Sequence[sp.Expr]) -> sp.Expr:
        """``expr`` (free in ``targets``) at ``indices``, its summed indices renamed fresh."""
        mapping: dict[sp.Basic, sp.Basic] = dict(zip(targets, indices, strict=True))
        for var in self._summed(expr, targets):
            self.fresh += 1
            mapping[var] = _index("r", self.fresh)
        return expr.xreplace(mapping)

    def _summed(self, expr: sp.Expr, targets: tuple[sp.Symbol, ...]) -> list[sp.Symbol]:
        """The summation indices of ``expr`` other than ``targets``, in the order fresh
        names are handed out (its sums sorted, then their limits). The same table bodies
        are instantiated over and over while unrolling, and sorting sums is not cheap."""
        key = (expr, targets)
        if key not in self._summed_cache:
            order: list[sp.Symbol] = []
            for s in sorted(expr.atoms(sp.Sum), key=sp.default_sort_key):
                for var, _, _ in s.limits:
                    if var not in targets and var not in order:
                        order.append(var)
            self._summed_cache[key] = order
        return self._summed_cache[key]

    def unroll(self, expr: sp.Expr, keep: Callable[[str], bool],
               table: Mapping[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] | None = None
               ) -> sp.Expr:
        """Substitute adjoint tensors by their formulas until only ``keep`` ones remain."""
        if table is None:
            if self._engine_table is None:
                self._engine_table = {
                    var: (tuple(_index("k", n) for n in range(self.nodes[a.node].rank)),
                          _indicators(a.expr))
                    for var, a in self.adjoints.items()}
            table = self._engine_table
        expr = _indicators(expr).xreplace({self.deriv.seed: sp.Integer(1)})
        for _ in range(len(self.nodes) + 1):
            refs = sorted((r for r in expr.atoms(sp.Indexed)
                           if r.base.name in table
                           and not keep(self.names.adjoint_of(r.base.name) or "")),
                          key=sp.default_sort_key)
            if not refs:
                break
            mapping = {}
            seeded = False
            for r in refs:
                targets, body = table[r.base.name]
                mapping[r] = self.instantiate(body, targets, r.indices)
                seeded = seeded or self._has_seed(body)
            expr = expr.xreplace(mapping)
            if seeded:  # else the seed is already gone: the walk would find nothing
                expr = expr.xreplace({self.deriv.seed: sp.Integer(1)})
        return expr

    def _has_seed(self, body: sp.Expr) -> bool:
        if body not in self._seeded:
            self._seeded[body] = body.has(self.deriv.seed)
        return self._seeded[body]

    def simplified(self, expr: sp.Expr) -> sp.Expr:
        """The engine's own simplification: rational forms, forward tensors reused."""
        if expr not in self._simplified:
            self._simplified[expr] = substitute_known(simplify_local(expr), self.patterns)
        return self._simplified[expr]

    # -- paths -------------------------------------------------------------------------
    def paths(self, start: str) -> list[list[str]]:
        out: list[list[str]] = []

        def walk(path: list[str]) -> None:
            if len(out) > MAX_PATHS:
                return
            here = path[-1]
            if here == self.graph.loss:
                out.append(path)
                return
            for c in self.consumers[here]:
                if c in self.reaches:
                    walk([*path, c])
        walk([start])
        return out

    # -- sections ----------------------------------------------------------------------
    def preamble(self, label: str) -> list[Block]:
        spec = self.spec
        out: list[Block] = [Heading(1, _spans("Backpropagation in ", _c(spec.name)))]
        out.append(Para(_spans(
            "Derived by symbackprop from ", _c(label), " (sha256 ", _c(spec.sha256[:16]),
            "). Every formula below is printed from the same sympy expressions that the "
            "generated numpy and torch modules are lowered from.")))
        return out

    def legend(self) -> list[Block]:
        rows = []
        for node in self.nodes.values():
            if node.role == "op":
                continue
            shape = _shape(node.shape)
            what = {"input": "input", "target": "target"}.get(node.role, "")
            if node.role == "param":
                what = "parameter"
            frozen = "" if node.role != "param" or node.trainable else " (frozen: no gradient)"
            rows.append(Para(_spans(
                _m(rf"{self.names.array(node.name)} \in \mathbb{{R}}^{{{shape}}}"), ": ",
                what + " ", _c(node.param or node.name), frozen)))
        note = Para(_spans(
            "Notation: indices count from 1; ", _m("n"), " runs over the ", _m("N"),
            " examples of a batch; bold letters are whole arrays, plain letters their "
            "entries; ", _m(r"\odot"), " multiplies elementwise, ", _m(r"A^{\circ 2} = A \odot A"),
            ", ", _m(r"\delta_{ik}"), " is the Kronecker delta (1 if ", _m("i = k"),
            ", else 0), ", _m(r"\mathbb{I}[\cdot]"), " is 1 where its condition holds and 0 "
            "elsewhere, ", _m(r"\mathbf{1}"), " is a column of ones, and ",
            _m(r"\boldsymbol{\delta} = \partial L / \partial \mathbf{z}"),
            " is the error at a layer's pre-activation."))
        return [*rows, note]

    def forward_section(self) -> list[Block]:
        out: list[Block] = [Heading(2, _spans("The forward pass"))]
        out += self.legend()
        for name in self.forward_order:
            node = self.nodes[name]
            assert node.body is not None
            body = self._apply_names(name, node.body)
            axes = node.indices()
            letters = self.letters(body, first=axes)
            rows: list[tuple[str, ...]] = []
            mat = self.matrix(body, axes) if axes else None
            lhs = "L" if name == self.graph.loss else self.names.array(name)
            if mat is not None:
                rows.append((lhs, f"= {mat}"
                             + (rf" \qquad ({_shape(node.shape)})" if node.shape else "")))
            rows.append((self.element(name, axes, letters), f"= {self.idx(body, letters)}"))
            if name in self.definitions:
                u, fbody = self.definitions[name]
                rows.append((rf"{self.fnames[name]}(u)", "= " + IndexPrinter(
                    self.names, {}, self.fnames, {u: "u"}).doprint(fbody)))
            what = node.label or node.kind
            out.append(Para(_spans(_c(name), f" ({what}, layer ", _c(node.layer), "):")))
            out.append(Display(tuple(rows)))
        if self.graph.prediction:
            out.append(Para(_spans("The prediction is ",
                                   _m(self.names.array(self.graph.prediction)),
                                   " and the loss is ", _m("L"), ".")))
        return out

    def _apply_names(self, name: str, body: sp.Expr) -> sp.Expr:
        """f(z) for activation-like bodies whose function has no sympy name (relu, gelu)."""
        operand = self._elementwise_operand(self.nodes[name])
        if name in self.definitions and operand is not None:
            return FnApply(sp.Symbol(name), operand)
        return body

    def param_section(self, param: Node) -> list[Block]:
        names = self.names
        title = _spans(_m(rf"\partial L / \partial {names.array(param.name)}"), " for ",
                       _c(param.param or param.name), ", shape ", _m(_shape(param.shape)))
        out: list[Block] = [Heading(2, title)]
        paths = self.paths(param.name)
        adj = self.adjoints.get(naming.adjoint(param.name))
        if not paths or adj is None:
            out.append(Para(_spans("The loss does not depend on ",
                                   _m(names.array(param.name)), ": its gradient is 0.")))
            return out
        out += self._chain(param, paths)
        out += self._factors(paths)
        out += self._fused(paths)
        out += self._recursion(paths)
        out += self._final(param, adj)
        return out

    def _chain(self, param: Node, paths: list[list[str]]) -> list[Block]:
        names = self.names
        lhs = names.partial(self.graph.loss, param.name)
        out: list[Block] = [Heading(3, _spans("The chain rule"))]
        if len(paths) > MAX_PATHS:
            out.append(Para(_spans(
                _m(names.array(param.name)), f" reaches the loss along more than {MAX_PATHS} "
                "paths; the recursion below sums them layer by layer.")))
            return out
        products = []
        for path in paths:
            factors = [names.partial(path[n + 1], path[n]) for n in reversed(range(len(path) - 1))]
            products.append(" ".join(factors))
        many = "s" if len(paths) > 1 else ""
        out.append(Para(_spans(_m(names.array(param.name)), f" reaches the loss along "
                               f"{len(paths)} path{many} through the layer graph"
                               + (", one product per path:" if many else ":"))))
        rows = [(lhs, "= " + products[0])] + [("", "+ " + p) for p in products[1:]]
        out.append(Display(tuple(rows)))
        return out

    def _edges(self, paths: list[list[str]]) -> list[tuple[str, str]]:
        edges: list[tuple[str, str]] = []
        for path in paths:
            for n in range(len(path) - 1):
                if (path[n + 1], path[n]) not in edges:
                    edges.append((path[n + 1], path[n]))
        order = list(self.nodes)
        edges.sort(key=lambda e: (-order.index(e[0]), -order.index(e[1])))
        return edges

    def _generic_vjp(self, consumer: Node, operand: Node) -> sp.Expr:
        """dL/d operand through consumer, with f'(x) kept symbolic for named functions."""
        key = (consumer.name, operand.name)
        if key not in self._generic_vjps:
            self._generic_vjps[key] = self._derive_generic_vjp(consumer, operand)
        return self._generic_vjps[key]

    def _derive_generic_vjp(self, consumer: Node, operand: Node) -> sp.Expr:
        g = naming.adjoint(consumer.name)
        if consumer.name in self.fnames and self._elementwise_operand(consumer) is not None:
            k = tuple(_index("k", n) for n in range(operand.rank))
            return ref(g, k) * FnPrime(sp.Symbol(consumer.name), ref(operand.name, k))
        raw = self._engine_raw(consumer, operand)
        return raw if raw is not None else vjp(consumer, operand, g)

    def _engine_raw(self, consumer: Node, operand: Node) -> sp.Expr | None:
        """``vjp(consumer, operand, d_consumer)`` as the engine already derived it: its
        raw contribution, where the engine differentiated this very body (the consumer
        survived fusion unchanged); None elsewhere."""
        fused = self.deriv.fused
        node = fused.nodes.get(consumer.name)
        adj = self.adjoints.get(naming.adjoint(operand.name))
        if node is None or adj is None or fused.absorbed.get(consumer.name) or \
                node.body != consumer.body or node.shape != consumer.shape or \
                node.indices() != consumer.indices():
            return None
        for contrib in adj.contributions:
            if contrib.consumer == consumer.name:
                return contrib.raw
        return None

    def _factors(self, paths: list[list[str]]) -> list[Block]:
        out: list[Block] = [Heading(3, _spans("Each factor, as sympy derived it"))]
        for consumer, operand in self._edges(paths):
            if (consumer, operand) not in self._edge_cache:
                self._edge_cache[consumer, operand] = self._edge(consumer, operand)
            out += self._edge_cache[consumer, operand]
        return out

    def _rows(self, lhs: str, forms: Sequence[str]) -> list[tuple[str, ...]]:
        """``lhs = f1 = f2 ...``, one row per distinct form."""
        distinct = list(dict.fromkeys(forms))
        if not distinct:
            return []
        return [(lhs, "= " + distinct[0])] + [("", "= " + f) for f in distinct[1:]]

    def _vjp(self, consumer: str, operand: str) -> sp.Expr:
        """dL/d operand through consumer, simplified: the engine's own contribution where
        the edge survived fusion, else derived here the same way."""
        adj = self.adjoints.get(naming.adjoint(operand))
        if consumer in self.deriv.fused.nodes and adj is not None and \
                not self.deriv.fused.absorbed.get(consumer):
            for contrib in adj.contributions:
                if contrib.consumer == consumer:
                    return contrib.simplified
        return self.simplified(vjp(self.nodes[consumer], self.nodes[operand],
                                   naming.adjoint(consumer)))

    def _edge(self, consumer_name: str, operand_name: str) -> list[Block]:
        """One factor d(consumer)/d(operand): its local derivative and what it does to dL."""
        names = self.names
        consumer = self.nodes[consumer_name]
        operand = self.nodes[operand_name]
        assert consumer.body is not None
        kind = {"map": "elementwise", "contraction": "a contraction",
                "reduction": "a reduction"}.get(consumer.kind, consumer.kind)
        out: list[Block] = [Para(_spans(
            _m(names.partial(consumer_name, operand_name)), " — ", _c(consumer_name),
            f" ({consumer.label or consumer.kind}, {kind}):"))]
        i = consumer.indices()
        k = tuple(_index("k", n) for n in range(operand.rank))
        elementwise = (consumer.kind == "map" and not consumer.body.has(sp.Sum) and all(
            tuple(r.indices) == i for r in consumer.body.atoms(sp.Indexed)
            if r.base.name == operand_name))
        if elementwise:
            # A scalar derivative: the Jacobian is diagonal.
            raw = local_derivative(consumer.body, ref(operand_name, i))
            forms = [self.display(raw), self.display(self.simplified(raw))]
            if consumer_name in self.fnames and self._elementwise_operand(consumer) is not None:
                forms.insert(0, FnPrime(sp.Symbol(consumer_name), ref(operand_name, i)))
            letters = self.letters(*forms, first=i, context=(ref(consumer_name, i),))
            sub = self.sub(i, letters)
            lhs = names.partial(consumer_name, operand_name, sub, sub, arrays=False)
            out.append(Display(tuple(self._rows(lhs, [self.idx(f, letters) for f in forms]))))
        elif consumer.rank:
            local = self.display(eliminate_deltas(local_derivative(consumer.body,
                                                                  ref(operand_name, k))))
            letters = self.letters(local, first=(*i, *k),
                                   context=(ref(consumer_name, i), ref(operand_name, k)))
            lhs = names.partial(consumer_name, operand_name, self.sub(i, letters),
                                self.sub(k, letters), arrays=False)
            out.append(Display(((lhs, "= " + self.idx(local, letters)),)))
        # The vector-Jacobian product: what this factor does to the gradient.
        generic = self.display(self._generic_vjp(consumer, operand))
        result = self.display(self._vjp(consumer_name, operand_name))
        letters = self.letters(generic, result, first=k, context=(ref(operand_name, k),))
        lhs = rf"\frac{{\partial L}}{{\partial {self.element(operand_name, k, letters)}}}"
        rows = self._rows(lhs, [self.idx(e, letters) for e in (generic, result)])
        mats = [m for m in (self.matrix(e, k) if k else None for e in (generic, result))
                if m is not None]
        rows += self._rows(rf"\frac{{\partial L}}{{\partial {names.array(operand_name)}}}",
                           mats)
        if consumer.rank:
            out.append(Para(_spans("so the gradient flows back as")))
        out.append(Display(tuple(rows)))
        return out

    def sub(self, indices: Sequence[sp.Expr], letters: Mapping[sp.Symbol, str]) -> str:
        return IndexPrinter(self.names, letters, self.fnames).sub(indices)

    def _fused(self, paths: list[list[str]]) -> list[Block]:
        """Where fusion let sympy simplify across layers: raw and simplified forms."""
        fused = self.deriv.fused
        on_path = {n for p in paths for n in p}
        out: list[Block] = []
        for name, absorbed in fused.absorbed.items():
            if not absorbed or name not in on_path:
                continue
            node = fused.nodes[name]
            for operand in node.operands:
                adj = self.adjoints.get(naming.adjoint(operand))
                if adj is None or operand not in on_path:
                    continue
                for contrib in adj.contributions:
                    if contrib.consumer != name:
                        continue
                    if (name, operand) not in self._fused_cache:
                        self._fused_cache[name, operand] = self._fused_one(
                            name, absorbed, operand, contrib.raw, contrib.simplified)
                    out += self._fused_cache[name, operand]
        if out:
            out.insert(0, Heading(3, _spans("Simplified across layers")))
        return out

    def _fused_one(self, name: str, absorbed: list[str], operand: str, raw: sp.Expr,
                   simple: sp.Expr) -> list[Block]:
        names = self.names
        node = self.deriv.fused.nodes[name]
        assert node.body is not None
        body = node.body
        letters = self.letters(body, first=node.indices())
        absorbed_math = [_m(names.array(a)) for a in absorbed]
        parts: list[str | Span] = ["symbackprop substitutes "]
        for n, a in enumerate(absorbed_math):
            parts += [a, ", " if n < len(absorbed_math) - 1 else ""]
        parts += [" into ", _m("L" if name == self.graph.loss else names.array(name)),
                  " before differentiating, so sympy differentiates one expression in ",
                  _m(names.array(operand)), ":"]
        out: list[Block] = [Para(_spans(*parts))]
        fired = list(dict.fromkeys(
            (f.rule, f.why) for f in getattr(self.deriv, "rewrites", ())
            if getattr(f, "where", "") == f"forward {name}"))
        for rule, why in fired:
            out.append(Para(_spans("Rewritten for numerical stability first: ", _c(rule),
                                   f" ({why}).")))
        lhs = self.element(name, node.indices(), letters)
        out.append(Display(((lhs, "= " + self.idx(_tidy_logic(body), letters)),)))
        in_operand = simple
        for _ in absorbed:
            for producer in absorbed:
                in_operand = inline(in_operand, self.nodes[producer])
        k = tuple(_index("k", n) for n in range(self.nodes[operand].rank))
        forms: list[str] = []
        letters = self.letters(raw, in_operand, simple, first=k)
        for e in (raw, in_operand, simple):
            text = self.idx(self.display(e), letters)
            if text not in forms:
                forms.append(text)
        lhs = rf"\frac{{\partial L}}{{\partial {self.element(operand, k, letters)}}}"
        rows = [(lhs, "= " + forms[0])] + [("", "= " + f) for f in forms[1:]]
        out.append(Para(_spans(
            "raw, as differentiated; then simplified (the last form is what the generated "
            "code computes):" if len(forms) > 1 else
            "sympy's derivative, already in simplest form (what the generated code "
            "computes):")))
        out.append(Display(tuple(rows)))
        return out

    def _delta_nodes(self, paths: list[list[str]]) -> list[str]:
        order = list(self.nodes)
        found = {n for p in paths for n in p if self.nodes[n].role == "op"
                 and self.names.is_delta(n) and naming.adjoint(n) in self.adjoints}
        return sorted(found, key=lambda n: -order.index(n))

    def _recursion(self, paths: list[list[str]]) -> list[Block]:
        deltas = self._delta_nodes(paths)
        if not deltas:
            return []
        out: list[Block] = [Heading(3, _spans("The error at each layer (the delta recursion)"))]
        if deltas[0] not in self._delta_cache:
            self._delta_cache[deltas[0]] = self._output_delta(deltas[0])
        out += self._delta_cache[deltas[0]]
        for earlier in deltas[1:]:
            if earlier not in self._delta_cache:
                self._delta_cache[earlier] = self._delta_step(earlier)
            out += self._delta_cache[earlier]
        return out

    def _output_delta(self, first: str) -> list[Block]:
        """The error at the last contraction, in forward quantities only."""
        names = self.names
        k = tuple(_index("k", n) for n in range(self.nodes[first].rank))
        adj = self.adjoints[naming.adjoint(first)]
        forms = [self.display(self.unroll(adj.expr, keep=lambda n: False))]
        loss_cls = LOSSES.get(self.spec.loss.type)
        note = None
        if loss_cls is not None and loss_cls.target_kind == "distribution":
            collapsed = self._rows_sum_to_one(forms[0])
            if collapsed != forms[0]:
                forms.append(self.display(self.simplified(collapsed)))
                note = ("Each row of the target sums to 1 (one-hot or probabilities), so "
                        "the sum over classes drops out.")
        out: list[Block] = [Para(_spans("At the output, in forward quantities only:"))]
        var = naming.adjoint(first)
        letters = self.letters(*forms, first=k)
        rows = self._rows(names.array(var), [m for m in (self.matrix(f, k) for f in forms)
                                             if m is not None])
        rows += self._rows(self.element(var, k, letters), [self.idx(f, letters) for f in forms])
        out.append(Display(tuple(rows)))
        if note:
            out.append(Para(_spans(note)))
        return out

    def _delta_step(self, earlier: str) -> list[Block]:
        """delta one layer down, in terms of the deltas above it: generic, then computed."""
        table = self._generic()
        k = tuple(_index("k", n) for n in range(self.nodes[earlier].rank))
        var = naming.adjoint(earlier)
        targets, body = table[var]
        generic = self.display(self.unroll(body.xreplace(dict(zip(targets, k, strict=True))),
                                           keep=self.names.is_delta, table=table))
        engine = self.display(self.unroll(self.adjoints[var].expr, keep=self.names.is_delta))
        rows = self._rows(self.names.array(var), [m for m in (self.matrix(e, k)
                                                              for e in (generic, engine))
                                                  if m is not None])
        letters = self.letters(generic, engine, first=k)
        rows += self._rows(self.element(var, k, letters),
                           [self.idx(e, letters) for e in (generic, engine)])
        return [Para(_spans("One layer down:")), Display(tuple(rows))]

    def _generic(self) -> dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]]:
        if self._generic_cache is None:
            self._generic_cache = self._generic_table()
        return self._generic_cache

    def _generic_table(self) -> dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]]:
        """Adjoint formulas over the unfused graph, f'(x) kept symbolic."""
        table: dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] = {}
        for name in self.nodes:
            node = self.nodes[name]
            if name == self.graph.loss or name not in self.reaches or node.role != "op":
                continue
            k = tuple(_index("k", n) for n in range(node.rank))
            total = sp.Integer(0)
            for c in self.consumers[name]:
                if c in self.reaches:
                    part = self._generic_vjp(self.nodes[c], node)
                    total += _indicators(part if part.has(FnPrime) else self.simplified(part))
            table[naming.adjoint(name)] = (k, total)
        return table

    def _rows_sum_to_one(self, expr: sp.Expr) -> sp.Expr:
        target = self.spec.loss.target
        if target is None:
            return expr

        def rule(e: sp.Expr) -> sp.Expr:
            if isinstance(e, sp.Sum) and len(e.limits) == 1 and isinstance(e.function,
                                                                           sp.Indexed):
                r = e.function
                var, lo, hi = e.limits[0]
                shape = self.nodes[target].shape
                if (r.base.name == target and r.indices[-1] == var and lo == 0
                        and hi + 1 == shape[-1]):
                    return sp.Integer(1)
            return e
        return _rebuild(expr, rule, sp.Sum, neutral=True)

    def _final(self, param: Node, adj: Adjoint) -> list[Block]:
        names = self.names
        out: list[Block] = [Heading(3, _spans("The gradient"))]
        k = tuple(_index("k", n) for n in range(param.rank))
        expr = self.display(adj.expr)
        letters = self.letters(expr, first=k)
        rows: list[tuple[str, ...]] = []
        lhs = names.partial(self.graph.loss, param.name)
        mat = self.matrix(expr, k) if k else None
        if mat is not None:
            rows.append((lhs, f"= {mat}"))
        lhs_el = rf"\frac{{\partial L}}{{\partial {self.element(param.name, k, letters)}}}"
        rows.append((lhs_el, "= " + self.idx(expr, letters)))
        out.append(Display(tuple(rows)))
        shapes = []
        for name in sorted({r.base.name for r in expr.atoms(sp.Indexed)},
                           key=lambda n: (self.names.adjoint_of(n) is None, n)):
            shapes += [_m(rf"{names.array(name)} \in \mathbb{{R}}^{{{_shape(self.shape(name))}}}"),
                       ", "]
        out.append(Para(_spans("Shapes: ", *shapes, "so ", _m(lhs), " has shape ",
                               _m(_shape(param.shape)), ", the shape of ",
                               _m(names.array(param.name)), ". The generated code computes it "
                               "as ", _c(naming.adjoint(param.name)), " in ",
                               _c("loss_and_grad"), ".")))
        formula = GradientFormula(param.param or param.name, param.name, k,
                                  lambda: self.display(self.unroll(adj.expr,
                                                                   keep=lambda n: False)))
        self.gradients[formula.param] = formula
        nesting = max(sum(self.nodes[n].kind == "contraction" for n in path[2:])
                      for path in self.paths(param.name))
        if nesting <= UNROLL_MAX_NESTING:
            letters = self.letters(formula.expr, first=k)
            out.append(Para(_spans("Unrolled into forward quantities only:")))
            out.append(Display(((lhs_el, "= " + self.idx(formula.expr, letters)),)))
        else:
            out.append(Para(_spans(
                f"Not unrolled into forward quantities: {nesting} contractions lie between "
                "this layer and the loss, each nesting another sum; the delta recursion "
                "above is the readable form, one layer at a time.")))
        return out

    # -- expand ------------------------------------------------------------------------
    def expand_section(self) -> list[Block]:
        trainable = [p for p in self.graph.params() if p.trainable]
        count = sum(_size(p.shape) for p in trainable)
        if count > EXPAND_MAX_PARAMS:
            raise UsageError(
                f"--expand writes one formula per scalar parameter and is meant for small "
                f"networks: {self.spec.name} has {count} trainable scalars, the limit is "
                f"{EXPAND_MAX_PARAMS}; use --param NAME for one parameter in matrix form")
        elements = sum(_size(tuple(d for d in self.nodes[n].shape if d.is_number))
                       for n in self.forward_order)
        if elements > EXPAND_MAX_ELEMENTS:
            raise UsageError(
                f"--expand: the forward pass of {self.spec.name} has {elements} scalars per "
                f"example, the limit is {EXPAND_MAX_ELEMENTS}")
        out: list[Block] = [Heading(2, _spans("Every scalar, expanded")), Para(_spans(
            "The same derivation written out entry by entry for one example ", _m("n"),
            " of the batch (sums over the batch stay sums).")),
            Heading(3, _spans("Forward"))]
        for name in self.forward_order:
            node = self.nodes[name]
            assert node.body is not None
            rows = []
            for idx in _entries(node):
                body = _expand_sums(self._apply_names(name, node.body).xreplace(
                    dict(zip(node.indices(), idx, strict=True))))
                letters = self.letters(body, *[i for i in idx if isinstance(i, sp.Symbol)],
                                       first=[i for i in idx if isinstance(i, sp.Symbol)])
                rows.append((self.element(name, idx, letters),
                             "= " + self.idx(self.display(body), letters)))
            out.append(Display(tuple(rows)))
        out.append(Heading(3, _spans("Gradients")))
        for p in trainable:
            formula = self.gradients.get(p.param or p.name)
            if formula is None:
                continue
            rows = []
            for idx in itertools.product(*(range(int(d)) for d in p.shape)):
                values = tuple(sp.Integer(v) for v in idx)
                expr = _expand_sums(formula.expr.xreplace(
                    dict(zip(formula.indices, values, strict=True))))
                expr = self.display(expr)
                letters = self.letters(expr)
                lhs = rf"\frac{{\partial L}}{{\partial {self.element(p.name, values, letters)}}}"
                rows.append((lhs, "= " + self.idx(expr, letters)))
            out.append(Para(_spans(_c(p.param or p.name), ":")))
            out.append(Display(tuple(rows)))
        return out


def _set_first(table: dict[sp.Symbol, sp.Expr],
               items: list[tuple[sp.Basic, list[tuple[sp.Symbol, sp.Expr]]]]) -> None:
    """``table.setdefault(key, value)`` for the pairs of every item, the items taken in
    ``default_sort_key`` order. Only keys the items disagree on need that order, and
    sorting sums by it walks their whole bodies, so only those are sorted."""
    found: dict[sp.Symbol, list[tuple[sp.Basic, sp.Expr]]] = {}
    for item, pairs in items:
        seen: set[sp.Symbol] = set()
        for key, value in pairs:
            if key not in table and key not in seen:  # an item's first pair for a key
                seen.add(key)
                found.setdefault(key, []).append((item, value))
    for key, options in found.items():
        if len({value for _, value in options}) == 1:
            table[key] = options[0][1]
        else:
            table[key] = min(options, key=lambda o: sp.default_sort_key(o[0]))[1]


def _trivial_sums(expr: sp.Expr) -> sp.Expr:
    """A sum over a single value is that one term: Sum(f(j), (j, 0, 0)) -> f(0)."""
    def rule(e: sp.Expr) -> sp.Expr:
        # A Sum with nothing to drop is returned as it is: an equal new Sum would make
        # ``_rebuild`` rebuild every ancestor (and clear sympy's cache twice doing so).
        if not isinstance(e, sp.Sum) or all(lo != hi for _, lo, hi in e.limits):
            return e
        body, kept = e.function, []
        for var, lo, hi in e.limits:
            if lo == hi:
                body = body.xreplace({var: lo})
            else:
                kept.append((var, lo, hi))
        return sp.Sum(body, *kept) if kept else body
    return _rebuild(expr, rule, sp.Sum)


def _canonical_bound(expr: sp.Expr) -> sp.Expr:
    """Rename summation indices s0, s1, ... in the order they appear (stable letters)."""
    sums = []

    def collect(e: sp.Expr) -> None:
        if isinstance(e, sp.Sum):
            sums.append(e)
        for a in e.args:
            collect(a)
    collect(expr)
    bound: list[sp.Symbol] = []
    for s in sums:
        for var, _, _ in s.limits:
            if var not in bound:
                bound.append(var)
    if not bound:
        return expr
    # One simultaneous replacement: xreplace maps every node at most once, so a swap
    # such as {s1: s0, s0: s1} needs no temporary names.
    return expr.xreplace({v: _index("s", n) for n, v in enumerate(bound)})


def _bound(expr: sp.Expr) -> set[sp.Symbol]:
    return {lim[0] for s in expr.atoms(sp.Sum) for lim in s.limits}


def _is_plain_array(latex: str) -> bool:
    return latex.startswith((r"\mathbf{", r"\boldsymbol{")) and " " not in latex


def _needs_paren(latex: str) -> bool:
    return " " in latex and not _is_plain_array(latex) and not latex.startswith(r"\left(")


def _paren(latex: str) -> str:
    return rf"\left({latex}\right)" if " " in latex else latex


def _shape(shape: tuple[sp.Expr, ...]) -> str:
    return r" \times ".join(str(d) for d in shape) if shape else "1"


def _size(shape: tuple[sp.Expr, ...]) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _entries(node: Node) -> list[tuple[sp.Expr, ...]]:
    axes: list[list[sp.Expr]] = []
    for i, d in zip(node.indices(), node.shape, strict=True):
        axes.append([sp.Integer(v) for v in range(int(d))] if d.is_number else [i])
    return [tuple(t) for t in itertools.product(*axes)]


def _expand_sums(expr: sp.Expr) -> sp.Expr:
    """Write out every sum whose bounds are numbers; keep sums over the batch."""
    def rule(e: sp.Expr) -> sp.Expr:
        if not isinstance(e, sp.Sum):
            return e
        body = e.function
        kept = []
        for var, lo, hi in reversed(e.limits):
            if lo.is_number and hi.is_number:
                body = sp.Add(*(body.xreplace({var: sp.Integer(v)})
                                for v in range(int(lo), int(hi) + 1)))
            else:
                kept.append((var, lo, hi))
        return sp.Sum(body, *reversed(kept)) if kept else body
    return _rebuild(expr, rule, sp.Sum)


# ----------------------------------------------------------------------------------------
# Renderers.

def _text_md(text: str) -> str:
    for ch in "\\*_[]<>`#":
        text = text.replace(ch, "\\" + ch)
    return text


def _join_spans(spans: Sequence[Span], math: Callable[[str], str], code: Callable[[str], str],
                text: Callable[[str], str]) -> str:
    """One paragraph in one output format: each span through its kind's formatter."""
    return "".join({"math": math, "code": code}.get(s.kind, text)(s.value) for s in spans)


def _spans_md(spans: Sequence[Span]) -> str:
    return _join_spans(spans, lambda v: f"${v}$", lambda v: f"`{v}`", _text_md)


def _aligned(rows: Sequence[tuple[str, ...]]) -> str:
    lines = [" & ".join(r) if len(r) > 1 else f"& {r[0]}" for r in rows]
    return "\\begin{aligned}\n" + " \\\\\n".join(lines) + "\n\\end{aligned}"


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _spans_md(b.spans))
        elif isinstance(b, Para):
            out.append(_spans_md(b.spans))
        else:
            out.append("$$\n" + _aligned(b.rows) + "\n$$")
    return "\n\n".join(out) + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "_": r"\_", "^": r"\^{}",
                "#": r"\#", "$": r"\$", "%": r"\%", "&": r"\&", "~": r"\~{}"}


def _text_tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text).replace("—", "---")


def _spans_tex(spans: Sequence[Span]) -> str:
    return _join_spans(spans, lambda v: f"${v}$", lambda v: rf"\texttt{{{_text_tex(v)}}}",
                       _text_tex)


def render_tex(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            if b.level == 1:
                continue
            cmd = {2: "section*", 3: "subsection*"}.get(b.level, "paragraph")
            body.append(rf"\{cmd}{{{_spans_tex(b.spans)}}}")
        elif isinstance(b, Para):
            body.append(_spans_tex(b.spans))
        else:
            lines = [" & ".join(r) if len(r) > 1 else f"& {r[0]}" for r in b.rows]
            body.append("\\begin{align*}\n" + " \\\\\n".join(lines) + "\n\\end{align*}")
    head = [
        r"\documentclass[10pt]{article}",
        r"\usepackage[a4paper,landscape,margin=1.5cm]{geometry}",
        r"\usepackage{amsmath,amssymb}",
        r"\allowdisplaybreaks",
        r"\setlength{\parindent}{0pt}",
        r"\setlength{\parskip}{0.5em}",
        rf"\title{{{_text_tex(title)}}}",
        r"\date{}",
        r"\begin{document}",
        r"\maketitle",
    ]
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n\n\\end{document}\n"


def _text_frag(text: str) -> str:
    return r"\text{" + "".join(_TEX_SPECIAL.get(ch, ch) for ch in text) + "}"


def _spans_frag(spans: Sequence[Span], bold: bool = False) -> str:
    out = []
    for s in spans:
        if s.kind == "math":
            out.append(s.value)
        elif s.kind == "code":
            out.append(rf"\mathtt{{{_esc(s.value)}}}")
        elif s.value:
            text = _text_frag(s.value)
            out.append(text.replace(r"\text{", r"\textbf{", 1) if bold else text)
    return " ".join(out)


def _lines(spans: Sequence[Span]) -> list[tuple[Span, ...]]:
    """Break a long paragraph after each "; " so no row of the fragment runs off."""
    lines: list[list[Span]] = [[]]
    for span in spans:
        if span.kind != "text" or "; " not in span.value:
            lines[-1].append(span)
            continue
        parts = span.value.split("; ")
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            lines[-1].append(Span("text", part if last else part + ";"))
            if not last:
                lines.append([])
    return [tuple(line) for line in lines if line]


def render_fragment(blocks: Sequence[Block]) -> str:
    """Blocks as one LaTeX math fragment (for IPython.display.Math or a \\[ \\])."""
    rows = []
    for b in blocks:
        if isinstance(b, Heading):
            rows.append(_spans_frag(b.spans, bold=True))
        elif isinstance(b, Para):
            rows += [_spans_frag(line) for line in _lines(b.spans)]
        else:
            rows.append(_aligned(b.rows))
    return "\\begin{array}{l}\n" + " \\\\\n".join(rows) + "\n\\end{array}"


def _mathml(latex: str, display: str) -> str:
    from latex2mathml.converter import convert

    out = convert(latex, display=display)
    bad = [m for m in ("<merror", "<mi>\\", "<mi>&</mi>", "<mo>\\") if m in out]
    if bad:  # pragma: no cover - a LaTeX construct the converter does not know
        raise RuntimeError(f"could not convert to MathML ({bad[0]}): {latex}")
    return out


def _spans_html(spans: Sequence[Span]) -> str:
    return _join_spans(spans, lambda v: _mathml(v, "inline"),
                       lambda v: f"<code>{html.escape(v)}</code>", html.escape)


_CSS = """
body { font-family: 'DejaVu Serif', 'Latin Modern Roman', serif; margin: 2em auto;
       max-width: 70em; padding: 0 1em; line-height: 1.5; color: #111; }
h1, h2, h3 { font-family: 'DejaVu Sans', sans-serif; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
code { font-size: 0.9em; background: #f3f3f3; padding: 0 0.2em; }
div.eq { overflow-x: auto; overflow-y: hidden; margin: 0.4em 0 0.4em 1.5em;
          padding: 0.3em 0; }
mtable { math-style: normal; }
math { font-family: 'Latin Modern Math', 'STIX Two Math', 'DejaVu Math TeX Gyre', math; }
div.eq > math { display: inline math; math-style: normal; }
mtd[columnalign="right"] { text-align: right; }
mtd[columnalign="left"] { text-align: left; }
mtd { padding: 0.15em 0.25em; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_spans_html(b.spans)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_spans_html(b.spans)}</p>")
        else:
            cols = "rl" if any(len(r) > 1 for r in b.rows) else "l"
            lines = [" & ".join(r) if len(r) > 1 else (f"& {r[0]}" if cols == "rl" else r[0])
                     for r in b.rows]
            latex = rf"\begin{{array}}{{{cols}}} " + r" \\ ".join(lines) + r" \end{array}"
            body.append(f'<div class="eq">{_mathml(latex, "block")}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------------
# Entry points.

def build(spec: ModelSpec, deriv: Derivation, label: str, *,
          params: Sequence[str] | None = None, expand: bool = False) -> Document:
    """The derivation document of ``deriv`` (of ``spec``, read from ``label``)."""
    builder = _Builder(spec, deriv)
    by_param = {p.param: p for p in deriv.graph.params()}
    trainable = [p.param for p in deriv.graph.params() if p.trainable and p.param]
    if params is None:
        selected = trainable
    else:
        selected = []
        for name in params:
            if name not in by_param:
                known = ", ".join(trainable) or "none"
                raise UsageError(f"unknown parameter {name!r}; trainable parameters of "
                                 f"{spec.name}: {known}")
            if name not in trainable:
                raise UsageError(f"parameter {name!r} is frozen (trainable: false): it has "
                                 "no gradient to derive")
            if name not in selected:
                selected.append(name)
    doc = Document(spec.name, label, builder.preamble(label), builder.forward_section(), {})
    for name in (selected if not expand else trainable):
        blocks = builder.param_section(by_param[name])
        if name in selected:
            doc.params[name] = blocks
    if expand:
        doc.expand = builder.expand_section()
    doc.gradients = dict(builder.gradients)
    doc.forward_bodies = {n: deriv.graph.nodes[n].body for n in builder.forward_order}
    return doc


def derivations(spec: ModelSpec, deriv: Derivation, label: str) -> dict[str, str]:
    """{parameter: LaTeX fragment} for every trainable parameter (``DERIVATIONS``)."""
    doc = build(spec, deriv, label)
    return {name: doc.latex(name) for name in doc.params}


_MODULE_CACHE: dict[tuple[str, str], list[dict[str, str]]] = {}
_MODULE_CACHE_SIZE = 32


def module_derivations(spec: ModelSpec, deriv: Derivation, label: str) -> list[dict[str, str]]:
    """``DERIVATIONS`` for a generated module: [{"name": param, "literal": Python literal}].

    Deriving is deterministic, so the text is cached by the spec's sha256 and label: both
    backends of a spec (and every later compile of the same file) share one rendering.
    """
    key = (spec.sha256, label)
    if key not in _MODULE_CACHE:
        if len(_MODULE_CACHE) >= _MODULE_CACHE_SIZE:
            del _MODULE_CACHE[next(iter(_MODULE_CACHE))]
        _MODULE_CACHE[key] = [{"name": name, "literal": python_literal(text)}
                              for name, text in derivations(spec, deriv, label).items()]
    return _MODULE_CACHE[key]


def python_literal(text: str, indent: str = "        ") -> str:
    """``text`` as a parenthesised Python string literal, one ``repr`` per line."""
    lines = text.splitlines(keepends=True)
    return "(\n" + "".join(f"{indent}{line!r}\n" for line in lines) + indent[:-4] + ")"


__all__ = ["EXPAND_MAX_ELEMENTS", "EXPAND_MAX_PARAMS", "FORMATS", "Document", "FnApply",
           "FnPrime", "GradientFormula", "Indicator", "RowSoftmax", "Select", "build",
           "derivations", "module_derivations", "python_literal"]
