"""The comments of generated code: each block names its layer and its index formula.

One compact index notation for generated code (``sum_{s0}(x[i0, s0]*W[i1, s0])``); the
LaTeX derivation has its own typeset notation.
"""

from __future__ import annotations

import sympy as sp

from ..backprop import Derivation, target_indices


class IndexPrinter(sp.printing.str.StrPrinter):
    """Compact one-line index notation: sum_{s0}(x[i0, s0]*W[i1, s0])."""

    def _print_Sum(self, expr: sp.Sum) -> str:
        over = ",".join(str(lim[0]) for lim in expr.limits)
        return f"sum_{{{over}}}({self._print(expr.function)})"

    def _print_MaxOver(self, expr: sp.Expr) -> str:
        over = ",".join(str(lim[0]) for lim in expr.limits)
        return f"max_{{{over}}}({self._print(expr.function)})"

    def _print_ArgMaxOver(self, expr: sp.Expr) -> str:
        over = ",".join(str(lim[0]) for lim in expr.limits)
        return f"argmax_{{{over}}}({self._print(expr.function)})"

    def _print_Equality(self, expr: sp.Expr) -> str:
        return f"{self._print(expr.lhs)} == {self._print(expr.rhs)}"

    def _print_KroneckerDelta(self, expr: sp.Expr) -> str:
        # a window's adjoint keeps these: 1 where the two indices are equal
        return f"[{self._print(expr.args[0])} == {self._print(expr.args[1])}]"

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        parts = [f"{self._print(e)} if {self._print(c)}" for e, c in expr.args[:-1]]
        parts.append(f"else {self._print(expr.args[-1][0])}")
        return "(" + " ".join(parts) + ")"

    def _print_Function(self, expr: sp.Function) -> str:
        name = type(expr).__name__
        if type(expr).__module__.startswith("symbackprop"):
            name = name.lower()  # our primitives are classes (Sigmoid): print as functions
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"


def index_str(expr: sp.Expr) -> str:
    return IndexPrinter().doprint(expr)


def forward_comment(deriv: Derivation, name: str) -> str:
    node = deriv.node(name)
    kind = deriv.graph.nodes[name].label or node.kind
    who = f"{kind} {node.layer}" if node.layer != name or kind else name
    return f"{who}: {name}[{_idx(node.indices())}] = {index_str(deriv.forward[name])}"


def backward_comment(deriv: Derivation, name: str) -> str:
    node = deriv.node(name)
    adj = next(a for a in deriv.adjoints if a.node == name)
    via = sorted({c.consumer for c in adj.contributions})
    through = f" (through {', '.join(via)})" if via else ""
    return (f"dL/d{name}{through}: {adj.var}[{_idx(target_indices(node))}] = "
            f"{index_str(adj.expr)}")


def _idx(indices: tuple[sp.Symbol, ...]) -> str:
    return ", ".join(str(i) for i in indices)
