"""The document model of a derivation: sections of headings, paragraphs and equations.

Nothing here knows an output format or a sympy printer: a :class:`Document` is a list of
sections, each a list of blocks (a heading, a paragraph of text / inline math / code
spans, or a display of aligned equations). The renderers in :mod:`.render` turn the
same blocks into Markdown, a standalone LaTeX document, an offline HTML page, or one
LaTeX math fragment (``DERIVATIONS`` in the generated modules, Jupyter's display).

Besides the text, a document keeps the sympy expressions it printed (forward bodies,
each adjoint as the backward section states it, each gradient line and, lazily, each
gradient unrolled into forward quantities) so tests can evaluate what was printed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import sympy as sp

from ..errors import UsageError

FORMATS = ("md", "tex", "html")


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
    """Equations, one row each. A row is ``(formula,)`` or pairs of cells
    ``(lhs, "= rhs", lhs2, "= rhs2", ...)``: every pair aligns at its ``=``."""

    rows: tuple[tuple[str, ...], ...]


Block = Heading | Para | Display


def spans(*parts: str | Span) -> tuple[Span, ...]:
    return tuple(p if isinstance(p, Span) else Span("text", p) for p in parts)


def math(latex: str) -> Span:
    return Span("math", latex)


def code(text: str) -> Span:
    return Span("code", text)


@dataclass
class GradientFormula:
    """One parameter's gradient in index notation, unrolled into forward quantities.

    ``expr`` reads only inputs, targets, parameters and forward tensors (whose bodies
    are ``Document.forward_bodies``); ``indices`` are its free index symbols, one per
    parameter axis. It is built on first use: the document prints it only for a
    parameter asked for with ``--param`` (unrolling every gradient of a deep network
    costs time quadratic in its depth).
    """

    param: str
    tensor: str
    indices: tuple[sp.Symbol, ...]
    unroll: Callable[[], sp.Expr] = field(repr=False, compare=False)

    @functools.cached_property
    def expr(self) -> sp.Expr:
        return self.unroll()


@dataclass
class Printed:
    """An adjoint or gradient exactly as the document prints it (its last form):
    ``tensor[indices] = expr``, reading forward tensors and the adjoints printed before."""

    tensor: str
    indices: tuple[sp.Symbol, ...]
    expr: sp.Expr


@dataclass
class Document:
    """A derivation: the forward pass once, the backward pass once, one line per
    gradient; the unrolled chain of a parameter only where asked for."""

    model: str
    source: str
    preamble: list[Block]
    notation: list[Block]
    forward: list[Block]
    backward: list[Block]
    gradient_intro: list[Block]
    params: dict[str, tuple[str, ...]]              # parameter -> its gradient row
    chains: dict[str, list[Block]] = field(default_factory=dict)
    expand: list[Block] = field(default_factory=list)
    program: list[Block] = field(default_factory=list)  # the generated statements
    gradients: dict[str, GradientFormula] = field(default_factory=dict)
    forward_bodies: dict[str, sp.Expr] = field(default_factory=dict)
    backward_steps: list[Printed] = field(default_factory=list)
    gradient_lines: dict[str, Printed] = field(default_factory=dict)

    def gradient_section(self) -> list[Block]:
        rows = tuple(self.params.values())
        return [*self.gradient_intro, *((Display(rows),) if rows else ())]

    def sections(self) -> list[list[Block]]:
        """The document's sections in order (the preamble first)."""
        out = [self.preamble, self.notation, self.forward, self.backward,
               self.gradient_section(), *self.chains.values(), self.program, self.expand]
        return [s for s in out if s]

    def blocks(self) -> list[Block]:
        return [b for section in self.sections() for b in section]

    def render(self, fmt: str) -> str:
        from . import render

        if fmt == "md":
            return render.markdown(self.blocks())
        if fmt == "tex":
            return render.tex(self.blocks(), self.title())
        if fmt == "html":
            return render.html(self.blocks(), self.title())
        raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")

    def markdown(self) -> str:
        return self.render("md")

    def tex(self) -> str:
        return self.render("tex")

    def html(self) -> str:
        return self.render("html")

    def title(self) -> str:
        return f"Backpropagation in {self.model}"

    def latex(self, param: str) -> str:
        """One parameter's gradient line (matrix and index form) as a LaTeX fragment;
        its symbols are those of :meth:`passes`."""
        from . import render

        if param not in self.params:
            raise UsageError(f"no derivation for {param!r} in this document")
        return render.fragment([Display((self.params[param],))])

    def passes(self) -> dict[str, str]:
        """The forward and the backward pass, each as one LaTeX fragment."""
        from . import render

        return {"forward": render.fragment([*self.notation, *self.forward]),
                "backward": render.fragment(self.backward)}

    def __str__(self) -> str:
        return self.markdown()

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def _repr_latex_(self) -> str:
        from . import render

        return "\n\n".join(f"$${render.fragment(s)}$$" for s in self.sections()[1:])


__all__ = ["FORMATS", "Block", "Display", "Document", "GradientFormula", "Heading", "Para",
           "Printed", "Span", "code", "math", "spans"]
