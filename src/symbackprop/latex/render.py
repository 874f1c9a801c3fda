"""Renderers: a document's blocks as Markdown, standalone LaTeX, offline HTML, a fragment.

- Markdown: ``$...$`` inline, ``$$\\begin{aligned}...$$`` displays (GitHub, Jupyter).
- LaTeX: a standalone ``article`` that pdflatex compiles with amsmath alone.
- HTML: presentation MathML converted here (latex2mathml), so the page needs no
  script and no network. Chromium follows MathML Core, which ignores ``mathvariant``
  other than ``normal``: bold letters are written as the Unicode mathematical bold
  characters instead, so a bold matrix never looks like its plain entries (and the
  code's names of ``--program`` as the monospace ones). Each
  level-2 section is a ``<section>`` (the tests measure each one's height on screen).
- Fragment: one ``\\begin{array}{l}`` for ``IPython.display.Math`` and ``DERIVATIONS``.
"""

from __future__ import annotations

import html as _html
import re
import unicodedata
from collections.abc import Callable, Sequence

from .document import Block, Display, Heading, Para, Span
from .linebreak import break_rows
from .notation import _esc

# ----------------------------------------------------------------------------------------
# Markdown.


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


def _row(row: tuple[str, ...]) -> str:
    return " & ".join(row) if len(row) > 1 else f"& {row[0]}"


def _aligned(rows: Sequence[tuple[str, ...]]) -> str:
    return "\\begin{aligned}\n" + " \\\\\n".join(_row(r) for r in rows) + "\n\\end{aligned}"


def markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _spans_md(b.spans))
        elif isinstance(b, Para):
            out.append(_spans_md(b.spans))
        else:
            out.append("$$\n" + _aligned(b.rows) + "\n$$")
    return "\n\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------
# LaTeX.

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "_": r"\_", "^": r"\^{}",
                "#": r"\#", "$": r"\$", "%": r"\%", "&": r"\&", "~": r"\~{}"}


def _text_tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text).replace("—", "---")


def _spans_tex(spans: Sequence[Span]) -> str:
    return _join_spans(spans, lambda v: f"${v}$", lambda v: rf"\texttt{{{_text_tex(v)}}}",
                       _text_tex)


def tex(blocks: Sequence[Block], title: str) -> str:
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
            pairs = max(len(r) for r in b.rows) // 2
            rows = break_rows(b.rows, pairs)
            env = "align*" if pairs <= 1 else "alignat*"
            arg = "" if pairs <= 1 else f"{{{pairs}}}"
            # alignat puts no space between column pairs: a \qquad keeps them apart.
            lines = [_row(r) if pairs <= 1 else
                     " & ".join(c if n % 2 == 0 or n == len(r) - 1 else c + r" \qquad"
                                for n, c in enumerate(r)) if len(r) > 1 else f"& {r[0]}"
                     for r in rows]
            body.append(f"\\begin{{{env}}}{arg}\n" + " \\\\\n".join(lines)
                        + f"\n\\end{{{env}}}")
    head = [
        r"\documentclass[10pt]{article}",
        r"\usepackage[a4paper,landscape,margin=1.5cm]{geometry}",
        r"\usepackage{amsmath,amssymb}",
        r"\allowdisplaybreaks",
        r"\setlength{\parindent}{0pt}",
        r"\setlength{\parskip}{0.4em}",
        # Paragraphs of inline formulas (the notation) may stretch rather than overflow.
        r"\setlength{\emergencystretch}{3em}",
        # Compact headings and displays: the document is meant to be read in one sitting.
        r"\makeatletter",
        r"\renewcommand\section{\@startsection{section}{1}{0pt}{1.2ex plus .5ex}"
        r"{0.6ex}{\large\bfseries}}",
        r"\renewcommand\subsection{\@startsection{subsection}{2}{0pt}{1ex plus .5ex}"
        r"{0.4ex}{\normalsize\bfseries}}",
        r"\g@addto@macro\normalsize{\setlength\abovedisplayskip{4pt plus 2pt}"
        r"\setlength\belowdisplayskip{4pt plus 2pt}"
        r"\setlength\abovedisplayshortskip{2pt plus 2pt}"
        r"\setlength\belowdisplayshortskip{2pt plus 2pt}}",
        r"\makeatother",
        r"\begin{document}",
        rf"{{\LARGE\bfseries {_text_tex(title)}\par}}",
    ]
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n\n\\end{document}\n"


# ----------------------------------------------------------------------------------------
# One LaTeX math fragment.

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
    """Break a long paragraph after each "; " and ". " so no row of the fragment runs
    off (a math fragment does not wrap)."""
    lines: list[list[Span]] = [[]]
    for span in spans:
        if span.kind != "text" or not re.search(r"[;.] ", span.value):
            lines[-1].append(span)
            continue
        parts = re.split(r"(?<=[;.]) ", span.value)
        for n, part in enumerate(parts):
            lines[-1].append(Span("text", part))
            if n < len(parts) - 1:
                lines.append([])
    return [tuple(line) for line in lines if line]


def fragment(blocks: Sequence[Block]) -> str:
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


# ----------------------------------------------------------------------------------------
# HTML with MathML.

_BOLD_ITALIC = re.compile(r'<(mi|mn) mathvariant="bold-italic">(?:&#x([0-9A-Fa-f]+);|(\w))</\1>')
_BOLD = re.compile(r'<(mi|mn) mathvariant="bold">(?:&#x([0-9A-Fa-f]+);|(\w))</\1>')
_MONO = re.compile(r'<(mi|mn) mathvariant="monospace">(?:&#x([0-9A-Fa-f]+);|(\w))</\1>')


def _math_char(match: re.Match[str], style: str) -> str:
    """``<mi mathvariant=...>c</mi>`` as the Unicode mathematical character of that style
    (MATHEMATICAL BOLD ITALIC SMALL EPSILON); unchanged where Unicode has none."""
    tag = match.group(1)
    char = chr(int(match.group(2), 16)) if match.group(2) else match.group(3)
    name = unicodedata.name(char, "")
    for prefix in ("GREEK ", "LATIN "):
        name = name.removeprefix(prefix)
    name = name.replace(" LETTER", "")
    try:
        styled = unicodedata.lookup(f"MATHEMATICAL {style} {name}")
    except KeyError:
        return match.group(0)
    return f"<{tag}>&#x{ord(styled):05X};</{tag}>"


_FENCE = re.compile(r'<mo stretchy="true" fence="true" form="(prefix|postfix)">')


def _tight_fences(mathml: str) -> str:
    """Brackets around flat content do not stretch: a stretched bracket is drawn from
    a larger glyph that stands apart from what it encloses. Brackets around a fraction,
    a big operator or a table still stretch to its height."""
    tall = re.compile(r"<mfrac|<munderover|<mtable|<munder|<mover")
    opened: list[int] = []
    flat: list[tuple[int, int]] = []
    for match in _FENCE.finditer(mathml):
        if match.group(1) == "prefix":
            opened.append(match.start())
        elif opened:
            start = opened.pop()
            if not tall.search(mathml, start, match.start()):
                flat.append((start, match.start()))
    cuts = sorted(p for pair in flat for p in pair)
    out, last = [], 0
    for pos in cuts:
        out.append(mathml[last:pos])
        out.append('<mo stretchy="false"')
        last = pos + len('<mo stretchy="true"')
    out.append(mathml[last:])
    return "".join(out)


def _mathml(latex: str, display: str) -> str:
    from latex2mathml.converter import convert

    # f'(x): the prime as a token right after f (latex2mathml reads ' as a superscript
    # of nothing; as a superscript of f it would be raised twice, away from the letter).
    out = convert(latex.replace("'", r"\prime "), display=display)
    out = _tight_fences(out)
    out = _BOLD_ITALIC.sub(lambda m: _math_char(m, "BOLD ITALIC"), out)
    out = _BOLD.sub(lambda m: _math_char(m, "BOLD"), out)
    out = _MONO.sub(lambda m: _math_char(m, "MONOSPACE"), out)  # the code's names
    bad = [m for m in ("<merror", "<mi>\\", "<mi>&</mi>", "<mo>\\") if m in out]
    if bad:  # pragma: no cover - a LaTeX construct the converter does not know
        raise RuntimeError(f"could not convert to MathML ({bad[0]}): {latex}")
    return out


def _spans_html(spans: Sequence[Span]) -> str:
    return _join_spans(spans, lambda v: _mathml(v, "inline"),
                       lambda v: f"<code>{_html.escape(v)}</code>", _html.escape)


_CSS = """
body { font-family: 'DejaVu Serif', 'Latin Modern Roman', serif; margin: 1.5em auto;
       max-width: 72em; padding: 0 1em; line-height: 1.4; color: #111; }
h1, h2, h3 { font-family: 'DejaVu Sans', sans-serif; }
h1 { font-size: 1.6em; margin: 0.3em 0; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; margin: 1.2em 0 0.4em; }
p { margin: 0.4em 0; }
code { font-size: 0.9em; background: #f3f3f3; padding: 0 0.2em; }
div.eq { overflow-x: auto; overflow-y: hidden; margin: 0.2em 0 0.2em 1.5em;
          padding: 0.2em 0; }
math { font-family: 'Latin Modern Math', 'STIX Two Math', 'DejaVu Math TeX Gyre', math; }
div.eq > math { display: inline math; math-style: normal; }
mtable { math-style: normal; }
mtd[columnalign="right"] { text-align: right; }
mtd[columnalign="left"] { text-align: left; }
mtd { padding: 0.2em 0.2em; }
mtd:nth-child(2n):not(:last-child) { padding-right: 2.5em; }
"""


def _display_html(b: Display) -> str:
    cells = max(len(r) for r in b.rows)
    cols = "l" if cells == 1 else "rl" * (cells // 2)
    lines = [" & ".join(r) if len(r) > 1 else (f"& {r[0]}" if cols != "l" else r[0])
             for r in b.rows]
    latex = rf"\begin{{array}}{{{cols}}} " + r" \\ ".join(lines) + r" \end{array}"
    # Column pairs are kept apart by the style sheet (mtd:nth-child(2n)).
    return _mathml(latex, "block")


def html(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    open_section = False
    for b in blocks:
        if isinstance(b, Heading):
            if b.level <= 2 and open_section:
                body.append("</section>")
                open_section = False
            if b.level == 2:
                body.append("<section>")
                open_section = True
            body.append(f"<h{b.level}>{_spans_html(b.spans)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_spans_html(b.spans)}</p>")
        else:
            body.append(f'<div class="eq">{_display_html(b)}</div>')
    if open_section:
        body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


__all__ = ["fragment", "html", "markdown", "tex"]
