"""Product plus bias: ``p = a @ b; z = p + c`` -> ``z = linear(a @ b, c)``.

When a matrix product's only reader adds one other array to it, the two become one
:class:`Linear` op: torch prints ``addmm`` (the add rides on the product), numpy adds
the bias into the product's own buffer. Only products of two matrices qualify (addmm's
contract), and only a product that is a temporary, read nowhere else.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ...naming import TEMP_PREFIX
from ..nodes import Assign, Linear, Map, MatMul, Program, join_comments, readers


def linear(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    count = readers(stmts)
    products = {s.target: s for s in stmts if isinstance(s.op, MatMul) and s.op.a_rank == 2
                and s.target.startswith(TEMP_PREFIX) and s.target not in protected
                and count.get(s.target) == 1}
    out: list[Assign] = []
    fused: set[str] = set()
    for stmt in stmts:
        op = stmt.op
        if isinstance(op, Map) and isinstance(op.body, sp.Add) and len(op.body.args) == 2:
            views = dict(op.views)
            a, b = op.body.args
            for prod_sym, bias_sym in ((a, b), (b, a)):
                pv, bv = views.get(prod_sym), views.get(bias_sym)
                if (pv is None or bv is None or pv.src not in products or not pv.is_identity
                        or bv.src == pv.src):
                    continue
                product = products[pv.src]
                stmt = replace(stmt, op=Linear(product.op, bv),  # type: ignore[arg-type]
                               comment=join_comments(product.comment, stmt.comment))
                fused.add(pv.src)
                break
        out.append(stmt)
    return [s for s in out if s.target not in fused]
