"""The one error hierarchy of symbackprop, and the exit code each error maps to.

Every failure a user can cause derives from :class:`SymbackpropError`; the CLI catches
exactly this class, prints ``str(error)`` on one line and exits with ``error.exit_code``.
Anything else escaping is a bug in symbackprop and keeps its traceback.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``,
    ``\\ud800``): an error quotes spec text and file names, and must stay one line that
    cannot drive the terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1] if ch not in "\n\t\r" else repr(ch)[1:-1])
    return "".join(out)


class SymbackpropError(Exception):
    """Base of every error a user's input or environment can cause."""

    exit_code = 2


class UsageError(SymbackpropError):
    """Bad command-line usage (unknown backend, missing file, refused overwrite)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class SpecError(SymbackpropError):
    """A problem in a model spec, located as ``file:line:col: key.path: message``."""

    def __init__(
        self,
        message: str,
        *,
        file: str = "<spec>",
        line: int = 1,
        col: int = 1,
        path: str = "",
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.col = col
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return one_line(text)


class ShapeError(SpecError):
    """Tensor shapes that do not fit together (a spec error found by shape inference)."""


class GraphError(SpecError):
    """A malformed layer graph: a cycle, a missing or duplicate name."""


class FormulaError(SpecError):
    """A formula string that is not in the allowed grammar."""


class CheckFailed(SymbackpropError):
    """A gradient check found a mismatch (exit code 1)."""

    exit_code = 1


class DriftError(SymbackpropError):
    """``generate --check`` found files on disk that differ from the spec's output."""

    exit_code = 1
