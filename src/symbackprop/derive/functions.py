"""Stable primitive functions as sympy ``Function`` classes.

Each class carries its own derivative (``fdiff``), its LaTeX form, and a name that the
emit printers map to a numerically stable implementation. Derivatives are written in
terms of the function's own value where that is stabler: sigma'(x) = sigma(x)(1 - sigma(x)).
"""

from __future__ import annotations

import sympy as sp


class Sigmoid(sp.Function):
    """sigma(x) = 1 / (1 + exp(-x)); sigma'(x) = sigma(x) (1 - sigma(x))."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        s = Sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return 1 / (1 + sp.exp(-x))

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: object = None) -> str:
        inner = rf"\sigma\left({printer._print(self.args[0])}\right)"
        return rf"{inner}^{{{exp}}}" if exp is not None else inner

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real


class Softplus(sp.Function):
    """softplus(x) = log(1 + exp(x)), computed as logaddexp(0, x); softplus' = sigma."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return Sigmoid(self.args[0])

    def _eval_rewrite_as_log(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return sp.log(1 + sp.exp(x))

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: object = None) -> str:
        inner = rf"\operatorname{{softplus}}\left({printer._print(self.args[0])}\right)"
        return rf"{inner}^{{{exp}}}" if exp is not None else inner

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real


class ClampMin(sp.Function):
    """max(x, c) for a constant floor c: keeps a denominator away from zero."""

    nargs = 2

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: object = None) -> str:
        inner = (rf"\max\left({printer._print(self.args[0])}, "
                 rf"{printer._print(self.args[1])}\right)")
        return rf"{inner}^{{{exp}}}" if exp is not None else inner


LOG_FLOOR = -100
DENOMINATOR_FLOOR = sp.Float("1e-12")


class ClampedLog(sp.Function):
    """max(log x, -100), the log torch's binary cross-entropy uses on probabilities.

    Its derivative keeps the denominator off zero as torch's backward does:
    d/dx = 1 / max(x, 1e-12), so a probability of exactly 0 or 1 gives a finite gradient.
    """

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return 1 / ClampMin(self.args[0], DENOMINATOR_FLOOR)

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: object = None) -> str:
        inner = rf"\log\left({printer._print(self.args[0])}\right)"
        return rf"{inner}^{{{exp}}}" if exp is not None else inner


STABLE_FUNCTIONS = (Sigmoid, Softplus, ClampedLog, ClampMin)
