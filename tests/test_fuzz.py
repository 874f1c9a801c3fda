"""Property tests: random specs and formulas may only ever raise the project's SpecError."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symbackprop.build import build_graph
from symbackprop.errors import SpecError
from symbackprop.formula import FUNCTIONS, FormulaProblem, parse_tree, to_sympy
from symbackprop.layers import ACTIVATIONS, LAYERS, LOSSES
from symbackprop.spec import parse

TOKENS = [*FUNCTIONS, "x", "y", "t", "(", ")", ",", "+", "-", "*", "/", "**", "<", ">", "1",
          "2.5", "1e9", "0", " ", ".", "[", "]", "'", "lambda", ":", "__import__", "os",
          "if", "else", "pi", "e", "=", "\\", "#", ";", "\n"]

formulas = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(formulas)
def test_formula_parser_only_raises_formula_problem(text: str) -> None:
    try:
        tree = parse_tree(text, {"x": None, "y": None})
    except FormulaProblem:
        return
    import sympy as sp

    to_sympy(tree, {"x": sp.Symbol("x", real=True), "y": sp.Symbol("y", real=True)})


names = st.one_of(st.sampled_from(["x", "t", "fc", "h", "out", "N", "loss", "print", "d_x",
                                   "a b", "", "__x"]), st.text(max_size=8))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True),
                    names)
shapes = st.lists(st.one_of(st.integers(-1, 5), st.sampled_from(["N", "M", "x"])), max_size=3)
activation = st.one_of(st.sampled_from([*ACTIVATIONS, "nope"]),
                       st.fixed_dictionaries({"formula": formulas}),
                       st.fixed_dictionaries({"type": st.sampled_from([*ACTIVATIONS])},
                                             optional={"alpha": scalars}))
layer = st.fixed_dictionaries(
    {"name": names, "type": st.sampled_from([*LAYERS, "conv"])},
    optional={"units": st.one_of(st.integers(-1, 6), scalars), "activation": activation,
              "input": st.one_of(names, st.lists(names, max_size=3)),
              "bias": scalars, "trainable": scalars, "formula": formulas, "extra": scalars})
spec_dicts = st.fixed_dictionaries(
    {"name": names, "inputs": st.dictionaries(names, shapes, max_size=2),
     "layers": st.lists(layer, max_size=4)},
    optional={"targets": st.dictionaries(names, shapes, max_size=2),
              "loss": st.fixed_dictionaries(
                  {"type": st.sampled_from([*LOSSES, "hinge"])},
                  optional={"target": names, "prediction": names, "formula": formulas}),
              "junk": scalars})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_dicts)
def test_random_specs_only_raise_spec_error(doc: dict) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    try:
        spec = parse(text, "fuzz.yaml")
        build_graph(spec)
    except SpecError as exc:
        assert str(exc).startswith("fuzz.yaml:")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_random_text_only_raises_spec_error(text: str | bytes) -> None:
    try:
        parse(text, "fuzz.yaml")
    except SpecError as exc:
        assert str(exc).startswith("fuzz.yaml:")
