"""Scalar primitives: one :class:`Primitive` record per function, read everywhere else.

A record is all the compiler knows about one scalar function (sigmoid, softplus, expm1,
log1p, tanh, erf, ...):

- ``func``: the sympy function class (sympy's own for exp, log, tanh, erf, ...; a class
  defined here for the stable primitives sympy lacks);
- ``definition``: the function in elementary sympy terms, which the tests differentiate;
- ``derivative``: f'(x) as a function of the argument ``x`` *and the output* ``y = f(x)``,
  as JAX's ``defjvp2`` states it, so a derivative reuses the forward value where that is
  cheaper or stabler: sigma' = y (1 - y), tanh' = 1 - y^2, exp' = y. For the classes
  defined here it is their ``fdiff``; for sympy's own it is a declaration the tests check
  against sympy's ``diff``;
- ``numpy`` / ``torch``: how each backend prints a call (``{0}``, ``{1}`` are the printed
  arguments) and which module helpers that call needs; ``latex``: the operator's LaTeX;
- ``oracle``: the same function in torch ops, for the independent autograd model of a
  formula; ``reference``: an mpmath definition for the extreme-value tests;
- ``rewrites``: the stable rewrites that introduce the function, each keyed by the head
  of the expression it rewrites (``derive.stable`` applies them, one visit per node).

Adding a primitive is one record here: the printers, the formula whitelist, the LaTeX
printer, the formula oracle, the stable rewrites and the tests all read :data:`PRIMITIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import sympy as sp
from mpmath.libmp import prec_to_dps
from sympy.core.function import ArgumentIndexError

LOG_FLOOR = -100
DENOMINATOR_FLOOR = sp.Float("1e-12")


@dataclass(frozen=True)
class Rewrite:
    """A stable rewrite of an expression whose head is ``head``.

    ``match`` looks only at that one node (its arguments are already rewritten) and
    returns the replacement, or None. ``name`` is the one line of mathematics that
    ``--explain`` prints; ``why`` says what the original form gets wrong.
    """

    head: type
    name: str
    match: Callable[[sp.Expr], sp.Expr | None]
    why: str


@dataclass(frozen=True)
class Primitive:
    """One scalar function: see the module docstring for each field."""

    name: str
    func: type
    doc: str
    definition: Callable[..., sp.Expr]
    derivative: Callable[..., sp.Expr] | None
    numpy: str
    torch: str
    latex: str
    oracle: Callable[..., Any]
    reference: Callable[..., Any]
    numpy_helpers: tuple[str, ...] = ()
    torch_helpers: tuple[str, ...] = ()
    rewrites: tuple[Rewrite, ...] = ()
    formula: bool = True  # callable by name in formulas
    domain: Callable[[float], bool] = field(default=lambda x: True)  # for the tests
    arity: int = 1

    def code(self, backend: str) -> tuple[str, tuple[str, ...]]:
        """(call format, helpers the call needs) for ``backend`` ("numpy" or "torch")."""
        if backend == "numpy":
            return self.numpy, self.numpy_helpers
        return self.torch, self.torch_helpers


class Defined(sp.Function):
    """A sympy function whose derivative and printing come from its :class:`Primitive`."""

    record: ClassVar[Primitive]

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        rec = self.record
        if rec.derivative is None or argindex != 1 or rec.arity != 1:
            raise ArgumentIndexError(self, argindex)
        return rec.derivative(self.args[0], self)

    def _latex(self, printer: sp.printing.latex.LatexPrinter, exp: object = None) -> str:
        args = ", ".join(printer._print(a) for a in self.args)
        inner = rf"{self.record.latex}\left({args}\right)"
        return rf"{inner}^{{{exp}}}" if exp is not None else inner

    def _eval_evalf(self, prec: int) -> sp.Expr:
        # Numbers through the elementary definition (tests and sympy's own evalf).
        return self.record.definition(*self.args).evalf(prec_to_dps(prec))

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real if self.record.arity == 1 else None


class Sigmoid(Defined):
    """sigma(x) = 1 / (1 + exp(-x))."""

    nargs = 1

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return 1 / (1 + sp.exp(-x))


class Softplus(Defined):
    """softplus(x) = log(1 + exp(x)), computed as logaddexp(0, x)."""

    nargs = 1

    def _eval_rewrite_as_log(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return sp.log(1 + sp.exp(x))


class Expm1(Defined):
    """expm1(x) = exp(x) - 1, exact to the last digit near 0."""

    nargs = 1


class Log1p(Defined):
    """log1p(x) = log(1 + x), exact to the last digit near 0."""

    nargs = 1

    def _eval_is_real(self) -> bool | None:
        return None  # complex for x < -1


class ClampMin(Defined):
    """max(x, c) for a constant floor c: keeps a denominator away from zero."""

    nargs = 2

    def _eval_is_real(self) -> bool | None:
        return None


class ClampedLog(Defined):
    """max(log x, -100), the log torch's binary cross-entropy uses on probabilities."""

    nargs = 1

    def _eval_is_real(self) -> bool | None:
        return None


# -- matching helpers for the rewrites: each looks at one node ------------------------
def _one_plus(e: sp.Expr) -> sp.Expr | None:
    """u where e = 1 + u (a sum whose constant term is 1), else None."""
    if isinstance(e, sp.Add) and e.args[0] == 1:
        return sp.Add(*e.args[1:])
    return None


def _arg_of(e: sp.Expr | None, cls: type) -> sp.Expr | None:
    return e.args[0] if isinstance(e, cls) else None


def _sigmoid_of_pow(e: sp.Expr) -> sp.Expr | None:
    # 1 / (1 + exp(u)) = sigma(-u)
    if e.exp == -1:
        u = _arg_of(_one_plus(e.base), sp.exp)
        if u is not None:
            return Sigmoid(-u)
    return None


def _sigmoid_of_mul(e: sp.Expr) -> sp.Expr | None:
    # exp(u) / (1 + exp(u)): its denominator is rewritten first (children before parents),
    # so the product arrives as exp(u) * sigma(-u), which is sigma(u); left alone it is
    # inf * 0 for u > 709.
    factors = list(e.args)
    for f in factors:
        if isinstance(f, sp.exp):
            partner = Sigmoid(-f.args[0])
            if partner in factors:
                rest = [g for g in factors if g is not f and g != partner]
                return sp.Mul(Sigmoid(f.args[0]), *rest)
    return None


def _softplus_of_log(e: sp.Expr) -> sp.Expr | None:
    u = _arg_of(_one_plus(e.args[0]), sp.exp)
    return Softplus(u) if u is not None else None


def _log_sigmoid(e: sp.Expr) -> sp.Expr | None:
    u = _arg_of(e.args[0], Sigmoid)
    return -Softplus(-u) if u is not None else None


def _log_one_minus_sigmoid(e: sp.Expr) -> sp.Expr | None:
    rest = _one_plus(e.args[0])
    u = _arg_of(-rest, Sigmoid) if rest is not None else None
    return -Softplus(u) if u is not None else None


def _log_exp(e: sp.Expr) -> sp.Expr | None:
    return _arg_of(e.args[0], sp.exp)


def _exp_minus_softplus(e: sp.Expr) -> sp.Expr | None:
    u = _arg_of(-e.args[0], Softplus)
    return Sigmoid(-u) if u is not None else None


def _term_after_constant(e: sp.Expr, constant: int,
                         make: Callable[[sp.Expr], sp.Expr | None]) -> sp.Expr | None:
    """In a sum ``constant + t + rest``, the first term t with make(t) not None is folded
    with the constant: make(t) + rest."""
    if not (isinstance(e, sp.Add) and e.args[0] == constant):
        return None
    terms = e.args[1:]
    for n, term in enumerate(terms):
        new = make(term)
        if new is not None:
            return sp.Add(new, *terms[:n], *terms[n + 1:])
    return None


def _erfc_of_plus(e: sp.Expr) -> sp.Expr | None:
    # 1 + erf(u) = erfc(-u)
    return _term_after_constant(
        e, 1, lambda t: sp.erfc(-t.args[0]) if isinstance(t, sp.erf) else None)


def _erfc_of_minus(e: sp.Expr) -> sp.Expr | None:
    # 1 - erf(u) = erfc(u)
    return _term_after_constant(
        e, 1, lambda t: sp.erfc((-t).args[0]) if isinstance(-t, sp.erf) else None)


def _expm1_of_sum(e: sp.Expr) -> sp.Expr | None:
    # exp(u) - 1 = expm1(u)
    return _term_after_constant(e, -1,
                                lambda t: Expm1(t.args[0]) if isinstance(t, sp.exp) else None)


def _log1p_of_log(e: sp.Expr) -> sp.Expr | None:
    u = _one_plus(e.args[0])
    return Log1p(u) if u is not None else None


def _mp() -> Any:
    import mpmath

    return mpmath


def _positive(x: float) -> bool:
    return x > 0


# -- the records -------------------------------------------------------------------------
# Order matters where two rewrites share a head: they are tried in this order (log(1 +
# exp(a)) becomes softplus before the general log(1 + a) -> log1p(a) is tried).
PRIMITIVES: tuple[Primitive, ...] = (
    Primitive(
        "sigmoid", Sigmoid, "1 / (1 + e^-x)",
        definition=lambda x: 1 / (1 + sp.exp(-x)),
        derivative=lambda x, y: y * (1 - y),
        numpy="_sigmoid({0})", numpy_helpers=("sigmoid",), torch="torch.sigmoid({0})",
        latex=r"\sigma",
        oracle=lambda t, a: t.sigmoid(a),
        reference=lambda x: 1 / (1 + _mp().exp(-x)),
        rewrites=(
            Rewrite(sp.Pow, "1 / (1 + exp(-a)) -> sigmoid(a)", _sigmoid_of_pow,
                    "exp(-a) overflows for a < -709"),
            Rewrite(sp.Mul, "exp(a) / (1 + exp(a)) -> sigmoid(a)", _sigmoid_of_mul,
                    "inf / inf for a > 709"),
            Rewrite(sp.exp, "exp(-softplus(a)) -> sigmoid(-a)", _exp_minus_softplus,
                    "one primitive instead of two"),
        )),
    Primitive(
        "softplus", Softplus, "log(1 + e^x)",
        definition=lambda x: sp.log(1 + sp.exp(x)),
        derivative=lambda x, y: Sigmoid(x),
        numpy="numpy.logaddexp(0.0, {0})", torch="_softplus({0})",
        torch_helpers=("softplus",),
        latex=r"\operatorname{softplus}",
        oracle=lambda t, a: t.logaddexp(a, t.zeros_like(a)),
        reference=lambda x: _mp().log(1 + _mp().exp(x)),
        rewrites=(
            Rewrite(sp.log, "log(1 + exp(a)) -> softplus(a)", _softplus_of_log,
                    "exp overflows for a > 709; logaddexp(0, a) does not"),
            Rewrite(sp.log, "log(sigmoid(a)) -> -softplus(-a)", _log_sigmoid,
                    "sigmoid underflows to 0 for a < -745 and log(0) = -inf"),
            Rewrite(sp.log, "log(1 - sigmoid(a)) -> -softplus(a)", _log_one_minus_sigmoid,
                    "1 - sigmoid(a) rounds to 0 for a > 37"),
            Rewrite(ClampedLog, "clamped log(sigmoid(a)) -> -softplus(-a)", _log_sigmoid,
                    "exact where the clamp at -100 would cut the value"),
            Rewrite(ClampedLog, "clamped log(1 - sigmoid(a)) -> -softplus(a)",
                    _log_one_minus_sigmoid,
                    "exact where the clamp at -100 would cut the value"),
        )),
    Primitive(
        "exp", sp.exp, "e^x",
        definition=sp.exp, derivative=lambda x, y: y,
        numpy="numpy.exp({0})", torch="torch.exp({0})", latex=r"\exp",
        oracle=lambda t, a: t.exp(a), reference=lambda x: _mp().exp(x)),
    Primitive(
        "log", sp.log, "natural logarithm",
        definition=sp.log, derivative=lambda x, y: 1 / x,
        numpy="numpy.log({0})", torch="torch.log({0})", latex=r"\log",
        oracle=lambda t, a: t.log(a), reference=lambda x: _mp().log(x), domain=_positive,
        rewrites=(Rewrite(sp.log, "log(exp(a)) -> a", _log_exp, "exp overflows"),)),
    Primitive(
        "expm1", Expm1, "e^x - 1, accurate near 0",
        definition=lambda x: sp.exp(x) - 1,
        # exp(x), not y + 1: for x < -37, y + 1 rounds to 0 where exp(x) does not.
        derivative=lambda x, y: sp.exp(x),
        numpy="numpy.expm1({0})", torch="torch.expm1({0})",
        latex=r"\operatorname{expm1}",
        oracle=lambda t, a: t.expm1(a), reference=lambda x: _mp().expm1(x),
        rewrites=(Rewrite(sp.Add, "exp(a) - 1 -> expm1(a)", _expm1_of_sum,
                          "exp(a) - 1 cancels to 0 for |a| < 1e-16"),)),
    Primitive(
        "log1p", Log1p, "log(1 + x), accurate near 0",
        definition=lambda x: sp.log(1 + x),
        derivative=lambda x, y: 1 / (1 + x),
        numpy="numpy.log1p({0})", torch="torch.log1p({0})",
        latex=r"\operatorname{log1p}",
        oracle=lambda t, a: t.log1p(a), reference=lambda x: _mp().log1p(x),
        domain=lambda x: x > -1,
        rewrites=(Rewrite(sp.log, "log(1 + a) -> log1p(a)", _log1p_of_log,
                          "1 + a rounds a away for |a| < 1e-16"),)),
    Primitive(
        "sin", sp.sin, "sine",
        definition=sp.sin, derivative=lambda x, y: sp.cos(x),
        numpy="numpy.sin({0})", torch="torch.sin({0})", latex=r"\sin",
        oracle=lambda t, a: t.sin(a), reference=lambda x: _mp().sin(x),
        domain=lambda x: abs(x) < 1e3),
    Primitive(
        "cos", sp.cos, "cosine",
        definition=sp.cos, derivative=lambda x, y: -sp.sin(x),
        numpy="numpy.cos({0})", torch="torch.cos({0})", latex=r"\cos",
        oracle=lambda t, a: t.cos(a), reference=lambda x: _mp().cos(x),
        domain=lambda x: abs(x) < 1e3),
    Primitive(
        "tanh", sp.tanh, "hyperbolic tangent",
        definition=lambda x: (sp.exp(x) - sp.exp(-x)) / (sp.exp(x) + sp.exp(-x)),
        derivative=lambda x, y: 1 - y**2,
        # torch's CPU tanh is several times slower than numpy's: the torch module's _tanh
        # takes numpy's kernel where nothing records or traces the call.
        numpy="numpy.tanh({0})", torch="_tanh({0})", torch_helpers=("tanh",), latex=r"\tanh",
        oracle=lambda t, a: t.tanh(a), reference=lambda x: _mp().tanh(x)),
    Primitive(
        "sinh", sp.sinh, "hyperbolic sine",
        definition=lambda x: (sp.exp(x) - sp.exp(-x)) / 2, derivative=lambda x, y: sp.cosh(x),
        numpy="numpy.sinh({0})", torch="torch.sinh({0})", latex=r"\sinh",
        oracle=lambda t, a: t.sinh(a), reference=lambda x: _mp().sinh(x)),
    Primitive(
        "cosh", sp.cosh, "hyperbolic cosine",
        definition=lambda x: (sp.exp(x) + sp.exp(-x)) / 2, derivative=lambda x, y: sp.sinh(x),
        numpy="numpy.cosh({0})", torch="torch.cosh({0})", latex=r"\cosh",
        oracle=lambda t, a: t.cosh(a), reference=lambda x: _mp().cosh(x)),
    Primitive(
        "erf", sp.erf, "error function",
        definition=sp.erf,
        derivative=lambda x, y: 2 / sp.sqrt(sp.pi) * sp.exp(-x**2),
        numpy="_erf({0})", numpy_helpers=("erf",), torch="torch.erf({0})",
        latex=r"\operatorname{erf}",
        oracle=lambda t, a: t.erf(a), reference=lambda x: _mp().erf(x)),
    Primitive(
        "erfc", sp.erfc, "complementary error function 1 - erf(x), accurate for large x",
        definition=lambda x: 1 - sp.erf(x),
        derivative=lambda x, y: -2 / sp.sqrt(sp.pi) * sp.exp(-x**2),
        numpy="_erfc({0})", numpy_helpers=("erfc",), torch="torch.erfc({0})",
        latex=r"\operatorname{erfc}",
        oracle=lambda t, a: t.erfc(a), reference=lambda x: _mp().erfc(x),
        rewrites=(Rewrite(sp.Add, "1 + erf(a) -> erfc(-a)", _erfc_of_plus,
                          "1 + erf(a) cancels catastrophically for a < -3"),
                  Rewrite(sp.Add, "1 - erf(a) -> erfc(a)", _erfc_of_minus,
                          "1 - erf(a) cancels catastrophically for a > 3"))),
    Primitive(
        "clamped_log", ClampedLog, "max(log x, -100), torch's binary cross-entropy log",
        definition=lambda x: sp.Max(sp.log(x), LOG_FLOOR),
        # torch's backward keeps the denominator off zero: a probability of exactly 0 or
        # 1 gives a finite gradient.
        derivative=lambda x, y: 1 / ClampMin(x, DENOMINATOR_FLOOR),
        numpy="numpy.maximum(numpy.log({0}), -100.0)",
        torch="torch.clamp(torch.log({0}), min=-100.0)",
        latex=r"\log",
        oracle=lambda t, a: t.clamp(t.log(a), min=-100.0),
        reference=lambda x: max(_mp().log(x), LOG_FLOOR),
        formula=False, domain=_positive),
    Primitive(
        "clamp_min", ClampMin, "max(x, c) for a constant floor c",
        definition=lambda x, c: sp.Max(x, c), derivative=None,
        numpy="numpy.maximum({0}, {1})", torch="torch.clamp({0}, min={1})",
        latex=r"\max",
        oracle=lambda t, a, c: t.clamp(a, min=c),
        reference=lambda x, c: max(x, c),
        formula=False, arity=2),
)

BY_NAME: Mapping[str, Primitive] = {p.name: p for p in PRIMITIVES}
BY_CLASS: Mapping[type, Primitive] = {p.func: p for p in PRIMITIVES}
for _record in PRIMITIVES:
    if issubclass(_record.func, Defined):
        _record.func.record = _record
del _record

STABLE_FUNCTIONS = tuple(p.func for p in PRIMITIVES if issubclass(p.func, Defined))
