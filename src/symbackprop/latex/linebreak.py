"""Breaking long displayed equations across lines of the LaTeX document.

A derivative such as GPT-2's tanh GELU's is wider than an A4 page. amsmath breaks
nothing by itself, so the LaTeX renderer cuts such a row here: at a ``+`` or ``-`` of a
sum (never inside a ``{...}`` group, where a line break would end the group), continuing
on the next row of the same ``align*`` after a ``\\quad``. A cut inside
``\\left( ... \\right)`` closes the open delimiters with ``\\right.`` before it and
reopens them with ``\\left.`` after it, so each row stays balanced.

Widths are estimated from the source, in points at 10 pt (glyph counts with fractions as
their wider part and scripts at 70 %): good enough to stay inside the page, since the
estimate errs on the wide side.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Text width of the document's page (A4 landscape, 1.5 cm margins) in points, less a margin
# for the error of the estimate.
PAGE_WIDTH_PT = 720.0

_GLYPH = 5.5  # an average italic letter or digit at 10 pt
_BINARY = 13.0  # + - with their medium spaces
_RELATION = 14.0  # = with its thick spaces
_COMMAND_WIDTH = {
    r"\left": 4.0, r"\right": 4.0, r"\,": 1.7, r"\;": 2.8, r"\quad": 10.0, r"\qquad": 20.0,
    r"\tanh": 4 * _GLYPH, r"\log": 3 * _GLYPH, r"\exp": 3 * _GLYPH, r"\sum": 10.0,
    r"\cdot": _BINARY, r"\odot": _BINARY, r"\times": _BINARY, r"\in": _RELATION,
    r"\geq": _RELATION, r"\leq": _RELATION, r"\bmod": 4 * _GLYPH,
}
# Commands whose argument is what shows (a font or an accent).
_TRANSPARENT = {r"\mathrm", r"\mathbf", r"\mathbb", r"\operatorname", r"\text", r"\hat",
                r"\boldsymbol", r"\mathit", r"\mathtt"}
_TOKEN = re.compile(r"\\[a-zA-Z]+|\\.|[{}_^&]|\s+|.", re.S)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _group(tokens: list[str], start: int) -> int:
    """The index just past the argument that begins at ``tokens[start]``."""
    if tokens[start] != "{":
        return start + 1
    depth = 0
    for k in range(start, len(tokens)):
        depth += {"{": 1, "}": -1}.get(tokens[k], 0)
        if depth == 0:
            return k + 1
    return len(tokens)


def _width(tokens: list[str], start: int = 0, stop: int | None = None) -> float:
    """Estimated width in points of ``tokens[start:stop]``."""
    stop = len(tokens) if stop is None else stop
    total = 0.0
    k = start
    while k < stop:
        tok = tokens[k]
        if tok in ("{", "}") or tok.isspace() or tok == "&":
            k += 1
        elif tok in ("_", "^"):
            end = _group(tokens, k + 1)
            total += 0.7 * _width(tokens, k + 1, end)
            k = end
        elif tok in (r"\frac", r"\tfrac", r"\dfrac"):
            num_end = _group(tokens, k + 1)
            den_end = _group(tokens, num_end)
            total += max(_width(tokens, k + 1, num_end), _width(tokens, num_end, den_end)) + 2
            k = den_end
        elif tok == r"\sqrt":
            end = _group(tokens, k + 1)
            total += 8.0 + _width(tokens, k + 1, end)
            k = end
        elif tok in _TRANSPARENT:
            k += 1
        elif tok.startswith("\\"):
            total += _COMMAND_WIDTH.get(tok, _GLYPH if len(tok) > 2 else 2.0)
            k += 1
        elif tok in "+-":
            total += _BINARY
            k += 1
        elif tok in "=<>":
            total += _RELATION
            k += 1
        else:
            total += _GLYPH
            k += 1
    return total


def width(text: str) -> float:
    """Estimated width in points of a math-mode source string."""
    return _width(_tokens(text))


def _cuts(tokens: list[str]) -> list[tuple[int, int, bool]]:
    """(token index, open ``\\left`` count, is a product) of each place a row may be cut,
    outside every ``{...}`` group and environment: a ``+`` or ``-`` that follows a term
    (not a sign), or
    the juxtaposition of two parenthesised factors (``\\right) \\left(``)."""
    cuts = []
    braces = lefts = 0
    previous: list[str] = ["", ""]
    for k, tok in enumerate(tokens):
        if tok == "{":
            braces += 1
        elif tok == "}":
            braces -= 1
        elif tok == r"\begin":  # an environment (cases) has its own & and \\: no cut inside
            braces += 1
        elif tok == r"\end":
            braces -= 1
        elif tok == r"\left":
            if braces == 0 and previous == [r"\right", ")"]:
                cuts.append((k, lefts, True))
            lefts += 1
        elif tok == r"\right":
            lefts -= 1
        elif tok in "+-" and braces == 0 and previous[1] not in ("", "=", "(", "[", "+", "-",
                                                                  r"\left", "&"):
            cuts.append((k, lefts, False))
        if not tok.isspace():
            previous = [previous[1], tok]
    return cuts


def break_cell(cell: str, room: float) -> list[str]:
    """``cell`` (the right-hand side of an aligned row) as one or more pieces, each at most
    ``room`` points wide where the cuts allow; pieces after the first begin with ``\\quad``."""
    tokens = _tokens(cell)
    if _width(tokens) <= room:
        return [cell]
    pieces: list[str] = []
    start, lefts_open = 0, 0
    waiting: list[tuple[int, int, bool]] = []  # cuts since ``start``
    for k, lefts, product in [*_cuts(tokens), (len(tokens), 0, False)]:
        indent = 10.0 if pieces else 0.0
        if waiting and indent + _width(tokens, start, k) > room:
            start, lefts_open = _cut(tokens, start, lefts_open,
                                     _best(tokens, start, waiting, room - indent), pieces)
            waiting = [c for c in waiting if c[0] > start]
        waiting.append((k, lefts, product))
    pieces.append(_piece(tokens, start, len(tokens), lefts_open, 0))
    return pieces


def _best(tokens: list[str], start: int, waiting: list[tuple[int, int, bool]],
          room: float) -> tuple[int, int, bool]:
    """The cut to take: the shallowest in ``\\left`` nesting (a break in the outer sum
    reads better than one inside a factor), a sum's before a product's, among those that
    fill at least half the line and fit it, the latest of those; else the first."""
    fitting = [c for c in waiting if _width(tokens, start, c[0]) <= room] or waiting[:1]
    full = [c for c in fitting if _width(tokens, start, c[0]) >= room / 2] or fitting[-1:]
    rank = min(c[1:] for c in full)
    return [c for c in full if c[1:] == rank][-1]


def _cut(tokens: list[str], start: int, lefts_open: int, at: tuple[int, int, bool],
         pieces: list[str]) -> tuple[int, int]:
    k, lefts, _ = at
    pieces.append(_piece(tokens, start, k, lefts_open, lefts))
    return k, lefts


def _piece(tokens: list[str], start: int, stop: int, reopen: int, close: int) -> str:
    body = "".join(tokens[start:stop]).strip()
    # "{}" makes a leading sign binary, spaced as in the unbroken sum; a product cut
    # says so with a times sign.
    lead = "{} " if tokens[start] in "+-" else r"{} \times "
    head = r"\quad " + r"\left. " * reopen + lead if start else ""
    return head + body + r" \right." * close


def break_rows(rows: Sequence[tuple[str, ...]], pairs: int = 1,
               page: float = PAGE_WIDTH_PT) -> list[tuple[str, ...]]:
    """The rows of one display, each too-wide right-hand side cut into rows of its own (an
    empty left-hand side, so they line up after the relation sign).

    In an ``alignat`` of several column pairs (matrix form beside entries), a row that
    fills one pair only and is wider than that pair's other rows overlaps the empty
    columns to its right (``\\rlap``) instead of widening its column for every row."""
    lhs = max((width(r[0]) for r in rows if len(r) > 1), default=0.0)
    if pairs <= 1:
        out: list[tuple[str, ...]] = []
        for row in rows:
            pieces = break_cell(row[-1], page - lhs)
            out.append((*row[:-1], pieces[0]))
            out.extend((p,) for p in pieces[1:])
        return out
    # Room for the second column when the entry columns keep their width.
    right = max((width(r[2]) + width(r[3]) for r in rows if len(r) > 3), default=0.0)
    room = page - lhs - 20.0 - right
    if max(width(r[1]) for r in rows if len(r) > 1) <= room:
        return list(rows)
    out = []
    for row in rows:
        if len(row) != 2 or width(row[1]) <= room:
            out.append(row)
            continue
        pieces = [rf"\rlap{{$\displaystyle{{}} {p}$}}"
                  for p in break_cell(row[1], page - lhs)]
        out.append((row[0], pieces[0]))
        out.extend((p,) for p in pieces[1:])
    return out
