"""The builder: a Derivation (the engine's own sympy objects) turned into a Document.

The document reads like a textbook chapter and grows linearly with the network:

1. notation: every leaf tensor with its shape, and the conventions, once;
2. the forward pass, once: each op in matrix form (where it has one) beside its index
   form;
3. the backward pass, once, layer by layer from the loss down: for each tensor, the
   local Jacobian of each of its consumers (written once), the contraction of the
   adjoint above with it (the Kronecker deltas summed out), the result in matrix and
   index form, and, at each pre-activation, the error recursion
   eps_l = (eps_{l+1} W_{l+1}) * f'(z_l) with the intermediate adjoints substituted;
4. every parameter's gradient in one line: matrix form, index form, shape;
5. on request (``--param``) the full chain of one parameter, unrolled into forward
   quantities; on request (``--expand``) every scalar of a small network.

Every formula is printed from the sympy expressions the generated code is lowered from:
the adjoints as the engine computed them (after fusion and simplification), beside the
generic form with f'(z) kept symbolic. Nothing here knows a layer type: matrix notation
is recognised by structure alone (:mod:`.matrix`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence

import sympy as sp
from sympy.printing.latex import LatexPrinter

from .. import naming
from ..backprop import Adjoint, Derivation
from ..derive.calculus import (
    eliminate_deltas,
    local_derivative,
    simplify_local,
    substitute_known,
    vjp,
)
from ..errors import UsageError
from ..graph import Node, ref
from ..ir.lower import is_logsumexp
from ..layers import ACTIVATIONS, LAYERS, LOSSES
from ..spec import ModelSpec
from .document import (
    Block,
    Display,
    GradientFormula,
    Heading,
    Para,
    Printed,
    Span,
    code,
    math,
    spans,
)
from .matrix import MatrixForms
from .notation import (
    FnApply,
    FnPrime,
    IndexPrinter,
    Names,
    RowSoftmax,
    _index,
    _opname,
    _rm,
    _shape,
    _size,
    index_letters,
)
from .rewrite import (
    _canonical_bound,
    _expand_sums,
    _flip_signs,
    _indicators,
    _pull_constants,
    _rebuild,
    _set_first,
    _trivial_sums,
)

# --expand writes one formula per scalar parameter: refuse past these sizes.
EXPAND_MAX_PARAMS = 64       # trainable scalars in the whole network
EXPAND_MAX_ELEMENTS = 256    # forward scalars of one example (batch axes stay symbolic)
MAX_PATHS = 12               # chains longer than this are described by the recursion only
# A gradient is unrolled into forward quantities (--param) only while at most this many
# contractions lie between its layer and the loss: each one nests another sum over a
# hidden layer, and past three the formula is longer than anyone reads. Deeper
# gradients keep the error recursion as their readable form.
UNROLL_MAX_NESTING = 3
# Forms of one equation share a row (lhs = a = b) while the row stays this wide, in
# printed symbols (see ``glyphs``); two equations share a row up to ``PAIR_GLYPHS``.
ROW_GLYPHS = 64
PAIR_GLYPHS = 96
# An error recursion unrolled through a layer of several ops (layer norm's mean, variance
# and 1/sigma) can be hundreds of symbols wide: past this it is described, not printed
# (the steps above it already give the same error in parts).
UNROLLED_MAX_GLYPHS = 256


def glyphs(latex: str) -> int:
    """About how many symbols ``latex`` prints: a proxy for its width (commands that
    only style or size count nothing, every other command one symbol)."""
    text = re.sub(r"\\(?:left|right|mathrm|mathbf|boldsymbol|operatorname|mathbb|frac|"
                  r"quad|qquad)(?![a-zA-Z])|\\,", "", latex)
    text = re.sub(r"\\[a-zA-Z]+", "x", text)
    return len(re.sub(r"[{}^_&\s]", "", text))

# ----------------------------------------------------------------------------------------
# The builder.

class _Builder:
    def __init__(self, spec: ModelSpec, deriv: Derivation) -> None:
        self.spec = spec
        self.deriv = deriv
        self.graph = deriv.graph
        self.names = Names(deriv)
        self.nodes = self.graph.nodes
        self.adjoints: dict[str, Adjoint] = {a.var: a for a in deriv.adjoints}
        self.known = [deriv.node(n) for n in deriv.computed]
        # The forward equations as the layers wrote them (before fusion), in order.
        self.forward_order = [n for n, node in self.nodes.items() if node.role == "op"]
        # Forward bodies worth recognising in a derivative: sigma(z) -> h, log-sum-exp.
        # Compound bodies (sums, products) are left out: matching them with wildcards is
        # slow, and the engine's own simplified forms, shown beside, already use them.
        self.patterns = [n for n in reversed(self.known) if isinstance(n.body, sp.Function)]
        self.consumers = self.graph.consumers()
        self.reaches = self._reaches_loss()
        self.fresh = 0
        self.fnames: dict[str, str] = {}
        self._simplified: dict[sp.Expr, sp.Expr] = {}
        self._generic_vjps: dict[tuple[str, str], sp.Expr] = {}
        self._displayed: dict[sp.Expr, sp.Expr] = {}
        self._summed_cache: dict[tuple[sp.Expr, tuple[sp.Symbol, ...]], list[sp.Symbol]] = {}
        self._seeded: dict[sp.Expr, bool] = {}
        self._generic_cache: dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] | None = None
        self._engine_table: dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] | None = None
        self.definitions: dict[str, tuple[sp.Symbol, sp.Expr]] = {}
        for node in self.nodes.values():
            self._describe_function(node)
        self.lse = self._logsumexps()
        self.matrices = MatrixForms(self.names, self.fnames)
        self.gradients: dict[str, GradientFormula] = {}

    # -- graph helpers -----------------------------------------------------------------
    def _reaches_loss(self) -> set[str]:
        out = {self.graph.loss}
        for name in reversed(list(self.nodes)):
            if (any(c in out for c in self.consumers[name])
                    and not self.nodes[name].meta.get("no_gradient")):
                out.add(name)
        return out

    def shape(self, name: str) -> tuple[sp.Expr, ...]:
        of = self.names.adjoint_of(name)
        node = self.nodes.get(of if of is not None else name)
        return node.shape if node is not None else ()

    def extents(self, *exprs: sp.Basic) -> Callable[[sp.Symbol], sp.Expr | None]:
        """How far each index runs: from the first tensor reference that uses it (in
        ``default_sort_key`` order), else from the first sum over it."""
        table: dict[sp.Symbol, sp.Expr] = {}
        for expr in exprs:
            _set_first(table, [
                (r, [(i, n) for i, n in zip(r.indices, self.shape(r.base.name),
                                            strict=False) if isinstance(i, sp.Symbol)])
                for r in expr.atoms(sp.Indexed)])
            _set_first(table, [(s, [(var, hi - lo + 1) for var, lo, hi in s.limits])
                               for s in expr.atoms(sp.Sum)])
        return table.get

    def _elementwise_operand(self, node: Node) -> sp.Indexed | None:
        """The single tensor operand read at the node's own indices, for f(x) nodes."""
        if node.kind != "map" or node.body is None or node.body.has(sp.Sum):
            return None
        refs = [r for r in node.body.atoms(sp.Indexed)]
        names = {r.base.name for r in refs}
        if len(names) != 1 or any(tuple(r.indices) != node.indices() for r in refs):
            return None
        if isinstance(node.body, sp.Indexed):
            return None
        return refs[0]

    def _describe_function(self, node: Node) -> None:
        """Name the elementwise function of an activation-like node: sigma, tanh, relu."""
        operand = self._elementwise_operand(node)
        if operand is None:
            return
        body = node.body
        assert body is not None
        if isinstance(body, sp.Function) and body.args == (operand,) and \
                type(body).__name__ not in ("exp",):
            marker = sp.Symbol("MARKER")
            text = LatexPrinter({"mul_symbol": None}).doprint(body.func(marker))
            for cut in (r"{\left(MARKER", r"\left(MARKER"):
                if cut in text:
                    self.fnames[node.name] = text[:text.index(cut)]
                    return
        label = node.label
        if label in ACTIVATIONS and label not in ("identity",):
            self.fnames[node.name] = _opname(label)
        else:
            self.fnames[node.name] = rf"f_{{{_rm(node.layer)}}}"
        u = sp.Symbol("u", real=True)
        self.definitions[node.name] = (u, body.xreplace({operand: u}))

    # -- printing ----------------------------------------------------------------------
    def letters(self, *exprs: sp.Basic, first: Sequence[sp.Symbol] = (),
                context: Sequence[sp.Basic] = ()) -> dict[sp.Symbol, str]:
        """Letters for the indices of ``exprs``; ``context`` (the left-hand side's tensor
        references) only tells the extent of each index."""
        return index_letters(exprs, first, self.extents(*exprs, *context),
                             self.graph.dims.values())

    def idx(self, expr: sp.Expr, letters: Mapping[sp.Symbol, str],
            verbatim: Mapping[sp.Symbol, str] | None = None) -> str:
        """Index notation; a sum over one value (j = 1..1) is written as its one term."""
        return IndexPrinter(self.names, letters, self.fnames, verbatim).doprint(
            _trivial_sums(expr))

    def element(self, name: str, indices: Sequence[sp.Expr],
                letters: Mapping[sp.Symbol, str]) -> str:
        sub = IndexPrinter(self.names, letters, self.fnames).sub(indices)
        if name == self.graph.loss:
            return "L"
        return self.names.element(name, sub)

    def display(self, expr: sp.Expr) -> sp.Expr:
        """Rewrites for reading (identities all): seed = 1, indicators, softmax, constants
        out of sums, signs, canonical summation indices."""
        if expr not in self._displayed:
            self._displayed[expr] = self._display(expr)
        return self._displayed[expr]

    def _display(self, expr: sp.Expr) -> sp.Expr:
        expr = expr.xreplace({self.deriv.seed: sp.Integer(1)})
        expr = _indicators(expr)
        expr = self._softmax(expr)
        expr = _pull_constants(expr)
        expr = _flip_signs(expr)
        return _canonical_bound(expr)

    def _logsumexps(self) -> dict[str, str]:
        """{lse node: z} for every node whose body is log(sum_c exp(z[.., c]))."""
        lse: dict[str, str] = {}
        for node in self.nodes.values():
            body = node.body
            # the lowering's own test (one place says what a log-sum-exp is); softmax
            # notation needs one summed axis, the last, of one array
            if (body is not None and is_logsumexp(body) and len(body.args[0].limits) == 1
                    and isinstance(body.args[0].function.args[0], sp.Indexed)):
                inner = body.args[0].function.args[0]
                var = body.args[0].limits[0][0]
                if tuple(inner.indices) == (*node.indices(), var):
                    lse[node.name] = inner.base.name
        return lse

    def _softmax(self, expr: sp.Expr) -> sp.Expr:
        """exp(z[.., c] - lse[..]) -> softmax(z)[.., c] where lse = log sum_c exp(z[.., c])."""
        lse = self.lse

        def rule(e: sp.Expr) -> sp.Expr:
            if not isinstance(e, sp.exp):
                return e
            terms = sp.Add.make_args(e.args[0])
            if len(terms) != 2:
                return e
            pos = [t for t in terms if isinstance(t, sp.Indexed)]
            neg = [-t for t in terms if isinstance(-t, sp.Indexed)]
            if len(pos) != 1 or len(neg) != 1:
                return e
            (z,), (m,) = pos, neg
            if lse.get(m.base.name) == z.base.name and \
                    tuple(m.indices) == tuple(z.indices)[:-1]:
                return RowSoftmax(z)
            return e
        return _rebuild(expr, rule, sp.exp, neutral=True) if lse else expr

    # -- matrix form -------------------------------------------------------------------
    def matrix(self, expr: sp.Expr, axes: tuple[sp.Symbol, ...]) -> str | None:
        """``expr`` (indexed by ``axes``) in matrix notation, or None when it has none."""
        return self.matrices.matrix(expr, axes)

    # -- adjoints ----------------------------------------------------------------------
    def instantiate(self, expr: sp.Expr, targets: tuple[sp.Symbol, ...],
                    indices: Sequence[sp.Expr]) -> sp.Expr:
        """``expr`` (free in ``targets``) at ``indices``, its summed indices renamed fresh."""
        mapping: dict[sp.Basic, sp.Basic] = dict(zip(targets, indices, strict=True))
        for var in self._summed(expr, targets):
            self.fresh += 1
            mapping[var] = _index("r", self.fresh)
        return expr.xreplace(mapping)

    def _summed(self, expr: sp.Expr, targets: tuple[sp.Symbol, ...]) -> list[sp.Symbol]:
        """The summation indices of ``expr`` other than ``targets``, in the order fresh
        names are handed out (its sums sorted, then their limits). The same table bodies
        are instantiated over and over while unrolling, and sorting sums is not cheap."""
        key = (expr, targets)
        if key not in self._summed_cache:
            order: list[sp.Symbol] = []
            for s in sorted(expr.atoms(sp.Sum), key=sp.default_sort_key):
                for var, _, _ in s.limits:
                    if var not in targets and var not in order:
                        order.append(var)
            self._summed_cache[key] = order
        return self._summed_cache[key]

    def unroll(self, expr: sp.Expr, keep: Callable[[str], bool],
               table: Mapping[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] | None = None
               ) -> sp.Expr:
        """Substitute adjoint tensors by their formulas until only ``keep`` ones remain."""
        if table is None:
            if self._engine_table is None:
                self._engine_table = {
                    var: (tuple(_index("k", n) for n in range(self.nodes[a.node].rank)),
                          _indicators(a.expr))
                    for var, a in self.adjoints.items()}
            table = self._engine_table
        expr = _indicators(expr).xreplace({self.deriv.seed: sp.Integer(1)})
        for _ in range(len(self.nodes) + 1):
            refs = sorted((r for r in expr.atoms(sp.Indexed)
                           if r.base.name in table
                           and not keep(self.names.adjoint_of(r.base.name) or "")),
                          key=sp.default_sort_key)
            if not refs:
                break
            mapping = {}
            seeded = False
            for r in refs:
                targets, body = table[r.base.name]
                mapping[r] = self.instantiate(body, targets, r.indices)
                seeded = seeded or self._has_seed(body)
            expr = expr.xreplace(mapping)
            if seeded:  # else the seed is already gone: the walk would find nothing
                expr = expr.xreplace({self.deriv.seed: sp.Integer(1)})
        return expr

    def _has_seed(self, body: sp.Expr) -> bool:
        if body not in self._seeded:
            self._seeded[body] = body.has(self.deriv.seed)
        return self._seeded[body]

    def simplified(self, expr: sp.Expr) -> sp.Expr:
        """The engine's own simplification: rational forms, forward tensors reused."""
        if expr not in self._simplified:
            simple = simplify_local(expr)
            # Only forward bodies over tensors this expression reads can occur in it:
            # trying every pattern would make a deep network's document quadratic.
            read = {r.base.name for r in simple.atoms(sp.Indexed)}
            patterns = [n for n in self.patterns if read & set(n.operands)]
            self._simplified[expr] = substitute_known(simple, patterns)
        return self._simplified[expr]

    # -- paths -------------------------------------------------------------------------
    def paths(self, start: str) -> list[list[str]]:
        out: list[list[str]] = []

        def walk(path: list[str]) -> None:
            if len(out) > MAX_PATHS:
                return
            here = path[-1]
            if here == self.graph.loss:
                out.append(path)
                return
            for c in self.consumers[here]:
                if c in self.reaches:
                    walk([*path, c])
        walk([start])
        return out

    def _apply_names(self, name: str, body: sp.Expr) -> sp.Expr:
        """f(z) for activation-like bodies whose function has no sympy name (relu, gelu)."""
        operand = self._elementwise_operand(self.nodes[name])
        if name in self.definitions and operand is not None:
            return FnApply(sp.Symbol(name), operand)
        return body

    def _chain(self, param: Node, paths: list[list[str]]) -> list[Block]:
        names = self.names
        lhs = names.partial(self.graph.loss, param.name)
        out: list[Block] = []
        if len(paths) > MAX_PATHS:
            out.append(Para(spans(
                math(names.array(param.name)), f" reaches the loss along more than {MAX_PATHS} "
                "paths; the recursion below sums them layer by layer.")))
            return out
        products = []
        for path in paths:
            factors = [names.partial(path[n + 1], path[n]) for n in reversed(range(len(path) - 1))]
            products.append(" ".join(factors))
        many = "s" if len(paths) > 1 else ""
        out.append(Para(spans(math(names.array(param.name)), f" reaches the loss along "
                               f"{len(paths)} path{many} through the layer graph"
                               + (", one product per path:" if many else ":"))))
        rows = [(lhs, "= " + products[0])] + [("", "+ " + p) for p in products[1:]]
        out.append(Display(tuple(rows)))
        return out

    def _generic_vjp(self, consumer: Node, operand: Node) -> sp.Expr:
        """dL/d operand through consumer, with f'(x) kept symbolic for named functions."""
        key = (consumer.name, operand.name)
        if key not in self._generic_vjps:
            self._generic_vjps[key] = self._derive_generic_vjp(consumer, operand)
        return self._generic_vjps[key]

    def _derive_generic_vjp(self, consumer: Node, operand: Node) -> sp.Expr:
        g = naming.adjoint(consumer.name)
        if consumer.name in self.fnames and self._elementwise_operand(consumer) is not None:
            k = tuple(_index("k", n) for n in range(operand.rank))
            return ref(g, k) * FnPrime(sp.Symbol(consumer.name), ref(operand.name, k))
        raw = self._engine_raw(consumer, operand)
        return raw if raw is not None else vjp(consumer, operand, g)

    def _engine_raw(self, consumer: Node, operand: Node) -> sp.Expr | None:
        """``vjp(consumer, operand, d_consumer)`` as the engine already derived it: its
        raw contribution, where the engine differentiated this very body (the consumer
        survived fusion unchanged); None elsewhere."""
        fused = self.deriv.fused
        node = fused.nodes.get(consumer.name)
        adj = self.adjoints.get(naming.adjoint(operand.name))
        if node is None or adj is None or fused.absorbed.get(consumer.name) or \
                node.body != consumer.body or node.shape != consumer.shape or \
                node.indices() != consumer.indices():
            return None
        for contrib in adj.contributions:
            if contrib.consumer == consumer.name:
                return contrib.raw
        return None

    def _rows(self, lhs: str, forms: Sequence[str]) -> list[tuple[str, ...]]:
        """``lhs = f1 = f2 ...`` for the distinct forms: on one row while it stays
        short, else one row per form."""
        distinct = list(dict.fromkeys(forms))
        if not distinct:
            return []
        if sum(glyphs(f) for f in distinct) <= ROW_GLYPHS:
            return [(lhs, "= " + " = ".join(distinct))]
        return [(lhs, "= " + distinct[0])] + [("", "= " + f) for f in distinct[1:]]

    def _form_letters(self, form: sp.Expr, var: str, k: tuple[sp.Symbol, ...]
                      ) -> dict[sp.Symbol, str]:
        """Letters for one form of ``var[k]``: the free indices as on the left-hand side,
        the summed ones lettered afresh (forms of one equation sum over different
        symbols, and each reads best with its own i, j, k order)."""
        return self.letters(form, first=k, context=(ref(var, k),))

    @staticmethod
    def _pair(left: list[tuple[str, ...]], right: list[tuple[str, ...]]
              ) -> list[tuple[str, ...]]:
        """Two one-row equations side by side (matrix form, index form) while they fit."""
        if len(left) == 1 and len(right) == 1 and \
                glyphs(left[0][1]) + glyphs(right[0][1]) <= PAIR_GLYPHS:
            return [(*left[0], *right[0])]
        return left + right

    def _vjp(self, consumer: str, operand: str) -> sp.Expr:
        """dL/d operand through consumer, simplified: the engine's own contribution where
        the edge survived fusion, else derived here the same way."""
        adj = self.adjoints.get(naming.adjoint(operand))
        if consumer in self.deriv.fused.nodes and adj is not None and \
                not self.deriv.fused.absorbed.get(consumer):
            for contrib in adj.contributions:
                if contrib.consumer == consumer:
                    return contrib.simplified
        return self.simplified(vjp(self.nodes[consumer], self.nodes[operand],
                                   naming.adjoint(consumer)))

    def sub(self, indices: Sequence[sp.Expr], letters: Mapping[sp.Symbol, str]) -> str:
        return IndexPrinter(self.names, letters, self.fnames).sub(indices)

    # -- sections ----------------------------------------------------------------------
    def relevant(self, params: Sequence[Node]) -> set[str]:
        """Op tensors between the given parameters and the loss: their adjoints are
        the backward pass those parameters' gradients need."""
        found: set[str] = set()
        todo = [p.name for p in params]
        while todo:
            for c in self.consumers[todo.pop()]:
                if c not in found and c in self.reaches:
                    found.add(c)
                    todo.append(c)
        return found

    def preamble(self, label: str) -> list[Block]:
        spec = self.spec
        return [Heading(1, spans("Backpropagation in ", code(spec.name))), Para(spans(
            "Derived by symbackprop from ", code(label), " (sha256 ", code(spec.sha256[:16]),
            "). Every formula is printed from the sympy expressions the generated numpy "
            "and torch modules are lowered from."))]

    def notation(self) -> list[Block]:
        parts: list[str | Span] = ["Tensors: "]
        leaves = [n for n in self.nodes.values() if n.role != "op"]
        for n, node in enumerate(leaves):
            what = {"input": "input", "target": "target",
                    "mask": "dropout mask (drawn each step: 0, or 1/(1-p) kept)"}.get(
                        node.role, "")
            if node.role == "param":
                what = "parameter" if node.trainable else "frozen parameter (no gradient)"
            if node.dtype == "int64":  # ids and class labels (values counted from 0)
                what = f"integer {what} (ids from 0)"
            field = "Z" if node.dtype == "int64" else "R"
            parts += [math(rf"{self.names.array(node.name)} \in \mathbb{{{field}}}^"
                           rf"{{{_shape(node.shape)}}}"), f" {what} ",
                      code(node.param or node.name), "; " if n < len(leaves) - 1 else "."]
        conventions = spans(
            "Indices count from 1; ", math("n"), " runs over the ", math("N"),
            " examples of a batch; the other indices are lettered ", math("i, j, k, l"),
            " in order, those of the left-hand side first; bold letters are arrays, plain "
            "letters their entries; ", math(r"\odot"), " multiplies elementwise and ",
            math(r"A^{\circ 2} = A \odot A"), "; ", math(r"\delta_{ij}"),
            " is the Kronecker delta (1 if ", math("i = j"), ", else 0), ",
            math(r"\mathbb{I}[\cdot]"), " is 1 where its condition holds, ",
            math(r"\mathbf{1}"), " a column of ones; ",
            math(rf"{self.names.error_symbol()} = \partial L / \partial \mathbf{{z}}"),
            " is the error signal at a layer's pre-activation.")
        return [Heading(2, spans("Notation")), Para(spans(*parts)), Para(conventions)]

    def forward_section(self) -> list[Block]:
        rows: list[tuple[str, ...]] = []
        for name in self.forward_order:
            node = self.nodes[name]
            assert node.body is not None
            body = self._apply_names(name, node.body)
            axes = node.indices()
            # the left-hand side tells the extent of an axis the body only broadcasts along
            letters = self.letters(body, first=axes, context=(node.element(),))
            mat = self.matrix(body, axes) if axes else None
            el = (self.element(name, axes, letters), f"= {self.idx(body, letters)}")
            if mat is None:
                rows.append(el)
                continue
            lhs = "L" if name == self.graph.loss else self.names.array(name)
            shape = rf" \quad ({_shape(node.shape)})" if node.shape else ""
            pair = (lhs, f"= {mat}{shape}")
            if glyphs(pair[1]) + glyphs(el[1]) <= PAIR_GLYPHS:
                rows.append((*pair, *el))
            else:
                rows += [pair, el]
        defined: set[str] = set()
        for name in self.forward_order:
            if name in self.definitions and self.fnames[name] not in defined:
                defined.add(self.fnames[name])
                u, fbody = self.definitions[name]
                rows.append((rf"{self.fnames[name]}(u)", "= " + IndexPrinter(
                    self.names, {}, self.fnames, {u: "u"}).doprint(fbody)))
        out: list[Block] = [Heading(2, spans("The forward pass")), Para(spans(
            "Each operation in matrix form (with its shape) and entry by entry:")),
            Display(tuple(rows))]
        if self.graph.prediction:
            out.append(Para(spans("The prediction is ",
                                  math(self.names.array(self.graph.prediction)),
                                  "; the loss is ", math("L"), ".")))
        return out

    def backward_section(self, relevant: set[str]) -> tuple[list[Block], list[Printed]]:
        out: list[Block] = [Heading(2, spans("The backward pass")), Para(spans(
            "From the loss down, one tensor at a time: the local Jacobian of what reads it, "
            "then the gradient it receives (each Kronecker delta removes one sum). Of two "
            "forms, the first keeps ", math(r"f'"), " and the adjoint above symbolic, the "
            "last is what the generated code computes."))]
        printed: list[Printed] = []
        steps = [n for n in reversed(self.forward_order)
                 if n != self.graph.loss and n in relevant]
        # A layer's note follows the step of its input, where its contributions are
        # collected (or its own last step, when its input gets no adjoint).
        after: dict[str, list[str]] = {}
        for spec in self.spec.layers:
            own = [n for n in steps if self.nodes[n].layer == spec.name]
            src = self.graph.layer_outputs.get(spec.inputs[0], spec.inputs[0])
            if own:
                after.setdefault(src if src in steps else own[-1], []).append(spec.name)
        for name in steps:
            blocks, step = self._step(name)
            out += blocks
            printed.append(step)
            for layer in after.get(name, ()):
                out += self._layer_note(layer)
        return out, printed

    def _layer_note(self, layer: str) -> list[Block]:
        """The layer's own closing remark (a compact form of its backward pass)."""
        spec = self.spec.layer(layer)
        parts, rows = LAYERS[spec.type].derivation_note(spec)
        if not parts:
            return []
        text = spans(*(math(p) if n % 2 else p for n, p in enumerate(parts)))
        return [Para(text), Display(rows)] if rows else [Para(text)]

    def _step(self, name: str) -> tuple[list[Block], Printed]:
        names = self.names
        node = self.nodes[name]
        var = naming.adjoint(name)
        consumers = [c for c in self.consumers[name] if c in self.reaches]
        k = tuple(_index("k", n) for n in range(node.rank))
        head: list[str | Span] = [math(names.array(name)), " is read by "]
        for n, c in enumerate(consumers):
            cn = self.nodes[c]
            kind = {"map": "elementwise", "contraction": "a contraction",
                    "reduction": "a reduction"}.get(cn.kind, cn.kind)
            head += [code(c), f" ({cn.label or cn.kind}, {kind})",
                     ", " if n < len(consumers) - 1 else ":"]
        rows: list[tuple[str, ...]] = []
        for c in consumers:
            rows += self._jacobian_rows(c, name)
        generic = self.display(self._generic()[var][1].xreplace(
            dict(zip(self._generic()[var][0], k, strict=True))))
        adj = self.adjoints.get(var)
        if adj is not None:
            computed = self.display(adj.expr)
        else:
            computed = self.display(sp.Add(*(self._vjp(c, name) for c in consumers)))
        forms = [generic, computed]
        contracted = self._contraction_form(consumers, name, k)
        index_forms = ([contracted] if contracted is not None else []) + forms
        letters = self.letters(*index_forms, first=k)
        rows += self._pair(
            self._rows(names.array(var), [m for m in (self.matrix(f, k) if k else None
                                                      for f in forms) if m is not None]),
            self._rows(self.element(var, k, letters),
                       [self.idx(f, self._form_letters(f, var, k)) for f in index_forms]))
        blocks: list[Block] = [Para(spans(*head)), Display(tuple(rows))]
        note = self._fusion_note(adj)
        if note is not None:
            blocks.insert(1, note)
        if names.is_error(name):
            blocks += self._recursion(name, computed, k)
        return blocks, Printed(var, k, computed)

    def _jacobian_rows(self, consumer_name: str, operand_name: str) -> list[tuple[str, ...]]:
        """The local Jacobian d consumer / d operand, entry by entry (once per edge)."""
        names = self.names
        consumer = self.nodes[consumer_name]
        assert consumer.body is not None
        i = consumer.indices()
        if not i:  # a scalar (the loss): its gradient row is the Jacobian
            return []
        k = tuple(_index("k", n) for n in range(self.nodes[operand_name].rank))
        if self._is_elementwise(consumer, operand_name):
            raw = local_derivative(consumer.body, ref(operand_name, i))
            forms = [self.display(raw), self.display(self.simplified(raw))]
            if consumer_name in self.fnames and self._elementwise_operand(consumer) is not None:
                # f' named, then what the code computes (sigma' = y (1 - y)); the raw
                # derivative in between would only restate the definition of f.
                forms[0] = FnPrime(sp.Symbol(consumer_name), ref(operand_name, i))
            letters = self.letters(*forms, first=i, context=(ref(consumer_name, i),))
            sub = self.sub(i, letters)
            lhs = names.partial(consumer_name, operand_name, sub, sub, arrays=False)
            return self._rows(lhs, [self.idx(f, letters) for f in forms])
        shape = self.nodes[operand_name].shape
        local = self.display(eliminate_deltas(local_derivative(
            consumer.body, ref(operand_name, k), shape), dict(zip(k, shape, strict=True))))
        letters = self.letters(local, first=(*i, *k),
                               context=(ref(consumer_name, i), ref(operand_name, k)))
        lhs = names.partial(consumer_name, operand_name, self.sub(i, letters),
                            self.sub(k, letters), arrays=False)
        return [(lhs, "= " + self.idx(local, letters))]

    def _is_elementwise(self, consumer: Node, operand: str) -> bool:
        assert consumer.body is not None
        i = consumer.indices()
        return consumer.kind == "map" and not consumer.body.has(sp.Sum) and all(
            tuple(r.indices) == i for r in consumer.body.atoms(sp.Indexed)
            if r.base.name == operand)

    def _contraction_form(self, consumers: list[str], operand: str,
                          k: tuple[sp.Symbol, ...]) -> sp.Expr | None:
        """The chain rule before the deltas are summed out: sum over the consumer's
        entries of its adjoint times its local Jacobian (one consumer, not elementwise)."""
        if len(consumers) != 1:
            return None
        consumer = self.nodes[consumers[0]]
        assert consumer.body is not None
        i = consumer.indices()
        if not i or self._is_elementwise(consumer, operand):
            return None
        shape = self.nodes[operand].shape
        local = eliminate_deltas(local_derivative(consumer.body, ref(operand, k), shape),
                                 dict(zip(k, shape, strict=True)))
        if not local.has(sp.KroneckerDelta):
            return None
        limits = tuple((a, sp.Integer(0), n - 1) for a, n in zip(i, consumer.shape,
                                                                  strict=True))
        g = ref(naming.adjoint(consumer.name), i)
        return self.display(sp.Sum(g * local, *limits))

    def _fusion_note(self, adj: Adjoint | None) -> Para | None:
        """Say where the engine differentiated a fused expression (across layers)."""
        if adj is None:
            return None
        fused = self.deriv.fused
        for contrib in adj.contributions:
            absorbed = fused.absorbed.get(contrib.consumer)
            if not absorbed:
                continue
            parts: list[str | Span] = ["symbackprop substitutes "]
            for n, a in enumerate(absorbed):
                parts += [math(self.names.array(a)), ", " if n < len(absorbed) - 1 else ""]
            into = self.graph.loss if contrib.consumer == self.graph.loss else contrib.consumer
            parts += [" into ", math("L" if into == self.graph.loss else
                                     self.names.array(into)),
                      " before differentiating, so sympy simplifies across those layers."]
            fired = list(dict.fromkeys(
                (f.rule, f.why) for f in self.deriv.rewrites
                if f.where == f"forward {contrib.consumer}"))
            for n, (rule, why) in enumerate(fired):
                parts += [" Rewritten for numerical stability first: " if n == 0 else "; ",
                          code(rule), f" ({why})" + ("." if n == len(fired) - 1 else "")]
            return Para(spans(*parts))
        return None

    def _recursion(self, name: str, computed: sp.Expr, k: tuple[sp.Symbol, ...]
                   ) -> list[Block]:
        """The error recursion at a pre-activation: its error in terms of the errors
        above only (or, at the output, in forward quantities only)."""
        names = self.names
        var = naming.adjoint(name)
        unrolled = self.display(self.unroll(computed, keep=names.is_error))
        forms = [unrolled]
        note = None
        above = [r for r in unrolled.atoms(sp.Indexed) if names.adjoint_of(r.base.name)]
        if not above:
            loss_cls = LOSSES.get(self.spec.loss.type)
            if loss_cls is not None and loss_cls.target_kind == "distribution":
                collapsed = self._rows_sum_to_one(unrolled)
                if collapsed != unrolled:
                    forms.append(self.display(self.simplified(collapsed)))
                    note = ("Each row of the target sums to 1 (one-hot or probabilities), "
                            "so the sum over classes drops out.")
        if unrolled == computed and len(forms) == 1:
            return []
        letters = self.letters(*forms, first=k)
        rows = self._pair(
            self._rows(names.array(var), [m for m in (self.matrix(f, k) if k else None
                                                      for f in forms) if m is not None]),
            self._rows(self.element(var, k, letters),
                       [self.idx(f, self._form_letters(f, var, k)) for f in forms]))
        what = ("so the error at this layer, in terms of the error above:" if above else
                "so the error at the output, in forward quantities only:")
        wide = max(glyphs(" ".join(row)) for row in rows)
        if wide > UNROLLED_MAX_GLYPHS:
            return [Para(spans(f"Written out in one formula ({what[3:-1]}), this error would "
                               f"be about {wide} symbols wide; the steps above give it in "
                               "parts."))]
        out: list[Block] = [Para(spans(what)), Display(tuple(rows))]
        if note:
            out.append(Para(spans(note)))
        return out

    def gradient_intro(self) -> list[Block]:
        return [Heading(2, spans("The gradients")), Para(spans(
            "One line per parameter, from the backward pass above: matrix form with the "
            "parameter's shape, and entry by entry. The generated code computes each as ",
            code("d_<parameter>"), " in ", code("loss_and_grad"), "."))]

    def gradient_row(self, param: Node) -> tuple[tuple[str, ...], Printed | None]:
        names = self.names
        k = tuple(_index("k", n) for n in range(param.rank))
        lhs = names.partial(self.graph.loss, param.name)
        shape = rf" \quad ({_shape(param.shape)})"
        adj = self.adjoints.get(naming.adjoint(param.name))
        formula_param = param.param or param.name
        if adj is None or not any(c in self.reaches for c in self.consumers[param.name]):
            self.gradients[formula_param] = GradientFormula(formula_param, param.name, k,
                                                            lambda: sp.Integer(0))
            return ((lhs, rf"= \mathbf{{0}}{shape}", r"\text{(the loss does not read it)}"),
                    Printed(param.name, k, sp.Integer(0)))
        expr = self.display(adj.expr)
        letters = self.letters(expr, first=k)
        lhs_el = rf"\frac{{\partial L}}{{\partial {self.element(param.name, k, letters)}}}"
        el = (lhs_el, "= " + self.idx(expr, letters))
        formula = GradientFormula(param.param or param.name, param.name, k,
                                  lambda: self.display(self.unroll(adj.expr,
                                                                   keep=lambda n: False)))
        self.gradients[formula.param] = formula
        mat = self.matrix(expr, k) if k else None
        row = (lhs, f"= {mat}{shape}", *el) if mat is not None else (*el[:1], el[1] + shape)
        return row, Printed(param.name, k, expr)

    def chain_section(self, param: Node) -> list[Block]:
        """The full chain of one parameter: the chain rule along every path, then the
        gradient unrolled into forward quantities (where it is short enough to read)."""
        names = self.names
        title = spans("The full chain for ", code(param.param or param.name))
        out: list[Block] = [Heading(2, title)]
        paths = self.paths(param.name)
        formula = self.gradients.get(param.param or param.name)
        if not paths or formula is None:
            out.append(Para(spans("The loss does not depend on ",
                                  math(names.array(param.name)), ": its gradient is 0.")))
            return out
        out += self._chain(param, paths)
        nesting = max(sum(self.nodes[n].kind == "contraction" for n in path[2:])
                      for path in paths)
        lhs_k = formula.indices
        if nesting <= UNROLL_MAX_NESTING:
            letters = self.letters(formula.expr, first=lhs_k)
            lhs = rf"\frac{{\partial L}}{{\partial {self.element(param.name, lhs_k, letters)}}}"
            out.append(Para(spans("Unrolled into forward quantities only:")))
            out.append(Display(((lhs, "= " + self.idx(formula.expr, letters)),)))
        else:
            out.append(Para(spans(
                f"Not unrolled into forward quantities: {nesting} contractions lie between "
                "this layer and the loss, each nesting another sum; the error recursion "
                "in the backward pass is the readable form, one layer at a time.")))
        return out

    def _generic(self) -> dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]]:
        if self._generic_cache is None:
            self._generic_cache = self._generic_table()
        return self._generic_cache

    def _generic_table(self) -> dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]]:
        """Adjoint formulas over the unfused graph, f'(x) kept symbolic."""
        table: dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] = {}
        for name in self.nodes:
            node = self.nodes[name]
            if name == self.graph.loss or name not in self.reaches or node.role != "op":
                continue
            k = tuple(_index("k", n) for n in range(node.rank))
            total = sp.Integer(0)
            for c in self.consumers[name]:
                if c in self.reaches:
                    part = self._generic_vjp(self.nodes[c], node)
                    total += _indicators(part if part.has(FnPrime) else self.simplified(part))
            table[naming.adjoint(name)] = (k, total)
        return table

    def _rows_sum_to_one(self, expr: sp.Expr) -> sp.Expr:
        target = self.spec.loss.target
        if target is None:
            return expr

        def rule(e: sp.Expr) -> sp.Expr:
            if isinstance(e, sp.Sum) and len(e.limits) == 1 and isinstance(e.function,
                                                                           sp.Indexed):
                r = e.function
                var, lo, hi = e.limits[0]
                shape = self.nodes[target].shape
                if (r.base.name == target and r.indices[-1] == var and lo == 0
                        and hi + 1 == shape[-1]):
                    return sp.Integer(1)
            return e
        return _rebuild(expr, rule, sp.Sum, neutral=True)

    # -- expand ------------------------------------------------------------------------
    def expand_section(self) -> list[Block]:
        trainable = [p for p in self.graph.params() if p.trainable]
        count = sum(_size(p.shape) for p in trainable)
        if count > EXPAND_MAX_PARAMS:
            raise UsageError(
                f"--expand writes one formula per scalar parameter and is meant for small "
                f"networks: {self.spec.name} has {count} trainable scalars, the limit is "
                f"{EXPAND_MAX_PARAMS}; use --param NAME for one parameter in matrix form")
        elements = sum(_size(tuple(d for d in self.nodes[n].shape if d.is_number))
                       for n in self.forward_order)
        if elements > EXPAND_MAX_ELEMENTS:
            raise UsageError(
                f"--expand: the forward pass of {self.spec.name} has {elements} scalars per "
                f"example, the limit is {EXPAND_MAX_ELEMENTS}")
        out: list[Block] = [Heading(2, spans("Every scalar, expanded")), Para(spans(
            "The same derivation written out entry by entry for one example ", math("n"),
            " of the batch (sums over the batch stay sums).")),
            Heading(3, spans("Forward"))]
        for name in self.forward_order:
            node = self.nodes[name]
            assert node.body is not None
            rows = []
            for idx in _entries(node):
                body = _expand_sums(self._apply_names(name, node.body).xreplace(
                    dict(zip(node.indices(), idx, strict=True))))
                letters = self.letters(body, *[i for i in idx if isinstance(i, sp.Symbol)],
                                       first=[i for i in idx if isinstance(i, sp.Symbol)])
                rows.append((self.element(name, idx, letters),
                             "= " + self.idx(self.display(body), letters)))
            out.append(Display(tuple(rows)))
        out.append(Heading(3, spans("Gradients")))
        for p in trainable:
            formula = self.gradients.get(p.param or p.name)
            if formula is None:
                continue
            rows = []
            for idx in itertools.product(*(range(int(d)) for d in p.shape)):
                values = tuple(sp.Integer(v) for v in idx)
                expr = _expand_sums(formula.expr.xreplace(
                    dict(zip(formula.indices, values, strict=True))))
                expr = self.display(expr)
                letters = self.letters(expr)
                lhs = rf"\frac{{\partial L}}{{\partial {self.element(p.name, values, letters)}}}"
                rows.append((lhs, "= " + self.idx(expr, letters)))
            out.append(Para(spans(code(p.param or p.name), ":")))
            out.append(Display(tuple(rows)))
        return out




def _entries(node: Node) -> list[tuple[sp.Expr, ...]]:
    axes: list[list[sp.Expr]] = []
    for i, d in zip(node.indices(), node.shape, strict=True):
        axes.append([sp.Integer(v) for v in range(int(d))] if d.is_number else [i])
    return [tuple(t) for t in itertools.product(*axes)]


