"""The dropout layer: one mask per step, drawn as documented, used by forward and backward.

Training mode is checked against central finite differences of the module's own loss at
the same seed (the gradient belongs to the loss of that mask), and against an
independent torch model that is handed the same mask, for numpy ``loss_and_grad``, torch
``loss_and_grad`` and the torch ``Model`` (which draws from torch's global generator, as
``torch.nn.Dropout``). Evaluation mode and p = 0 are the identity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from symbackprop.cli import main
from symbackprop.errors import SpecError
from symbackprop.spec import parse as parse_spec

from conftest import build, write_spec

DROP = """name: drop_net
inputs: {x: [N, 4]}
targets: {t: [N, 3]}
layers:
  - {name: fc1, type: dense, units: 6, activation: tanh}
  - {name: drop1, type: dropout, p: 0.3}
  - {name: fc2, type: dense, units: 5, activation: sigmoid}
  - {name: drop2, type: dropout, p: 0.5}
  - {name: out, type: dense, units: 3}
loss: {type: mse, target: t}
"""
P = {"drop1": 0.3, "drop2": 0.5}
N = 8


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return build(tmp_path_factory.mktemp("drop"), DROP)


def _batch(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(N, 4)), "t": rng.normal(size=(N, 3))}


def _numpy_masks(seed: int) -> dict[str, np.ndarray]:
    """The documented draw: one numpy generator per call, the layers in order."""
    rng = np.random.default_rng(seed)
    shapes = {"drop1": (N, 6), "drop2": (N, 5)}
    return {k: (rng.random(s) >= P[k]) / (1 - P[k]) for k, s in shapes.items()}


def _torch_masks(generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    shapes = {"drop1": (N, 6), "drop2": (N, 5)}
    return {k: (torch.rand(s, generator=generator, dtype=torch.float64) >= P[k]).double()
            / (1 - P[k]) for k, s in shapes.items()}


def _twin(params, batch, masks) -> tuple[float, dict[str, np.ndarray]]:
    """The network by hand in torch, with the given masks in place of F.dropout's."""
    p = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    m = {k: torch.as_tensor(np.asarray(v)) for k, v in masks.items()}
    x, t = torch.tensor(batch["x"]), torch.tensor(batch["t"])
    h = torch.tanh(F.linear(x, p["fc1.weight"], p["fc1.bias"])) * m["drop1"]
    h = torch.sigmoid(F.linear(h, p["fc2.weight"], p["fc2.bias"])) * m["drop2"]
    loss = F.mse_loss(F.linear(h, p["out.weight"], p["out.bias"]), t)
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy() for k, v in p.items()}


def _rel(got: object, want: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def test_same_seed_same_mask_and_eval_is_identity(net) -> None:
    _, modules = net
    np_mod = modules["numpy"]
    params = np_mod.init_params(0)
    batch = _batch()
    eval_loss = np_mod.loss(params, **batch)
    assert np_mod.loss(params, **batch, training=False, seed=3) == eval_loss
    a = np_mod.loss(params, **batch, seed=3)
    assert a == np_mod.loss(params, **batch, training=True, seed=3)
    assert a == np_mod.loss_and_grad(params, **batch, seed=3)[0]
    assert a != np_mod.loss(params, **batch, seed=4) and a != eval_loss
    # seed=None with training=True: fresh masks each call
    draws = {float(np_mod.loss(params, **batch, training=True)) for _ in range(4)}
    assert len(draws) > 1
    # the prediction: dropout only when asked
    assert np.array_equal(np_mod.forward(params, x=batch["x"]),
                          np_mod.forward(params, x=batch["x"], training=False, seed=1))
    assert not np.array_equal(np_mod.forward(params, x=batch["x"]),
                              np_mod.forward(params, x=batch["x"], seed=1))

    t_mod = modules["torch"]
    tparams = t_mod.init_params(0, dtype=torch.float64)
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    assert abs(float(t_mod.loss(tparams, **tbatch)) - eval_loss) <= 1e-12
    b = t_mod.loss(tparams, **tbatch, seed=3)
    assert torch.equal(b, t_mod.loss(tparams, **tbatch, seed=3))
    assert torch.equal(b, t_mod.loss_and_grad(tparams, **tbatch, seed=3)[0])
    assert not torch.equal(b, t_mod.loss(tparams, **tbatch, seed=4))


def test_eval_mode_equals_the_network_without_dropout(net, tmp_path) -> None:
    _, modules = net
    plain_text = "\n".join(line for line in DROP.splitlines() if "dropout" not in line)
    _, plain = build(tmp_path, plain_text)
    params = modules["numpy"].init_params(2)
    batch = _batch()
    want_loss = plain["numpy"].loss(params, **batch)
    assert abs(modules["numpy"].loss(params, **batch) - want_loss) <= 1e-14 * want_loss
    _, grads = modules["numpy"].loss_and_grad(params, **batch)
    _, want = plain["numpy"].loss_and_grad(params, **batch)
    for name in want:  # (the same up to rounding: the mask of ones is multiplied in)
        assert _rel(grads[name], want[name]) <= 1e-13, name
    model = modules["torch"].Model(seed=2, dtype=torch.float64).eval()
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    loss = model(**tbatch)
    assert abs(float(loss.detach()) - plain["numpy"].loss(params, **batch)) <= 1e-12


def test_p_zero_is_the_identity(tmp_path) -> None:
    text = DROP.replace("p: 0.3", "p: 0.0").replace("p: 0.5", "p: 0")
    _, modules = build(tmp_path, text)
    assert "_dropout_mask" not in open(modules["numpy"].__file__).read()
    params = modules["numpy"].init_params(0)
    batch = _batch()
    assert modules["numpy"].loss(params, **batch) == modules["numpy"].loss(params, **batch,
                                                                           training=True)


def test_training_gradient_matches_finite_differences_at_the_seed(net) -> None:
    """The gradient is that of the loss for the mask the seed draws."""
    _, modules = net
    module = modules["numpy"]
    params = module.init_params(1)
    batch = _batch(2)
    _, grads = module.loss_and_grad(params, **batch, seed=11)
    h = 6e-6
    rng = np.random.default_rng(0)
    for name, value in params.items():
        direction = rng.normal(size=value.shape)
        plus = {**params, name: value + h * direction}
        minus = {**params, name: value - h * direction}
        fd = (module.loss(plus, **batch, seed=11) - module.loss(minus, **batch, seed=11)) / (2 * h)
        exact = float(np.sum(grads[name] * direction))
        assert abs(fd - exact) <= 1e-6 * max(1.0, abs(exact)), name
        # the eval-mode gradient is another one: the check can fail
        _, other = module.loss_and_grad(params, **batch)
        assert abs(float(np.sum(other[name] * direction)) - fd) > 1e-6, name


def test_numpy_masks_as_documented_against_the_torch_twin(net) -> None:
    _, modules = net
    module = modules["numpy"]
    params = module.init_params(4)
    batch = _batch(3)
    masks = _numpy_masks(7)
    assert 0 < np.mean(masks["drop2"] == 0) < 1
    ref_loss, ref = _twin(params, batch, masks)
    loss, grads = module.loss_and_grad(params, **batch, seed=7)
    assert abs(float(loss) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name in module.TRAINABLE:
        assert _rel(grads[name], ref[name]) <= 1e-9, name


def test_torch_masks_as_documented_against_the_torch_twin(net) -> None:
    _, modules = net
    module = modules["torch"]
    params = module.init_params(4, dtype=torch.float64)
    batch = {k: torch.from_numpy(v) for k, v in _batch(3).items()}
    masks = _torch_masks(torch.Generator().manual_seed(7))
    ref_loss, ref = _twin({k: v.numpy() for k, v in params.items()},
                          {k: v.numpy() for k, v in batch.items()}, masks)
    loss, grads = module.loss_and_grad(params, **batch, seed=7)
    assert abs(float(loss) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name in module.TRAINABLE:
        assert _rel(grads[name].numpy(), ref[name]) <= 1e-9, name


def test_model_in_training_mode_draws_from_the_global_generator(net) -> None:
    _, modules = net
    model = modules["torch"].Model(seed=5, dtype=torch.float64)
    assert model.training
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    batch = _batch(4)
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    torch.manual_seed(123)
    loss = model(**tbatch)
    loss.backward()
    torch.manual_seed(123)
    masks = _torch_masks(None)
    ref_loss, ref = _twin(params, batch, masks)
    assert abs(float(loss.detach()) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name, param in model.named_parameters():
        assert _rel(param.grad.numpy(), ref[name]) <= 1e-9, name
    # the prediction in training mode is dropped out too; in eval mode it is not
    torch.manual_seed(5)
    first = model(x=tbatch["x"])
    model.eval()
    assert torch.equal(model(x=tbatch["x"]), model(x=tbatch["x"]))
    assert not torch.equal(first, model(x=tbatch["x"]))


def test_derivation_shows_the_mask(net) -> None:
    model, modules = net
    text = " ".join(modules["numpy"].DERIVATION_PASSES.values())
    assert "m_{" in text
    assert "drop1_mask" in open(modules["numpy"].__file__).read()
    graph = model.derivation.graph
    assert graph.nodes["drop1_mask"].role == "mask"


DROP_BAD = """name: m
inputs: {x: [N, 4]}
targets: {t: [N, 2]}
layers:
  - {name: fc, type: dense, units: 2}
  - {name: d, type: dropout, %s}
loss: {type: mse, target: t}
"""


@pytest.mark.parametrize("option,at,message", [
    ("p: 1", "1}", r"expected 0 <= p < 1, got 1\.0"),
    ("p: 1.5", "1.5", r"expected 0 <= p < 1"),
    ("p: -0.1", "-0.1", r"expected 0 <= p < 1"),
    ("p: .inf", ".inf", r"expected a finite number"),
    ("p: true", "true", r"expected a number, got a boolean"),
    ("p: half", "half", r"expected a number, got a string"),
    ("rate: 0.1", "rate", r"unknown key 'rate'"),
])
def test_bad_dropout_options(option: str, at: str, message: str) -> None:
    text = DROP_BAD % option
    line = text.splitlines()[5]
    with pytest.raises(SpecError, match=rf"^m\.yaml:6:{line.index(at) + 1}: .*{message}"):
        parse_spec(text, "m.yaml")


def test_training_names_no_input_beside_dropout(tmp_path, capsys) -> None:
    """`training` is a keyword of the functions of a spec with dropout; a layer of that
    name is refused anyway (torch.nn.Module's flag)."""
    text = DROP_BAD.replace("x:", "training:").replace("units: 2}", "units: 2, "
                                                       "input: training}") % "p: 0.1"
    path = write_spec(tmp_path, text, "m.yaml")
    assert main(["generate", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:2:10: inputs.training: 'training' is the keyword the "
                          "generated functions take for dropout (layer 'd')"), err
    _, modules = build(tmp_path, text.replace("type: dropout, p: 0.1", "type: activation, "
                                              "activation: tanh"))
    assert "training" in modules["numpy"].INPUT_SHAPES


BLOCK_DROP = """name: block_drop
inputs: {x: [N, 4]}
targets: {t: [N, 3]}
blocks:
  res:
    inputs: [x]
    layers:
      - {name: c_fc, type: dense, units: 6, activation: tanh}
      - {name: drop, type: dropout, p: 0.4}
      - {name: c_proj, type: dense, units: 4}
      - {name: out, type: add, input: [x, c_proj]}
layers:
  - {name: h, type: res, repeat: 2}
  - {name: head, type: dense, units: 3, input: h}
loss: {type: mse, target: t}
"""


class _ResTwin(torch.nn.Module):
    """The repeated block by hand, as torch users write it; dropout takes a given mask."""

    def __init__(self) -> None:
        super().__init__()
        self.h = torch.nn.ModuleList(torch.nn.ModuleDict(
            {"c_fc": torch.nn.Linear(4, 6), "c_proj": torch.nn.Linear(6, 4)}) for _ in range(2))
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x, masks):
        for block, mask in zip(self.h, masks, strict=True):
            x = x + block["c_proj"](torch.tanh(block["c_fc"](x)) * mask)
        return self.head(x)


def test_model_train_and_eval_with_dropout_inside_repeated_blocks(tmp_path) -> None:
    """``Model.train()`` draws one mask per repetition of the block from torch's global
    generator (h.0 first); ``Model.eval()`` is the identity; toggling back draws again."""
    _, modules = build(tmp_path, BLOCK_DROP)
    model = modules["torch"].Model(seed=3, dtype=torch.float64)
    twin = _ResTwin().double()
    twin.load_state_dict(model.state_dict())
    assert list(twin.state_dict()) == list(model.state_dict())
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(size=(N, 4)))
    t = torch.from_numpy(rng.normal(size=(N, 3)))

    def check(masks, seed: int | None) -> torch.Tensor:
        model.zero_grad()
        twin.zero_grad()
        if seed is not None:
            torch.manual_seed(seed)
        loss = model(x=x, t=t)
        loss.backward()
        ref = F.mse_loss(twin(x, masks), t)
        ref.backward()
        assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-9 * abs(float(ref.detach()))
        grads = dict(twin.named_parameters())
        for name, param in model.named_parameters():
            assert _rel(param.grad.numpy(), grads[name].grad.numpy()) <= 1e-9, name
        return loss.detach()

    def drawn(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [(torch.rand((N, 6), dtype=torch.float64) >= 0.4).double() / 0.6
                for _ in range(2)]

    assert model.training
    masks = drawn(17)
    assert all(0 < float((m == 0).double().mean()) < 1 for m in masks)
    assert not torch.equal(masks[0], masks[1])  # each repetition draws its own
    trained = check(masks, 17)
    ones = [torch.ones(N, 6, dtype=torch.float64)] * 2
    model.eval()
    assert not model.training
    evaluated = check(ones, 17)
    assert torch.equal(evaluated, check(ones, None))  # deterministic, no draw
    assert not torch.equal(trained, evaluated)
    # the prediction too: identity in eval mode, dropped out again after train()
    with torch.no_grad():
        assert torch.allclose(model(x=x), twin(x, ones), rtol=1e-12, atol=0)
        model.train()
        torch.manual_seed(23)
        assert torch.allclose(model(x=x), twin(x, drawn(23)), rtol=1e-12, atol=0)
    check(drawn(29), 29)
