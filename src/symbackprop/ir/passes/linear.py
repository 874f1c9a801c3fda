"""Product plus bias: ``p = a @ b; z = p + c`` -> ``z = linear(a @ b, c)``.

When a matrix product's only reader adds one other array to it, the two become one
:class:`Linear` op: torch prints ``addmm`` (the add rides on the product), numpy adds
the bias into the product's own buffer. A product of two matrices takes any bias
(addmm's contract); a stack of rows times a transposed matrix (``x @ W.T`` over
[N, T, C], a dense layer on a sequence) takes only a vector along its last axis, which
torch's ``linear`` adds in the same call. Only a product that is a temporary, read
nowhere else, qualifies.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ...naming import TEMP_PREFIX
from ..nodes import Assign, Linear, Map, MatMul, Program, View, join_comments, readers


def linear(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    count = readers(stmts)
    products = {s.target: s for s in stmts if isinstance(s.op, MatMul)
                and (s.op.a_rank == 2 or (s.op.tb and not s.op.ta))
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
                if product.op.a_rank > 2 and not _last_axis_vector(bv):  # type: ignore[union-attr]
                    continue
                stmt = replace(stmt, op=Linear(product.op, bv),  # type: ignore[arg-type]
                               comment=join_comments(product.comment, stmt.comment))
                fused.add(pv.src)
                break
        out.append(stmt)
    return [s for s in out if s.target not in fused]


def _last_axis_vector(view: View) -> bool:
    """A vector read along the output's last axis, broadcast over the others (a bias)."""
    return view.picks == (None,) and view.places == (view.out_rank - 1,)
