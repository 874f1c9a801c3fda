"""LoRA adapters on dense layers and shared (tied) parameters.

Every gradient is compared with an independent torch model written by hand as peft
computes LoRA (``F.linear(x, W, b) + (x @ A.T @ B.T) * alpha / r``) and differentiated by
torch autograd, in float64, for numpy ``loss_and_grad``, torch ``loss_and_grad`` and the
torch ``Model``; the step's products are checked structurally (no B A, nothing
N x out x in wide); ``merge_lora`` is checked against the same network without adapters.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from symbackprop.check import finite_differences
from symbackprop.cli import main
from symbackprop.emit.render import _lower
from symbackprop.errors import SpecError
from symbackprop.ir import passes
from symbackprop.spec import parse as parse_spec

from conftest import build, write_spec

LORA = """name: lora_net
inputs: {x: [N, 7]}
targets: {t: [N, 3]}
layers:
  - {name: fc1, type: dense, units: 5, activation: tanh, lora: {rank: 2, alpha: 4}}
  - {name: fc2, type: dense, units: 4, activation: sigmoid, lora: {rank: 3, alpha: 1.5}%s}
  - {name: out, type: dense, units: 3}
loss: {type: mse, target: t}
"""

PLAIN = """name: lora_net
inputs: {x: [N, 7]}
targets: {t: [N, 3]}
layers:
  - {name: fc1, type: dense, units: 5, activation: tanh}
  - {name: fc2, type: dense, units: 4, activation: sigmoid}
  - {name: out, type: dense, units: 3}
loss: {type: mse, target: t}
"""

SCALE = {"fc1": 4 / 2, "fc2": 1.5 / 3}


def _random_params(module, seed: int = 0) -> dict[str, np.ndarray]:
    """Every parameter random (lora_B too: at its zero init, dA would be zero)."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(scale=0.5, size=v) for k, v in module.PARAM_SHAPES.items()}


def _batch(n: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 7)), "t": rng.normal(size=(n, 3))}


def _twin_loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network by hand, peft-style: base linear plus the scaled low-rank path."""
    def lora_linear(h: torch.Tensor, name: str) -> torch.Tensor:
        base = F.linear(h, p[f"{name}.weight"], p[f"{name}.bias"])
        a, b = p[f"{name}.lora_A"], p[f"{name}.lora_B"]
        return base + (h @ a.T @ b.T) * SCALE[name]

    h1 = torch.tanh(lora_linear(x, "fc1"))
    h2 = torch.sigmoid(lora_linear(h1, "fc2"))
    out = F.linear(h2, p["out.weight"], p["out.bias"])
    return F.mse_loss(out, t)


def _twin(params: dict[str, np.ndarray], batch: dict[str, np.ndarray],
          trainable: tuple[str, ...]) -> tuple[float, dict[str, np.ndarray]]:
    p = {k: torch.tensor(v, requires_grad=k in trainable) for k, v in params.items()}
    loss = _twin_loss(p, torch.tensor(batch["x"]), torch.tensor(batch["t"]))
    grads = torch.autograd.grad(loss, [p[k] for k in trainable])
    return float(loss.detach()), {k: g.numpy() for k, g in zip(trainable, grads, strict=True)}


def _rel(got: object, want: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return build(tmp_path_factory.mktemp("lora"), LORA % "")


def test_lora_freezes_the_base_and_adds_adapters(lora) -> None:
    _, modules = lora
    for module in modules.values():
        assert module.PARAM_SHAPES["fc1.lora_A"] == (2, 7)
        assert module.PARAM_SHAPES["fc1.lora_B"] == (5, 2)
        assert module.PARAM_SHAPES["fc2.lora_A"] == (3, 5)
        assert module.PARAM_SHAPES["fc2.lora_B"] == (4, 3)
        assert set(module.TRAINABLE) == {"fc1.lora_A", "fc1.lora_B", "fc2.lora_A",
                                         "fc2.lora_B", "out.weight", "out.bias"}
    net = modules["torch"].Model(dtype=torch.float64)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_lora_init_as_peft(lora) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a = sqrt(5)), B = 0; the two
    backends draw the same numbers."""
    _, modules = lora
    params = modules["numpy"].init_params(3)
    same = modules["torch"].init_params(3, dtype=torch.float64)
    for name, value in params.items():
        assert np.array_equal(same[name].numpy(), value), name
    a = params["fc1.lora_A"]
    assert np.all(np.abs(a) <= 1 / math.sqrt(7)) and np.max(np.abs(a)) > 0.5 / math.sqrt(7)
    assert np.all(params["fc1.lora_B"] == 0) and np.all(params["fc2.lora_B"] == 0)
    # torch's own bound for kaiming_uniform_(a=sqrt(5)) on an r x in matrix
    probe = torch.empty(2, 7, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(probe, a=math.sqrt(5))
    assert float(probe.abs().max()) <= 1 / math.sqrt(7)


def test_lora_gradients_match_the_peft_style_twin(lora) -> None:
    _, modules = lora
    params = _random_params(modules["numpy"])
    batch = _batch()
    trainable = modules["numpy"].TRAINABLE
    ref_loss, ref = _twin(params, batch, trainable)

    loss, grads = modules["numpy"].loss_and_grad(params, **batch)
    assert set(grads) == set(trainable)
    assert abs(float(loss) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name in trainable:
        assert _rel(grads[name], ref[name]) <= 1e-9, name

    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    loss, grads = modules["torch"].loss_and_grad(tparams, **tbatch)
    assert set(grads) == set(trainable)
    assert abs(float(loss) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name in trainable:
        assert _rel(grads[name].numpy(), ref[name]) <= 1e-9, name

    net = modules["torch"].Model(dtype=torch.float64)
    net.load_state_dict(tparams)
    loss = net(**tbatch)
    loss.backward()
    assert abs(float(loss.detach()) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name, param in net.named_parameters():
        if name in trainable:
            assert _rel(param.grad.numpy(), ref[name]) <= 1e-9, name
        else:
            assert param.grad is None, name


def test_lora_gradients_match_finite_differences(lora) -> None:
    _, modules = lora
    params = _random_params(modules["numpy"], seed=4)
    errors = finite_differences(modules["numpy"], params, _batch(seed=5))
    assert set(errors) == set(modules["numpy"].TRAINABLE)
    for name, (_, rel) in errors.items():
        assert rel <= 1e-6, name


def test_lora_step_is_low_rank(lora) -> None:
    """The training step pairs x with A first: no statement multiplies A and B together,
    and no array is out x in wide (fc1: 5 x 7, fc2: 4 x 5), let alone N x out x in; the
    frozen weights get no gradient statement."""
    model, modules = lora
    deriv = model.derivation
    program = _lower(deriv, seed_argument=False)
    stmts = passes.function(program, [deriv.graph.loss, *deriv.grads.values()])
    assert stmts
    for stmt in stmts:
        shape = {int(d) for d in program.shapes.get(stmt.target, ()) if d.is_Integer}
        assert not ({5, 7} <= shape or {4, 5} <= shape), (stmt.target, shape)
        for layer in ("fc1", "fc2"):
            assert not {f"{layer}_lora_A", f"{layer}_lora_B"} <= set(stmt.reads), stmt.target
        assert stmt.target not in {"d_fc1_weight", "d_fc1_bias", "d_fc2_weight",
                                   "d_fc2_bias"}
    source = inspect.getsource(modules["torch"].loss_and_grad)
    assert "d_fc1_weight" not in source and "d_fc2_bias" not in source
    assert "fc1_lora_xA" in source  # the narrow N x r projection


WIDE = """name: wide
inputs: {x: [N, 4]}
targets: {t: [N, 1]}
layers:
  - {name: pre, type: dense, units: 300, activation: tanh}
  - {name: fc, type: dense, units: 200, activation: tanh, lora: {rank: 2, alpha: 4}}
  - {name: out, type: dense, units: 1}
loss: {type: mse, target: t}
"""


def test_lora_step_memory_is_narrow(tmp_path) -> None:
    """What the numpy step allocates, traced: B A alone (200 x 300 float64) is 480 kB and
    an N x out x in product 9.6 MB; the step's own arrays are N x in (48 kB) or narrower.
    (A layer before the adapter makes the step send the gradient through it.)"""
    import tracemalloc

    _, modules = build(tmp_path, WIDE)
    module = modules["numpy"]
    params = _random_params(module)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(20, 4)), "t": rng.normal(size=(20, 1))}
    module.loss_and_grad(params, **batch)  # warm up
    tracemalloc.start()
    try:
        _, grads = module.loss_and_grad(params, **batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert set(grads) == {"pre.weight", "pre.bias", "fc.lora_A", "fc.lora_B", "out.weight",
                          "out.bias"}
    assert peak < 400_000, peak
    merged = module.merge_lora(params)  # the check can fail: merging does allocate B A
    del merged
    tracemalloc.start()
    try:
        module.merge_lora(params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= 480_000


def test_merge_lora_gives_the_plain_network(lora, tmp_path) -> None:
    _, modules = lora
    _, plain = build(tmp_path, PLAIN)
    params = _random_params(modules["numpy"], seed=7)
    x = _batch()["x"]
    merged = modules["numpy"].merge_lora(params)
    assert set(merged) == set(plain["numpy"].PARAM_SHAPES)
    want = modules["numpy"].forward(params, x=x)
    got = plain["numpy"].forward(merged, x=x)
    assert np.max(np.abs(got - want)) <= 1e-12
    # W + (alpha/r) B A, by hand
    w = params["fc1.weight"] + 2.0 * params["fc1.lora_B"] @ params["fc1.lora_A"]
    assert np.allclose(merged["fc1.weight"], w, rtol=1e-15, atol=1e-15)
    assert merged["out.weight"] is params["out.weight"]

    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    tmerged = modules["torch"].merge_lora(tparams)
    assert set(tmerged) == set(plain["torch"].PARAM_SHAPES)
    got = plain["torch"].forward(tmerged, x=torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - want)) <= 1e-12
    net = plain["torch"].Model(dtype=torch.float64)
    net.load_state_dict(tmerged)  # loads straight into the network without adapters
    with pytest.raises(ValueError, match="fc1.lora_B"):
        modules["numpy"].merge_lora({k: v for k, v in params.items() if k != "fc1.lora_B"})


def test_plain_networks_have_no_merge_lora(tmp_path) -> None:
    _, modules = build(tmp_path, PLAIN)
    assert not hasattr(modules["numpy"], "merge_lora")
    assert not hasattr(modules["torch"], "merge_lora")


def test_trainable_base_weight_under_lora(tmp_path) -> None:
    """trainable: {weight: true} keeps training the base weight beside the adapter."""
    _, modules = build(tmp_path, LORA % ", trainable: {weight: true}")
    assert "fc2.weight" in modules["numpy"].TRAINABLE
    assert "fc2.bias" not in modules["numpy"].TRAINABLE
    params = _random_params(modules["numpy"])
    batch = _batch()
    trainable = modules["numpy"].TRAINABLE
    ref_loss, ref = _twin(params, batch, trainable)
    loss, grads = modules["numpy"].loss_and_grad(params, **batch)
    for name in trainable:
        assert _rel(grads[name], ref[name]) <= 1e-9, name


TIED = """name: tied
inputs: {x: [N, 4]}
targets: {t: [N, 2]}
layers:
  - {name: enc, type: dense, units: 4, activation: tanh}
  - {name: dec, type: dense, units: 4, weight: enc.weight, activation: sigmoid}
  - {name: head, type: dense, units: 2, bias: false}
  - {name: twin, type: dense, units: 2, bias: false, weight: head.weight, input: enc}
  - {name: both, type: add, input: [head, twin]}
loss: {type: mse, target: t, prediction: both}
"""


def test_tied_weight_gradient_is_the_sum_over_uses(tmp_path) -> None:
    _, modules = build(tmp_path, TIED)
    for module in modules.values():
        assert list(module.PARAM_SHAPES) == ["enc.weight", "enc.bias", "dec.bias",
                                             "head.weight"]
    net = modules["torch"].Model(dtype=torch.float64)
    assert list(net.state_dict()) == ["enc.weight", "enc.bias", "dec.bias", "head.weight"]

    rng = np.random.default_rng(2)
    params = {k: rng.normal(scale=0.7, size=v)
              for k, v in modules["numpy"].PARAM_SHAPES.items()}
    batch = {"x": rng.normal(size=(5, 4)), "t": rng.normal(size=(5, 2))}

    # The twin unties every use into its own copy; the tied gradient is their sum.
    names = ("w_enc", "w_dec", "b_enc", "b_dec", "w_head", "w_twin")
    copies = dict(zip(names, (params["enc.weight"], params["enc.weight"], params["enc.bias"],
                              params["dec.bias"], params["head.weight"],
                              params["head.weight"]), strict=True))
    p = {k: torch.tensor(v, requires_grad=True) for k, v in copies.items()}
    x, t = torch.tensor(batch["x"]), torch.tensor(batch["t"])
    enc = torch.tanh(F.linear(x, p["w_enc"], p["b_enc"]))
    dec = torch.sigmoid(F.linear(enc, p["w_dec"], p["b_dec"]))
    both = F.linear(dec, p["w_head"]) + F.linear(enc, p["w_twin"])
    loss = F.mse_loss(both, t)
    loss.backward()
    want = {"enc.weight": (p["w_enc"].grad + p["w_dec"].grad).numpy(),
            "enc.bias": p["b_enc"].grad.numpy(), "dec.bias": p["b_dec"].grad.numpy(),
            "head.weight": (p["w_head"].grad + p["w_twin"].grad).numpy()}
    assert np.max(np.abs(p["w_dec"].grad.numpy())) > 1e-3  # both uses contribute

    got_loss, grads = modules["numpy"].loss_and_grad(params, **batch)
    assert abs(float(got_loss) - float(loss.detach())) <= 1e-9 * abs(float(loss.detach()))
    for name, value in want.items():
        assert _rel(grads[name], value) <= 1e-9, name
    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    _, grads = modules["torch"].loss_and_grad(tparams, **tbatch)
    for name, value in want.items():
        assert _rel(grads[name].numpy(), value) <= 1e-9, name
    net.load_state_dict(tparams)
    net(**tbatch).backward()
    for name, param in net.named_parameters():
        assert _rel(param.grad.numpy(), want[name]) <= 1e-9, name
    errors = finite_differences(modules["numpy"], params, batch)
    assert all(rel <= 1e-6 for _, rel in errors.values()), errors


def test_tied_to_a_frozen_parameter_stays_frozen(tmp_path) -> None:
    text = TIED.replace("activation: tanh}", "activation: tanh, trainable: {weight: false}}")
    _, modules = build(tmp_path, text)
    assert "enc.weight" not in modules["numpy"].TRAINABLE


BASE = """name: m
inputs: {x: [N, 4]}
targets: {t: [N, 2]}
layers:
  - {name: enc, type: dense, units: 4}
  - {name: fc, type: dense, units: 4, %s}
  - {name: out, type: dense, units: 2}
loss: {type: mse, target: t}
"""


@pytest.mark.parametrize("option,at,message", [
    ("lora: {rank: 0, alpha: 1}", "0,", r"lora\.rank: expected a positive integer, got 0"),
    ("lora: {rank: 1.5, alpha: 1}", "1.5", r"lora\.rank: expected a positive integer"),
    ("lora: {rank: true, alpha: 1}", "true", r"lora\.rank: expected a positive integer"),
    ("lora: {rank: 2, alpha: 0}", "0}", r"lora\.alpha: expected a positive number, got 0"),
    ("lora: {rank: 2, alpha: -1}", "-1", r"lora\.alpha: expected a positive number"),
    ("lora: {rank: 2, alpha: .nan}", ".nan", r"lora\.alpha: expected a positive number"),
    ("lora: {rank: 2, alpha: x}", "x}", r"lora\.alpha: expected a positive number"),
    ("lora: {rank: 2}", "{rank", r"lora needs an 'alpha'"),
    ("lora: {alpha: 2}", "{alpha", r"lora needs a 'rank'"),
    ("lora: {rank: 2, alpha: 2, dropout: 0.1}", "dropout",
     r"unknown key 'dropout' in lora \(allowed: rank, alpha\)"),
    ("lora: {rank: [2], alpha: 2}", "[2]", r"lora\.rank is a single value"),
    ("lora: 4", "4}", r"lora is a mapping \{rank, alpha\}, got an integer"),
    ("trainable: {lora_A: false}", "{lora_A", r"trainable names 'lora_A' but the layer has no "
                                              r"lora adapter"),
    ("weight: enc.weight, lora: {rank: 2, alpha: 2}", "{rank",
     r"lora on a layer whose weight is another layer's parameter is not supported"),
    ("weight: 3", "3", r"expected a parameter name such as 'fc1.weight', got 3"),
    ("weight: 'enc weight'", "'enc", r"expected a parameter name"),
])
def test_bad_options_are_spec_errors(option: str, at: str, message: str) -> None:
    text = BASE % option
    line = text.splitlines()[5]
    with pytest.raises(SpecError, match=rf"^m\.yaml:6:{line.index(at) + 1}: .*{message}"):
        parse_spec(text, "m.yaml")


@pytest.mark.parametrize("option,message", [
    ("weight: enc.wieght", r"unknown parameter 'enc\.wieght': no layer computed before 'fc' "
                           r"declares it \(declared so far: enc\.weight, enc\.bias\)"),
    ("weight: out.weight", r"unknown parameter 'out\.weight': no layer computed before"),
    ("weight: enc.bias", r"fc\.weight would be 'enc\.bias' of shape \[4\], but 'fc' needs "
                         r"weight of shape \[4, 4\]"),
    ("weight: enc.weight, units: 3", r"shape \[4, 4\], but 'fc' needs weight of shape "
                                     r"\[3, 4\] \(a shared parameter is used as it is, not "
                                     r"transposed\)"),
    ("weight: enc.weight, trainable: false", r"'fc' sets trainable false for weight, but it "
                                             r"shares 'enc\.weight', which is trainable"),
])
def test_bad_shared_parameters_exit_2(tmp_path, capsys, option: str, message: str) -> None:
    """Errors found while building the graph: file:line:col, exit code 2, nothing written."""
    text = BASE % option
    if "units: 3" in option:
        text = text.replace("units: 4, weight", "weight").replace("units: 3}", "units: 3}")
        text = text.replace("{name: fc, type: dense, weight: enc.weight, units: 3}",
                            "{name: fc, type: dense, units: 3, weight: enc.weight}")
    path = write_spec(tmp_path, text, "m.yaml")
    out = tmp_path / "out"
    assert main(["generate", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "m.yaml:6:" in err and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(message, err), err
    assert not out.exists() or not any(out.iterdir())
