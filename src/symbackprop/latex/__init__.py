"""Derivations people can read: the chain rule of a network, printed from sympy.

The package turns a :class:`~symbackprop.backprop.Derivation` (the very sympy objects the
generated code is lowered from) into a document that reads like a textbook chapter: the
forward pass once, the backward pass once, layer by layer, and one line per gradient.

- :mod:`.document`: the backend-free document model (sections of headings, paragraphs,
  equation displays) and the expressions it printed;
- :mod:`.notation`: names, the index convention and the LaTeX printers;
- :mod:`.rewrite`: display rewrites (identities only);
- :mod:`.matrix`: matrix notation recognised by structure;
- :mod:`.builder`: Derivation -> Document;
- :mod:`.program`: the array IR -> the generated statements as equations (``--program``);
- :mod:`.render`: Markdown, standalone LaTeX, offline MathML HTML, LaTeX fragments.

Output depends only on the spec: the same spec gives byte-identical text.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..backprop import Derivation
from ..errors import UsageError
from ..spec import ModelSpec
from . import render
from .builder import EXPAND_MAX_ELEMENTS, EXPAND_MAX_PARAMS, UNROLL_MAX_NESTING, _Builder
from .document import (
    FORMATS,
    Block,
    Display,
    Document,
    GradientFormula,
    Heading,
    Para,
    Printed,
    Span,
)
from .notation import FnApply, FnPrime, Indicator, RowSoftmax, Select


def build(spec: ModelSpec, deriv: Derivation, label: str, *,
          params: Sequence[str] | None = None, expand: bool = False,
          program: bool = False) -> Document:
    """The derivation document of ``deriv`` (of ``spec``, read from ``label``).

    ``params``: print only these parameters' gradients, the part of the backward pass
    they need, and the full chain of each. ``expand``: add every scalar (small nets).
    ``program``: add the statements of the generated ``loss_and_grad``, printed from the
    array IR as the numpy and torch printers print them.
    """
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
    relevant = builder.relevant([by_param[n] for n in (trainable if expand else selected)])
    backward, steps = builder.backward_section(relevant)
    doc = Document(spec.name, label, builder.preamble(label), builder.notation(),
                   builder.forward_section(), backward, builder.gradient_intro(), {},
                   backward_steps=steps)
    for name in (selected if not expand else trainable):
        row, printed = builder.gradient_row(by_param[name])
        if name in selected:
            doc.params[name] = row
            if printed is not None:
                doc.gradient_lines[name] = printed
    if params is not None:
        doc.chains = {name: builder.chain_section(by_param[name]) for name in selected}
    if expand:
        doc.expand = builder.expand_section()
    if program:
        from ..ir.lower import gradient_statements
        from .program import section

        lowered, stmts = gradient_statements(deriv)
        doc.program = section(lowered, stmts, "loss_and_grad")
    doc.gradients = dict(builder.gradients)
    doc.forward_bodies = {n: deriv.graph.nodes[n].body for n in builder.forward_order}
    return doc


def derivations(spec: ModelSpec, deriv: Derivation, label: str
                ) -> tuple[dict[str, str], dict[str, str]]:
    """(the forward and backward passes, {parameter: its gradient line}) as LaTeX
    fragments: ``DERIVATION_PASSES`` and ``DERIVATIONS`` of a generated module."""
    doc = build(spec, deriv, label)
    return doc.passes(), {name: doc.latex(name) for name in doc.params}


_MODULE_CACHE: dict[tuple[str, str], tuple[list[dict[str, str]], list[dict[str, str]]]] = {}
_MODULE_CACHE_SIZE = 32


def module_derivations(spec: ModelSpec, deriv: Derivation, label: str
                       ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """For a generated module: (passes, per-parameter lines), each a list of
    ``{"name": ..., "literal": Python string literal}``.

    The passes (forward, backward) are written once and each parameter's entry is one
    line in their symbols, so the text grows linearly with depth. Deriving is
    deterministic, so the text is cached by the spec's sha256 and label: both backends
    of a spec (and every later compile of the same file) share one rendering.
    """
    key = (spec.sha256, label)
    if key not in _MODULE_CACHE:
        if len(_MODULE_CACHE) >= _MODULE_CACHE_SIZE:
            del _MODULE_CACHE[next(iter(_MODULE_CACHE))]
        passes, lines = derivations(spec, deriv, label)
        _MODULE_CACHE[key] = (
            [{"name": name, "literal": python_literal(text)} for name, text in passes.items()],
            [{"name": name, "literal": python_literal(text)} for name, text in lines.items()])
    return _MODULE_CACHE[key]


def python_literal(text: str, indent: str = "        ") -> str:
    """``text`` as a parenthesised Python string literal, one ``repr`` per line."""
    lines = text.splitlines(keepends=True)
    return "(\n" + "".join(f"{indent}{line!r}\n" for line in lines) + indent[:-4] + ")"


__all__ = ["EXPAND_MAX_ELEMENTS", "EXPAND_MAX_PARAMS", "FORMATS", "UNROLL_MAX_NESTING",
           "Block", "Display", "Document", "FnApply", "FnPrime", "GradientFormula",
           "Heading", "Indicator", "Para", "Printed", "RowSoftmax", "Select", "Span", "build",
           "derivations", "module_derivations", "python_literal", "render"]
