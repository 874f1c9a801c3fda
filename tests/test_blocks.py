"""Blocks defined once and used many times: names, numbers and errors.

A residual MLP block (itself using an ``mlp`` block) repeated three times is compared with
an independent torch model built as torch users build it (``nn.ModuleList`` of blocks with
``nn.Linear`` submodules): the state dict keys are the same, so its weights load into the
generated Model unchanged, and the loss and every gradient agree in float64 in numpy, torch
``loss_and_grad`` and the torch Model.
"""

from __future__ import annotations

import numpy as np
import pytest

from symbackprop.errors import SpecError
from symbackprop.spec import MAX_LAYERS, parse

torch = pytest.importorskip("torch")

SPEC = """
name: resnet
inputs: {x: [N, 4]}
targets: {t: [N, 2]}
blocks:
  mlp:
    inputs: [x]
    layers:
      - {name: c_fc, type: dense, units: 8, activation: tanh}
      - {name: c_proj, type: dense, units: 4}
  res_block:
    inputs: [x]
    layers:
      - {name: mlp, type: mlp}
      - {name: out, type: add, input: [x, mlp]}
layers:
  - {name: h, type: res_block, repeat: 3}
  - {name: head, type: dense, units: 2, input: h}
loss: {type: mse, target: t}
"""


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = torch.nn.Linear(4, 8)
        self.c_proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = Mlp()

    def forward(self, x):
        return x + self.mlp(x)


class ResNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = torch.nn.ModuleList(Block() for _ in range(3))
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x, t):
        for block in self.h:
            x = block(x)
        return torch.nn.functional.mse_loss(self.head(x), t)


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def test_repeated_nested_blocks_match_an_independent_torch_model(tmp_build) -> None:
    _, mods = tmp_build(SPEC)
    torch.manual_seed(0)
    twin = ResNet().double()
    state = twin.state_dict()
    assert list(state) == list(mods["numpy"].PARAM_SHAPES)
    model = mods["torch"].Model(dtype=torch.float64)
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state)  # a torch model's weights load unchanged
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    ref = twin(xt, tt)
    ref.backward()
    want = {k: p.grad for k, p in twin.named_parameters()}
    assert all(float(g.abs().max()) > 0 for g in want.values())

    loss, grads = mods["numpy"].loss_and_grad({k: v.numpy() for k, v in state.items()}, x=x, t=t)
    assert _rel(loss, ref.item()) <= 1e-9
    assert set(grads) == set(want)
    for k in want:
        assert _rel(grads[k], want[k].numpy()) <= 1e-9, k

    loss, grads = mods["torch"].loss_and_grad(dict(state), x=xt, t=tt)
    assert _rel(loss.item(), ref.item()) <= 1e-9
    for k in want:
        assert _rel(grads[k].numpy(), want[k].numpy()) <= 1e-9, k

    out = model(x=xt, t=tt)
    out.backward()
    assert _rel(out.item(), ref.item()) <= 1e-9
    for k, p in model.named_parameters():
        assert _rel(p.grad.numpy(), want[k].numpy()) <= 1e-9, k
    assert model.h[2].mlp.c_proj.weight.shape == (4, 8)


def test_gradients_match_finite_differences(tmp_build) -> None:
    _, mods = tmp_build(SPEC)
    m = mods["numpy"]
    params = m.init_params(3)
    rng = np.random.default_rng(2)
    x, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 2))
    _, grads = m.loss_and_grad(params, x=x, t=t)
    for name in ("h.0.mlp.c_fc.weight", "h.2.mlp.c_proj.bias", "head.weight"):
        p = params[name]
        flat = p.reshape(-1)
        for i in range(0, flat.size, max(1, flat.size // 5)):
            old = flat[i]
            flat[i] = old + 1e-6
            up = m.loss(params, x=x, t=t)
            flat[i] = old - 1e-6
            down = m.loss(params, x=x, t=t)
            flat[i] = old
            assert abs((up - down) / 2e-6 - grads[name].reshape(-1)[i]) <= 1e-7


def test_an_instance_without_repeat_has_no_index(tmp_build) -> None:
    text = SPEC.replace("{name: h, type: res_block, repeat: 3}", "{name: h, type: res_block}")
    _, mods = tmp_build(text)
    assert list(mods["numpy"].PARAM_SHAPES)[:2] == ["h.mlp.c_fc.weight", "h.mlp.c_fc.bias"]
    model = mods["torch"].Model()
    assert model.h.mlp.c_fc.weight.shape == (8, 4)


def _error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, "s.yaml")
    return info.value


@pytest.mark.parametrize("old, new, message, at", [
    ("input: [x, mlp]", "input: [t, mlp]", "unknown input 't' inside a block", "input: [t, mlp]"),
    ("input: [x, mlp]", "input: [x, head]", "unknown input 'head' inside a block",
     "input: [x, head]"),
    ("repeat: 3", "repeat: 0", "repeat is an integer in 1..64", "repeat: 0"),
    ("repeat: 3", "repeat: 65", "repeat is an integer in 1..64", "repeat: 65"),
    ("repeat: 3", "repeat: true", "repeat is an integer", "repeat: true"),
    ("{name: mlp, type: mlp}", "{name: mlp, type: res_block}", "block 'res_block' uses itself",
     "type: res_block}\n      - {name: out"),
    ("  res_block:\n", "  dense:\n", "block name 'dense' is a built-in layer type", "  dense:"),
    ("{name: head, type: dense, units: 2, input: h}",
     "{name: head, type: dense, units: 2, input: h, repeat: 2}", "only a block can repeat",
     "repeat: 2"),
    ("{name: h, type: res_block, repeat: 3}", "{name: h, type: res_block, units: 3}",
     "unknown key 'units' for an instance of block 'res_block'", "units: 3}"),
    ("    inputs: [x]\n    layers:\n      - {name: mlp", "    inputs: [x, y]\n    layers:\n"
     "      - {name: mlp", "block 'res_block' has several inputs", "repeat: 3"),
    ("{name: c_proj, type: dense, units: 4}", "{name: x, type: dense, units: 4}",
     "'x' names both a block input and a layer", "{name: x,"),
    ("{name: out, type: add, input: [x, mlp]}", "{name: out, type: add, input: [x, mlp]}\n"
     "    output: nope", "a block's output is one of its layers' names", "output: nope"),
    ("{name: out, type: add", "{name: train, type: add", "attribute of torch.nn.Module",
     "{name: train"),
    ("{name: head, type: dense", "{name: h_0_mlp, type: dense",
     "name 'h_0_mlp' is already used (by h.0.mlp, inside a block)", "{name: h_0_mlp"),
])
def test_block_errors_name_the_place(old: str, new: str, message: str, at: str) -> None:
    """Each error points at the line of the offending text (``at``)."""
    assert old in SPEC
    text = SPEC.replace(old, new, 1)
    err = _error(text)
    assert message in err.message, err.message
    line = text[:text.index(at)].count("\n") + 1 + at[:len(at) - len(at.lstrip("\n"))].count("\n")
    assert err.file == "s.yaml" and err.line == line, (err.line, line, str(err))


def test_an_error_inside_a_block_says_which_instance(tmp_build) -> None:
    text = SPEC.replace("{name: c_proj, type: dense, units: 4}",
                        "{name: c_proj, type: dense, units: 5}")
    with pytest.raises(SpecError) as info:
        tmp_build(text)
    assert "(in h.0.out)" in str(info.value) and ":15:" in str(info.value)


def test_expansion_is_capped() -> None:
    per_block = 64
    layers = "\n".join(f"      - {{name: l{i}, type: activation, activation: tanh}}"
                       for i in range(per_block))
    text = (f"name: big\ninputs: {{x: [N, 2]}}\nblocks:\n  b:\n    inputs: [x]\n    layers:\n"
            f"{layers}\nlayers:\n  - {{name: h, type: b, repeat: 64}}\nloss: {{formula: y}}\n")
    err = _error(text)
    assert f"more than {MAX_LAYERS} layers once blocks are expanded" in err.message


def test_deep_nesting_is_refused() -> None:
    blocks = "\n".join(f"  b{i}:\n    inputs: [x]\n    layers:\n      - {{name: l, type: b{i + 1}}}"
                       for i in range(10))
    text = (f"name: deep\ninputs: {{x: [N, 2]}}\nblocks:\n{blocks}\n  b10:\n    inputs: [x]\n"
            "    layers:\n      - {name: l, type: dense, units: 2}\n"
            "layers:\n  - {name: h, type: b0}\nloss: {formula: y}\n")
    assert "nests blocks deeper than 8" in _error(text).message


FORMULA_NAMES = """
name: formula_names
inputs: {x: [N, 2]}
targets: {t: [N, 2]}
blocks:
  inner:
    inputs: [u]
    layers:
      - {name: d, type: dense, units: 2}
  blk:
    inputs: [x]
    layers:
      - {name: i, type: inner}
      - {name: g, type: elementwise, formula: "i*tanh(i)"}
      - {name: k, type: elementwise, input: [g, x], formula: "g + x"}
layers:
  - {name: h, type: blk, repeat: 2}
  - {name: z, type: elementwise, input: [h], formula: "h*sigmoid(h)"}
  - {name: w, type: elementwise, formula: "2*z"}
loss: {type: mse, target: t}
"""


def test_formulas_name_inputs_as_written_in_their_scope(tmp_path) -> None:
    """Inside a block a formula names the block's own layers and inputs (and the layer
    before it, or an instance of another block, by its name there); outside, a block
    instance by its name. All pass the finite-difference and torch cross-check."""
    from symbackprop.cli import main

    spec = tmp_path / "formula_names.yaml"
    spec.write_text(FORMULA_NAMES, encoding="utf-8")
    layers = {layer.name: layer for layer in parse(FORMULA_NAMES).layers}
    assert layers["h_1_g"].input_names == ("i",) and layers["h_1_k"].input_names == ("g", "x")
    assert layers["z"].inputs == ("h_1_k",) and layers["z"].input_names == ("h",)
    assert main(["check", str(spec)]) == 0
