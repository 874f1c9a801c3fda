"""Layers own their parameters: declared shape, initialisation and trainability.

The numpy and torch modules' ``init_params(seed)`` draw from one backend-independent
generator and give the same numbers; the draws have the declared distribution; a layer's
``trainable`` option freezes all of its parameters or the ones it names. (That both
modules agree for every registry test network is checked in test_registry_gradients.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from symbackprop.errors import SpecError
from symbackprop.graph import Graph, Node, out_index
from symbackprop.layers import LAYERS, Layer, Param
from symbackprop.layers.base import register_layer
from symbackprop.spec import LayerSpec
from symbackprop.spec import parse as parse_spec

from conftest import build


class _Affine(Layer):
    """Test-only: h = x * scale + shift + offset over the last axis."""

    key = "_test_affine"
    doc = "test-only affine layer"
    params = {
        "scale": Param("one per feature", "ones"),
        "shift": Param("one per feature", "zeros"),
        "offset": Param("one per feature", "normal", std=0.5, trainable=False),
    }

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        width = (x.shape[-1],)
        scale, shift, offset = (cls.param(graph, spec, role, width)
                                for role in ("scale", "shift", "offset"))
        last = (out_index(x.rank - 1),)
        body = x.element() * scale.element(last) + shift.element(last) + offset.element(last)
        return graph.op(spec.name, x.shape, body, layer=spec.name, where=spec.where,
                        label="affine")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        p = {role: params[f"{spec.name}.{role}"] for role in ("scale", "shift", "offset")}
        return inputs[0] * p["scale"] + p["shift"] + p["offset"]


@pytest.fixture
def affine():
    register_layer(_Affine)
    yield _Affine
    del LAYERS[_Affine.key]


WIDE = """
name: wide
inputs: {x: [N, 4096]}
targets: {t: [N, 1]}
layers:
  - {name: fc, type: dense, units: 64}
  - {name: norm, type: _test_affine, input: fc%s}
  - {name: out, type: dense, units: 1}
loss: {type: mse, target: t}
"""


def _both(modules, seed: int) -> tuple[dict, dict]:
    return (modules["numpy"].init_params(seed),
            {k: v.numpy() for k, v in modules["torch"].init_params(
                seed, dtype=torch.float64).items()})


def test_uniform_normal_zeros_ones(tmp_path, affine) -> None:
    model, modules = build(tmp_path, WIDE % "")
    for seed in (0, 1, 2**40 + 5):
        ours, theirs = _both(modules, seed)
        assert set(ours) == set(theirs) == set(modules["numpy"].PARAM_SHAPES)
        for name, value in ours.items():
            assert value.dtype == np.float64 and value.shape == theirs[name].shape
            if name == "norm.offset":  # log and cos may round differently
                np.testing.assert_allclose(theirs[name], value, rtol=1e-14, atol=1e-15)
            else:
                assert np.array_equal(theirs[name], value), name
    params, _ = _both(modules, 0)
    # dense: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in 4096, 262144 draws
    w, bound = params["fc.weight"], 1 / 64
    assert w.shape == (64, 4096) and np.abs(w).max() < bound
    assert np.abs(w).max() > 0.999 * bound
    assert abs(w.mean()) < 4 * bound / np.sqrt(3 * w.size)
    assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.01
    assert np.abs(params["fc.bias"]).max() < bound
    assert np.array_equal(params["norm.scale"], np.ones(64))
    assert np.array_equal(params["norm.shift"], np.zeros(64))
    # normal(std=0.5); 64 draws only, so loose bounds; a larger sample below
    offset = params["norm.offset"]
    assert abs(offset.mean()) < 4 * 0.5 / 8 and 0.3 < offset.std() < 0.7
    # different seeds, different numbers; same seed, same numbers
    again, _ = _both(modules, 0)
    other, _ = _both(modules, 1)
    assert np.array_equal(again["fc.weight"], w) and not np.array_equal(other["fc.weight"], w)
    # frozen by the declared default
    assert "norm.offset" not in modules["numpy"].TRAINABLE
    assert "norm.scale" in modules["numpy"].TRAINABLE
    net = modules["torch"].Model(seed=0, dtype=torch.float64)
    assert np.array_equal(net.fc.weight.detach().numpy(), w)
    assert not net.norm.offset.requires_grad and net.norm.scale.requires_grad


def test_normal_distribution(tmp_path, affine) -> None:
    _, modules = build(tmp_path, WIDE.replace("units: 64", "units: 20000") % "")
    ours, theirs = _both(modules, 7)
    offset = ours["norm.offset"]
    assert abs(offset.mean()) < 4 * 0.5 / np.sqrt(offset.size)
    assert abs(offset.std() / 0.5 - 1) < 0.03
    within = np.mean(np.abs(offset) < 0.5)  # P(|z| < 1) = 0.6827
    assert abs(within - 0.6827) < 0.015
    np.testing.assert_allclose(theirs["norm.offset"], offset, rtol=1e-14, atol=1e-15)


def test_trainable_per_parameter(tmp_path, affine) -> None:
    _, modules = build(tmp_path, WIDE % ", trainable: {scale: false, offset: true}")
    trainable = set(modules["numpy"].TRAINABLE)
    assert "norm.scale" not in trainable and {"norm.shift", "norm.offset"} <= trainable
    _, modules = build(tmp_path / "..", WIDE % ", trainable: false")
    assert not {"norm.scale", "norm.shift", "norm.offset"} & set(modules["numpy"].TRAINABLE)


DENSE = """name: m
inputs: {x: [N, 2]}
targets: {t: [N, 1]}
layers:
  - {name: fc, type: dense, units: 1%s}
loss: {type: mse, target: t}
"""


def test_dense_trainable_mapping(tmp_path) -> None:
    _, modules = build(tmp_path, DENSE % ", trainable: {weight: false}")
    assert modules["numpy"].TRAINABLE == ("fc.bias",)
    assert modules["torch"].TRAINABLE == ("fc.bias",)
    loss, grads = modules["numpy"].loss_and_grad(modules["numpy"].init_params(0),
                                                 x=np.ones((3, 2)), t=np.zeros((3, 1)))
    assert set(grads) == {"fc.bias"}


@pytest.mark.parametrize("option,at,message", [
    ("trainable: {wieght: false}", "wieght",
     r"layers\[0\]\.trainable\.wieght: unknown parameter 'wieght' in trainable \(this layer "
     r"type has: weight, bias, lora_A, lora_B\)"),
    ("trainable: {weight: 1}", "1}", r"layers\[0\]\.trainable\.weight: expected true or false"),
    ("trainable: [weight]", "[weight]", r"trainable is true, false or a mapping"),
    ("bias: false, trainable: {bias: true}", "{bias: true}",
     r"trainable names 'bias' but the layer has bias: false"),
])
def test_trainable_errors(option: str, at: str, message: str) -> None:
    """Each error names the file, line and column of the offending key or value."""
    text = DENSE % f", {option}"
    line = text.splitlines()[4]
    with pytest.raises(SpecError, match=rf"^m\.yaml:5:{line.index(at) + 1}: .*{message}"):
        parse_spec(text, "m.yaml")


def test_param_declaration_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown init"):
        Param("x", "glorot")
    assert Param("x", "normal", std=0.02).initial(None) == ("normal", 0.02)
    assert Param("x").initial(16) == ("uniform", 0.25)
