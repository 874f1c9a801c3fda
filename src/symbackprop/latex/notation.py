"""Notation: how tensors, adjoints and indices are written, and the two LaTeX printers.

One convention throughout the document:

- A layer's tensors carry the layer name as a short upright subscript: the matrix
  ``\\mathbf{W}_{\\mathrm{fc1}}``, its entry ``W_{\\mathrm{fc1},ij}`` (one subscript
  level, the layer name before the comma, the indices after it). Inputs and targets
  keep their own names (``\\mathbf{x}``, ``\\mathbf{t}``); the prediction is
  ``\\mathbf{y}``; the loss ``L``.
- The error signal at a layer's pre-activation, dL/dz, is ``\\boldsymbol{\\varepsilon}``
  (entries ``\\varepsilon``): epsilon for *error*, and not delta, because the Kronecker
  delta ``\\delta_{ij}`` appears in the very same equations (every local Jacobian of a
  contraction has one). Other adjoints are written as the derivative they are,
  ``\\partial L / \\partial \\mathbf{h}``.
- Indices: ``n`` (then ``m``) runs over the examples of a batch; the other indices are
  lettered ``i, j, k, l, ...`` in order of appearance, the left-hand side's first, so
  ``z_{ni} = \\sum_j W_{ij} x_{nj}`` in the forward pass, ``\\varepsilon_{ni}`` in the
  backward pass and ``\\partial L / \\partial W_{ij}`` in the gradients all agree.
- Bold letters are whole arrays, plain letters their entries.

The printers: :class:`IndexPrinter` writes index notation (sums, entries, Kronecker
deltas); :class:`MatrixPrinter` writes an expression whose tensor references were
replaced by placeholders for whole arrays (products become Hadamard products).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import sympy as sp
from sympy.printing.latex import LatexPrinter

from ..backprop import Derivation
from ..derive import radix
from ..graph import Node

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

# ----------------------------------------------------------------------------------------
# Names: one table from tensor names to LaTeX.

def _esc(name: str) -> str:
    return name.replace("_", r"\_")


def _rm(name: str) -> str:
    return rf"\mathrm{{{_esc(name)}}}"


def _opname(name: str) -> str:
    return rf"\operatorname{{{name}}}" if "_" not in name else _rm(name)


ERROR = r"\varepsilon"  # the error signal dL/dz (never delta: that is Kronecker's)


@dataclass(frozen=True)
class _Sym:
    letter: str          # "z", "W", r"\varepsilon" or a word printed upright
    layer: str = ""      # r"\mathrm{fc1}": the layer, as a subscript
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
        out = bold + (f"_{{{self.layer}}}" if self.layer else "")
        return out + (r"^{\top}" if transpose else "")

    def element(self, sub: str) -> str:
        parts = [p for p in (self.layer, sub) if p]
        return self.base() + (f"_{{{','.join(parts)}}}" if parts else "")


# Letters for ops by their label: embedding rows e, the positions 0..T-1 they follow p.
_LABEL_LETTERS = {"embedding": "e", "position_embedding": "e", "positions": "p"}
_PARAM_LETTERS = {"weight": "W", "bias": "b", "scale": r"\gamma", "gamma": r"\gamma",
                  "gain": r"\gamma", "shift": r"\beta", "beta": r"\beta",
                  "lora_A": "A", "lora_B": "B"}


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
        layer = _rm(node.layer)
        if node.role == "mask":
            return _Sym("m", layer)
        if node.role == "param":
            role = (node.param or node.name).rsplit(".", 1)[-1]
            letter = _PARAM_LETTERS.get(role)
            return _Sym(letter, layer) if letter else _Sym(role, layer, True)
        if node.name == graph.loss:
            return _Sym("L")
        symbol = node.meta.get("symbol")  # a term of a composite loss: L_1, R
        if isinstance(symbol, tuple):
            return _Sym(*symbol)
        if node.label == "lora_down":  # a low-rank adapter's u = (alpha/r) x A^T
            return _Sym("u", layer)
        if node.label == "lora_base":  # the frozen map z0 = x W^T + b beside the adapter
            return _Sym("z^{0}", layer)
        if node.kind == "contraction":
            return _Sym("z", layer)
        if node.name == graph.prediction and node.kind == "map":
            return _Sym("y")
        if node.label in _LABEL_LETTERS:
            return _Sym(_LABEL_LETTERS[node.label], layer)
        if node.kind == "map":
            return _Sym("h", layer)
        for other in graph.nodes:
            if node.name.startswith(other + "_") and other != node.name:
                owner = graph.nodes[other]
                return _Sym(node.name[len(other) + 1:], _rm(owner.layer), True)
        return _Sym(node.name, "", True)

    def has(self, name: str) -> bool:
        return name in self.syms or self.adjoint_of(name) is not None

    def adjoint_of(self, name: str) -> str | None:
        if name.startswith("d_") and name[2:] in self.syms:
            return name[2:]
        return None

    def is_error(self, node: str) -> bool:
        """Adjoints of contractions (the pre-activations z) print as the error epsilon."""
        found = self.graph.nodes[node]
        return (found.kind == "contraction" and node != self.graph.loss
                and found.label not in ("lora_down", "lora_base"))

    def error_symbol(self) -> str:
        return rf"\boldsymbol{{{ERROR}}}"

    def error(self, node: str) -> _Sym:
        sym = self.syms[node]
        return _Sym(ERROR, sym.layer) if not sym.word else _Sym(ERROR, _rm(node))

    def array(self, name: str, transpose: bool = False) -> str:
        of = self.adjoint_of(name)
        if of is None:
            return self.syms[name].array(transpose)
        if of == self.graph.loss:
            return "1"
        if self.is_error(of):
            return self.error(of).array(transpose)
        frac = rf"\frac{{\partial L}}{{\partial {self.syms[of].array()}}}"
        return rf"\left({frac}\right)^{{\top}}" if transpose else frac

    def element(self, name: str, sub: str) -> str:
        of = self.adjoint_of(name)
        if of is None:
            return self.syms[name].element(sub)
        if of == self.graph.loss:
            return "1"
        if self.is_error(of):
            return self.error(of).element(sub)
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

_BATCH_LETTERS = ("n", "m")
_LETTERS = ("i", "j", "k", "l", "p", "q", "r", "s", "u", "v")
_INDEX_SYMBOLS: dict[tuple[str, int], sp.Symbol] = {}


def cases(show: Callable[[sp.Basic], str],
          pairs: Iterable[tuple[sp.Basic, sp.Basic]]) -> str:
    """Values and their conditions as a LaTeX ``cases`` block, each value printed by
    ``show``; a condition that is always true reads "otherwise"."""
    rows = [f"{show(value)} & " + (r"\text{otherwise}" if cond == sp.true
                                   else rf"\text{{if }} {show(cond)}")
            for value, cond in pairs]
    return r"\begin{cases} " + r" \\ ".join(rows) + r" \end{cases}"


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
    """Letters for the index symbols of one equation, by the document's one convention:
    batch axes n, m; every other index i, j, k, l, ... in order of appearance, the
    left-hand side's indices (``first``) before the summed ones."""
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
        pool = _BATCH_LETTERS if batch else _LETTERS
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
        const, rest = i.as_coeff_Add()
        terms = radix.parse_index(rest) if const.is_Integer else None
        if terms is not None:
            return self._affine_index(terms, int(const))
        return self._print(i)

    def _affine_index(self, terms: list[tuple[sp.Expr, radix.Digit]], const: int = 0) -> str:
        r"""An affine index in the derivation's 1-based notation: the 0-based digit sum
        ``8*i2 + i3`` (a reshape) reads ``8(i-1) + j``; ``floor(i/8)``, ``Mod(i, 8)`` read
        ``\lfloor (i-1)/8 \rfloor + 1`` and ``(i-1) \bmod 8 + 1``; a convolution's
        padded window ``i2 + s1 - 1`` reads ``j + p - 2``."""
        parts: list[str] = []
        offset = const + 1  # the 1-based index is the 0-based one plus 1
        for coef, digit in sorted(terms, key=lambda t: -int(t[0]) if t[0].is_Integer else 0):
            letter = self.index(digit.var)
            plain = digit.lo == 1 and digit.size is None
            if plain and coef == 1:
                parts.append(letter)  # a 1-based letter is the 0-based index plus 1
                offset -= 1
                continue
            value = f"{letter}-1"
            if digit.lo != 1:
                value = rf"\left\lfloor ({value})/{self._print(digit.lo)} \right\rfloor"
            if digit.size is not None:
                value = rf"{value if digit.lo != 1 else f'({value})'} \bmod " \
                        rf"{self._print(digit.size)}"
            if coef != 1:
                value = rf"{self._print(coef)}\,({value})" if digit.lo == 1 or \
                    digit.size is not None else rf"{self._print(coef)}{value}"
            parts.append(value)
        text = " + ".join(parts)
        return text + (f" + {offset}" if offset > 0 else f" - {-offset}" if offset < 0 else "")

    def sub(self, indices: Sequence[sp.Expr]) -> str:
        parts = [self.index(i) for i in indices]
        # single letters run together (W_{ij}); a number after a letter needs the commas
        # (W_{k,1}: W_{k1} would read as k_1)
        plain = all(len(p) == 1 for p in parts) and not any(
            b.isdigit() and a.isalpha() for a, b in zip(parts, parts[1:], strict=False))
        return "".join(parts) if plain else ",".join(parts)

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

    def _print_MaxOver(self, expr: sp.Expr) -> str:
        over = ", ".join(self.index(var) for var, _, _ in expr.limits)
        return rf"\max_{{{over}}} \left({self._print(expr.function)}\right)"

    def _print_ArgMaxOver(self, expr: sp.Expr) -> str:
        over = ", ".join(self.index(var) for var, _, _ in expr.limits)
        return rf"\operatorname{{argmax}}_{{{over}}} \left({self._print(expr.function)}\right)"

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

    def _print_Equality(self, expr: sp.Expr) -> str:
        lhs, rhs = expr.args
        if isinstance(rhs, sp.Indexed) and not lhs.atoms(sp.Indexed):
            lhs, rhs = rhs, lhs
        if (isinstance(lhs, sp.Indexed) and not rhs.atoms(sp.Indexed)
                and rhs.free_symbols and all(s in self.letters for s in rhs.free_symbols)):
            # an array of positions against the position an index expression names (a
            # max pooling's arg-max): the position counted from 1, as every index here
            return f"{self._print(lhs)} = {self.index(rhs)}"
        return self._print_Relational(expr)

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        return cases(self._print, expr.args)

    def _print_Select(self, expr: sp.Expr, exp: object = None) -> str:
        cond, a, b = expr.args
        return cases(self._print, [(a, cond), (b, sp.true)])

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
        head = "" if c == 1 else self._print(c)
        # A thin space after a leading fraction: 2/N y must not read as one symbol.
        head += r" \, " if head.startswith(r"\frac") else " " if head else ""
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
        if expr in self.verbatim and self.verbatim[expr].startswith((r"\boldsymbol{\varepsilon}",
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


