"""sympy printers for the scalar bodies of generated numpy and torch code.

The printers are strict: a sympy object without a print rule fails loudly instead of
emitting something wrong. Scalar primitives (sigmoid, softplus, expm1, erf, ...) print as
their records in ``derive/functions.py`` say, in one dispatch in ``_Common._print``;
logsumexp is max-shifted. Numeric constants print as Python float literals, so a float32
tensor stays float32 (numpy and torch treat a Python float as a weak scalar). Array
operations (products, reductions, views) are printed by :mod:`.arrays` from the IR.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.numpy import NumPyPrinter

from ..derive.functions import BY_CLASS


class _Common:
    """Printing rules shared by both backends (mixed into each printer)."""

    helpers: set[str]
    scalars: frozenset[str] = frozenset()  # names of 0-d arrays (the loss seed)
    like: str = ""  # a float array: the dtype of numbers chosen by integers alone
    integer_reads: frozenset[str] = frozenset()  # the body's reads of integer arrays
    booleans: frozenset[str] = frozenset()  # the body's reads of comparisons (masks)

    def _is_scalar(self, expr: sp.Expr) -> bool:
        return all(s.is_integer or s.name in self.scalars for s in expr.free_symbols)

    def _derivative_call(self, op: str, grad: str, y: str) -> str:
        raise NotImplementedError

    def _print_TanhBackward(self, expr: sp.Expr) -> str:
        grad, y = expr.args
        return self._derivative_call("tanh_backward", self._print(grad), self._print(y))

    def _print_SigmoidBackward(self, expr: sp.Expr) -> str:
        grad, y = expr.args
        return self._derivative_call("sigmoid_backward", self._print(grad), self._print(y))

    def _print_ReluBackward(self, expr: sp.Expr) -> str:
        grad, x = expr.args
        return self._relu_backward(self._print(grad), self._print(x))

    def _relu_backward(self, grad: str, x: str) -> str:
        raise NotImplementedError

    def _print_GeluTanh(self, expr: sp.Expr) -> str:
        return self._gelu_call(self._print(expr.args[0]))

    def _print_GeluTanhBackward(self, expr: sp.Expr) -> str:
        grad, z = expr.args
        return self._gelu_call(self._print(z), self._print(grad))

    def _gelu_call(self, z: str, grad: str | None = None) -> str:
        raise NotImplementedError

    def _print_Mul(self, expr: sp.Mul) -> str:
        # Scalar factors first and together: (2*d_loss/N)*y*(y - t) costs one pass over
        # the arrays for the scalar, not one per scalar factor.
        scalar = [f for f in expr.args if self._is_scalar(f)]
        array = [f for f in expr.args if not self._is_scalar(f)]
        plain = sp.printing.str.StrPrinter._print_Mul
        if len(scalar) < 2 and not any(f.is_Pow and f.exp.is_negative for f in scalar):
            return plain(self, expr)  # type: ignore[arg-type]
        if not array:
            return plain(self, expr)  # type: ignore[arg-type]
        coeff = sp.Mul(*scalar)
        rest = sp.Mul(*array)
        rest_text = self.parenthesize(rest, 50)  # type: ignore[attr-defined]
        if coeff == -1:
            return f"-{rest_text}"
        coeff_text = self.parenthesize(coeff, 50)  # type: ignore[attr-defined]
        return f"{coeff_text}*{rest_text}"

    def _print(self, expr: object, **kwargs: object) -> str:  # type: ignore[override]
        if isinstance(expr, sp.Basic) and expr.is_number and not expr.is_Integer:
            try:
                value = float(expr)  # type: ignore[arg-type]
            except TypeError:  # softplus(0): evaluate through its rewrite, else print the call
                try:
                    value = float(expr.rewrite(sp.exp).rewrite(sp.log))  # type: ignore[arg-type]
                except TypeError:
                    return super()._print(expr, **kwargs)  # type: ignore[misc]
            if value != value:
                return f"{self._module}.nan"  # type: ignore[attr-defined]
            if value in (float("inf"), float("-inf")):
                # repr(inf) is the bare name inf, a NameError in the generated module.
                text = f"{self._module}.inf"  # type: ignore[attr-defined]
                return text if value > 0 else f"(-{text})"
            return repr(value) if value >= 0 else f"({value!r})"
        primitive = BY_CLASS.get(type(expr))
        if primitive is not None:
            # A scalar primitive prints as its record says (derive/functions.py).
            call, helpers = primitive.code(self._module)  # type: ignore[attr-defined]
            self.helpers.update(helpers)
            return call.format(*(self._print(a) for a in expr.args))  # type: ignore[union-attr]
        return super()._print(expr, **kwargs)  # type: ignore[misc]

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        return expr.name

    def _print_And(self, expr: sp.And) -> str:
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr: sp.Or) -> str:
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr: sp.Not) -> str:
        return f"(~{self._print(expr.args[0])})"

    def _print_ITE(self, expr: sp.Expr) -> str:
        cond, a, b = expr.args
        return self._print(sp.Or(sp.And(cond, a), sp.And(sp.Not(cond), b)))

    def _print_BooleanTrue(self, expr: sp.Expr) -> str:
        return "True"

    def _print_BooleanFalse(self, expr: sp.Expr) -> str:
        return "False"

    def _print_Relational(self, expr: sp.Relational) -> str:
        lhs = self._print(expr.lhs)
        rhs = self._print(expr.rhs)
        return f"({lhs} {expr.rel_op} {rhs})"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exp = expr.args
        b = self.parenthesize(base, 60)  # type: ignore[attr-defined]
        if exp == -1:
            return f"1/{b}"
        if exp.is_Integer and exp < 0:
            return f"1/{b}**{-int(exp)}"
        if exp.is_Integer:
            return f"{b}**{int(exp)}"
        if exp == sp.Rational(1, 2):
            return f"{self._module}.sqrt({self._print(base)})"  # type: ignore[attr-defined]
        return f"{b}**{self.parenthesize(exp, 60)}"  # type: ignore[attr-defined]

    # Boolean temporaries of the function being printed ({"tmp0": h2_z > 0}), so that a
    # where() on a shared mask can still be printed NaN-preserving.
    conditions: dict[str, sp.Expr] = {}

    def _branch(self, value: sp.Expr, region: sp.Expr) -> sp.Expr:
        """What a where() branch computes, given where it is taken (``region``): the
        value itself; torch reads its arrays through _taken (see there)."""
        return value

    def _nan_preserving(self, value: sp.Expr, cond: sp.Expr, last: sp.Expr,
                        region: sp.Expr = sp.true) -> str | None:
        """``where(z > 0, z, 0)`` maps a NaN z to 0 (NaN > 0 is false), where torch's relu
        gives NaN. With a constant fallback, print the negated test instead:
        ``where(z <= 0, 0, z)`` is NaN for a NaN z and equal everywhere else; relu itself
        is ``maximum(z, 0)`` (torch: ``relu``), which propagates NaN and is one pass."""
        if not last.is_number or value.is_number:
            return None
        if isinstance(cond, sp.Symbol) and cond.name in self.conditions:
            cond = self.conditions[cond.name]
        negate = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}
        if not isinstance(cond, sp.core.relational.Relational) or cond.rel_op not in negate:
            return None
        arrays = {s for s in cond.free_symbols if not s.is_integer}
        if not arrays or not arrays <= value.free_symbols:
            return None  # the test reads an array this statement does not: keep the mask
        if cond.rel_op in (">", ">=") and value == cond.lhs and last == cond.rhs == 0:
            return self._relu(self._print(value))
        test = f"({self._print(cond.lhs)} {negate[cond.rel_op]} {self._print(cond.rhs)})"
        return self._where(test, self._print(last), self._print(self._branch(value, region)),
                           _may_warn(value))

    def _where(self, cond: str, then: str, otherwise: str, may_warn: bool) -> str:
        return f"{self._module}.where({cond}, {then}, {otherwise})"  # type: ignore[attr-defined]

    def _relu(self, text: str) -> str:
        raise NotImplementedError

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        *cases, (last, cond) = expr.args
        if cond != sp.true:
            raise NotImplementedError("a Piecewise needs a final 'otherwise' branch")
        # Branches that are plain numbers would make where() return the default float
        # type; give them the dtype (and device) of an array the condition reads, or,
        # where it reads integers alone (a one-hot of indices), of the model's float
        # arrays (``like``: an input or parameter, an argument of every function, so
        # alive wherever it is read although no op lists it).
        # A boolean mask the condition reads (a comparison stored on its own) has no
        # float dtype to lend: numpy.bool_(-1) and torch's bool new_tensor(-1) are True.
        arrays = [s for s in expr.free_symbols
                  if not s.is_integer and s.name not in self.booleans]
        numeric = not any(v.free_symbols - {s for s in v.free_symbols if s.is_integer}
                          for v, _ in expr.args)
        integers = any(s.name in self.integer_reads or s.name in self.booleans
                       for s in expr.free_symbols)
        like = (sorted(a.name for a in arrays)[0] if arrays
                else self.like if integers else None) if numeric else None

        # where each branch is taken: its condition and none before it
        conditions = [c for _, c in cases]
        regions = [sp.And(c, *(sp.Not(e) for e in conditions[:k]))
                   for k, c in enumerate(conditions)]
        regions.append(sp.And(*(sp.Not(e) for e in conditions)))

        def branch(value: sp.Expr, k: int) -> str:
            text = self._print(self._branch(value, regions[k]))
            return self._typed_scalar(like, text) if like else text

        code = None
        if cases:  # the innermost where() decides what a NaN maps to
            code = self._nan_preserving(cases[-1][0], cases[-1][1], last, regions[-2])
        if code is not None:
            cases = cases[:-1]
        else:
            code = branch(last, len(regions) - 1)
        for n, (value, condition) in enumerate(reversed(cases)):
            # The branch printed so far (``code``) is everything after this case.
            rest = expr.args[len(cases) - n:]
            may_warn = _may_warn(value) or any(_may_warn(v) for v, _ in rest)
            code = self._where(self._print(condition), branch(value, len(cases) - 1 - n),
                               code, may_warn)
        return code


# Functions whose numpy evaluation cannot warn for a finite argument (the stable
# primitives go through logaddexp; tanh, sin, cos and erf are bounded).
_QUIET_FUNCTIONS = frozenset({"Sigmoid", "Softplus", "tanh", "sin", "cos", "erf", "erfc",
                              "ClampMin"})


def _may_warn(expr: sp.Expr) -> bool:
    """Whether numpy may raise a RuntimeWarning evaluating ``expr`` on finite arrays:
    a log, exp, sqrt, ... or a division or a fractional power."""
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Function) and type(node).__name__ not in _QUIET_FUNCTIONS:
            return True
        if isinstance(node, sp.Pow) and not (node.exp.is_Integer and node.exp >= 0):
            return True
    return False


class NumpyCodePrinter(_Common, NumPyPrinter):
    _module = "numpy"

    def _where(self, cond: str, then: str, otherwise: str, may_warn: bool) -> str:
        # A branch that may warn (log of a negative number where the other branch is
        # taken) is evaluated with the warnings of the discarded entries silenced.
        if not may_warn:
            return f"numpy.where({cond}, {then}, {otherwise})"
        self.helpers.add("masked_where")
        return f"_masked_where({cond}, lambda: {then}, lambda: {otherwise})"

    def _typed_scalar(self, like: str, text: str) -> str:
        return f"{like}.dtype.type({text})"

    def _relu(self, text: str) -> str:
        return f"numpy.maximum({text}, 0)"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        # numpy's power ufunc calls pow() per element for any exponent but 2 (and a few
        # others): x**3 of 65536 float32 costs ~4 ms, x*x*x ~12 us (GPT-2's tanh GELU).
        base, exp = expr.args
        # (Positive powers only.) In brackets: the printer places a power where a
        # product may not stand bare, as the divisor of a/x**3 (a/x*x*x is a*x).
        if isinstance(base, sp.Symbol) and exp.is_Integer and 3 <= int(exp) <= 4:
            return "(" + "*".join([self._print(base)] * int(exp)) + ")"
        return super()._print_Pow(expr, rational)

    def __init__(self) -> None:
        super().__init__({"strict": True, "fully_qualified_modules": True})
        self.helpers = set()

    def _derivative_call(self, op: str, grad: str, y: str) -> str:
        self.helpers.add(op)
        return f"_{op}({grad}, {y})"

    def _relu_backward(self, grad: str, x: str) -> str:
        return f"numpy.where({x} > 0, {grad}, 0)"

    def _print_GeluTanh(self, expr: sp.Expr) -> str:
        # numpy's tanh is fast: the formula and sympy's derivative of it, as derived
        from ..ir.passes.gelu import expanded

        return self._print(expanded(expr))

    _print_GeluTanhBackward = _print_GeluTanh


class TorchCodePrinter(_Common, NumPyPrinter):
    """numpy's printing rules with torch's function names.

    (sympy's own ``sympy.printing.pytorch`` imports torch, which would cost seconds on
    every ``symbackprop generate``.)
    """

    _module = "torch"
    printmethod = "_torchcode"
    language = "Python with torch"
    _kf = {name: "torch." + path.split(".", 1)[1] for name, path in NumPyPrinter._kf.items()
           if path.split(".", 1)[1] in {"exp", "log", "sqrt", "sin", "cos", "tan", "tanh",
                                        "sinh", "cosh", "arcsin", "arccos", "arctan"}}
    _kc: dict[str, str] = {}

    def _typed_scalar(self, like: str, text: str) -> str:
        return f"{like}.new_tensor({text})"

    def _relu(self, text: str) -> str:
        return f"torch.relu({text})"

    def _branch(self, value: sp.Expr, region: sp.Expr) -> sp.Expr:
        # A branch that may be infinite or NaN where it is not taken (a fractional power
        # of a negative number, exp of a large one) reads each array through _taken:
        # where() sends the branch a gradient of 0 there, and 0 times an infinite
        # derivative is NaN; autograd (the functional loss, a second derivative of the
        # Model) then returned NaN where the result is finite.
        arrays = [s for s in value.free_symbols
                  if not s.is_integer and s.name not in self.booleans]
        if not _may_warn(value) or not arrays or region == sp.true:
            return value
        self.helpers.add("taken")
        mask = self._print(region)
        return value.xreplace({s: sp.Symbol(f"_taken({mask}, {s.name})") for s in arrays})

    def __init__(self) -> None:
        super().__init__({"strict": True, "fully_qualified_modules": True})
        self.helpers = set()

    def _derivative_call(self, op: str, grad: str, y: str) -> str:
        return f"torch.ops.aten.{op}({grad}, {y})"

    def _relu_backward(self, grad: str, x: str) -> str:
        return f"torch.ops.aten.threshold_backward({grad}, {x}, 0)"

    def _gelu_call(self, z: str, grad: str | None = None) -> str:
        # torch's own gelu kernels (autograd's pair), the same formula in one pass each
        if grad is None:
            return f'torch.nn.functional.gelu({z}, approximate="tanh")'
        return f'torch.ops.aten.gelu_backward({grad}, {z}, approximate="tanh")'

    def _print_Add(self, expr: sp.Add, order: object = None) -> str:
        return sp.printing.str.StrPrinter._print_Add(self, expr, order)  # type: ignore[arg-type]
