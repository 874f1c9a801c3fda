"""Composite losses, weight decay and parameter penalties in loss formulas.

Each network is compared with a torch twin written here by hand (F.mse_loss,
F.cross_entropy, explicit penalty terms) in float64 for the loss and every trainable
gradient of numpy, torch ``loss_and_grad`` and the torch Model, and with finite
differences (tests/twin.py). Weight decay is also checked against ``torch.optim.SGD``'s
own ``weight_decay``; bad specs fail with one located line and exit code 2.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from symbackprop.cli import main

from conftest import EXAMPLES, ROOT, write_spec

torch = pytest.importorskip("torch")
F = torch.nn.functional

from twin import check_twin, rel  # noqa: E402

L2 = 1e-4


def multitask_twin(p, b):
    h = torch.tanh(F.linear(b["x"], p["trunk1.weight"], p["trunk1.bias"]))
    h = torch.tanh(F.linear(h, p["trunk2.weight"], p["trunk2.bias"]))
    value = F.linear(h, p["regress.weight"], p["regress.bias"])
    logits = F.linear(h, p["classify.weight"], p["classify.bias"])
    decay = sum((p[k] ** 2).sum() for k in ("trunk1.weight", "trunk2.weight",
                                             "regress.weight", "classify.weight"))
    return (0.5 * F.mse_loss(value, b["value"]) + 1.0 * F.cross_entropy(logits, b["label"])
            + L2 / 2 * decay)


def _multitask_batch(n: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.dirichlet(np.ones(5), size=n)  # probability targets
    label[:3] = np.eye(5)[rng.integers(0, 5, 3)]  # and one-hot rows
    return {"x": rng.normal(size=(n, 16)), "value": rng.normal(size=(n, 2)), "label": label}


def test_multitask_example_matches_torch(tmp_path) -> None:
    from conftest import build

    _, mods = build(tmp_path, (EXAMPLES / "multitask.yaml").read_text())
    check_twin(mods, multitask_twin, _multitask_batch())
    # forward() returns the first term's prediction
    m = mods["numpy"]
    params = m.init_params(1)
    batch = _multitask_batch()
    tp = {k: torch.from_numpy(v) for k, v in params.items()}
    h = torch.tanh(F.linear(torch.from_numpy(batch["x"]), tp["trunk1.weight"],
                            tp["trunk1.bias"]))
    h = torch.tanh(F.linear(h, tp["trunk2.weight"], tp["trunk2.bias"]))
    want = F.linear(h, tp["regress.weight"], tp["regress.bias"]).numpy()
    assert rel(m.forward(params, x=batch["x"]), want) <= 1e-12


def test_generated_multitask_is_up_to_date() -> None:
    assert main(["generate", str(EXAMPLES / "multitask.yaml"), "--out",
                 str(ROOT / "generated"), "--check"]) == 0


def test_weight_decay_step_equals_torch_optim_weight_decay(tmp_path) -> None:
    """One SGD step with the generated gradient (which includes the decay term) equals
    torch.optim.SGD(weight_decay=l2) on the loss without it."""
    from conftest import build

    _, mods = build(tmp_path, (EXAMPLES / "multitask.yaml").read_text())
    m = mods["numpy"]
    params = m.init_params(2)
    batch = _multitask_batch(seed=3)
    _, grads = m.loss_and_grad(params, **batch)
    lr = 0.1
    stepped = {k: v - lr * grads[k] for k, v in params.items()}

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    decayed = [tp[k] for k in tp if k.endswith(".weight")]
    plain = [tp[k] for k in tp if k.endswith(".bias")]
    opt = torch.optim.SGD([{"params": decayed, "weight_decay": L2},
                           {"params": plain, "weight_decay": 0.0}], lr=lr)
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}

    def undecayed(p, b):
        return multitask_twin(p, b) - L2 / 2 * sum((p[k] ** 2).sum() for k in p
                                                    if k.endswith(".weight"))

    undecayed(tp, tb).backward()
    opt.step()
    for k, v in tp.items():
        assert rel(stepped[k], v.detach().numpy()) <= 1e-12, k


PENALTY = """
name: pen
inputs: {x: [N, 4]}
targets: {t: [N, 3], u: [N, 2]}
layers:
  - {name: fc1, type: dense, units: 5, activation: tanh}
  - {name: fc2, type: dense, units: 3}
  - {name: fc3, type: dense, input: fc1, units: 2, trainable: {weight: false}}
loss:
  - {type: mse, prediction: fc2, target: t}
  - {formula: "log(cosh(y - t)) + 0.1*mean(fc3.bias**2)", prediction: fc3, target: u, weight: 0.25}
  - formula: "0.01*sum(abs(fc1.weight)) + 0.02*max(fc2.bias) + logsumexp(fc2.weight)/50"
    weight: 2
weight_decay: {l2: 0.001, params: [fc2.weight, fc1.bias, fc3.weight]}
"""


def penalty_twin(p, b):
    h = torch.tanh(F.linear(b["x"], p["fc1.weight"], p["fc1.bias"]))
    a = F.linear(h, p["fc2.weight"], p["fc2.bias"])
    c = F.linear(h, p["fc3.weight"], p["fc3.bias"])
    term2 = (torch.log(torch.cosh(c - b["u"])) + 0.1 * (p["fc3.bias"] ** 2).mean()).mean()
    term3 = (0.01 * p["fc1.weight"].abs().sum() + 0.02 * p["fc2.bias"].amax()
             + torch.logsumexp(p["fc2.weight"].reshape(-1), 0) / 50)
    decay = sum((p[k] ** 2).sum() for k in ("fc2.weight", "fc1.bias", "fc3.weight"))
    return F.mse_loss(a, b["t"]) + 0.25 * term2 + 2 * term3 + 0.001 / 2 * decay


def test_penalties_on_parameters_and_listed_weight_decay(tmp_build) -> None:
    _, mods = tmp_build(PENALTY)
    rng = np.random.default_rng(1)
    check_twin(mods, penalty_twin, {"x": rng.normal(size=(5, 4)), "t": rng.normal(size=(5, 3)),
                                    "u": rng.normal(size=(5, 2))})
    assert "fc3.weight" not in mods["numpy"].TRAINABLE  # frozen: a constant of the loss


def test_latex_shows_the_weighted_sum_and_the_decay_gradient(tmp_path, capsys) -> None:
    assert main(["latex", str(EXAMPLES / "multitask.yaml")]) == 0
    text = capsys.readouterr().out
    assert "L & = 0.5 L_{1} + L_{2} + R" in text
    assert r"R & = 5.0 \cdot 10^{-5} \sum_{i=1}^{5} \sum_{j=1}^{32}" in text  # (l2/2) sum W^2
    # the decay term's gradient: l2 W, beside the backpropagated part
    assert (r"\boldsymbol{\varepsilon}_{\mathrm{trunk1}}^{\top} \mathbf{x} + 0.0001 \left("
            r"\frac{\partial L}{\partial R}\right) \odot \mathbf{W}_{\mathrm{trunk1}}") in text
    assert r"\frac{\partial L}{\partial R} & = 1" in text


def test_one_weighted_term_is_weighted(tmp_build) -> None:
    text = """
    name: one
    inputs: {x: [N, 4]}
    targets: {t: [N, 3]}
    layers:
      - {name: fc, type: dense, units: 3}
    loss:
      - {type: mse, prediction: fc, target: t, weight: 0.5}
    """
    _, mods = tmp_build(text)
    rng = np.random.default_rng(2)

    def twin(p, b):
        return 0.5 * F.mse_loss(F.linear(b["x"], p["fc.weight"], p["fc.bias"]), b["t"])

    check_twin(mods, twin, {"x": rng.normal(size=(4, 4)), "t": rng.normal(size=(4, 3))})


def _spec_with(tmp_path, loss: str, extra: str = "") -> object:
    text = f"""
    name: bad
    inputs: {{x: [N, 4]}}
    targets: {{t: [N, 3]}}
    layers:
      - {{name: fc, type: dense, units: 3}}
    loss: {loss}
    {extra}
    """
    return write_spec(tmp_path, text)


BAD = [
    ("[]", "", 7, r"loss: a composite loss is a non-empty list of loss terms"),
    ("[{type: mse, prediction: fc, target: t, weight: -1}]", "", 7,
     r"loss\[0\]\.weight: a loss weight is a number in \(0, 1e6\]"),
    ("[{type: mse, prediction: fc, target: t, weight: .nan}]", "", 7,
     r"loss\[0\]\.weight: expected a finite number"),
    ("[{type: mse, prediction: fc, target: t, weight: heavy}]", "", 7,
     r"loss\[0\]\.weight: expected a number"),
    ("[{type: mse, prediction: nope, target: t}]", "", 7,
     r"prediction 'nope' is not a layer name"),
    ("[{type: mse, target: t}]", "", 7, r"each term of a composite loss names its 'prediction'"),
    ("{type: mse, target: t, weight: 2}", "", 7, r"'weight' belongs to a term of a composite"),
    ("{type: mse, target: t}", "weight_decay: {l2: 1e-4, params: [fc.weigth]}", 8,
     r"unknown parameter 'fc.weigth' \(parameters: fc.bias, fc.weight\)"),
    ("{type: mse, target: t}", "weight_decay: {l2: -1}", 8, r"l2 is a number in \[0, 1e6\]"),
    ("{type: mse, target: t}", "weight_decay: {l2: 1e-4, decay: 2}", 8,
     r"unknown key 'decay' in weight_decay"),
    ("{type: mse, target: t}", "weight_decay: {params: [fc.weight]}", 8,
     r"weight_decay needs 'l2'"),
    ("{type: mse, target: t}", "weight_decay: {l2: 1e-4, params: ['fc.weight; import os']}", 8,
     r"not a parameter name"),
    ("[{type: mse, prediction: fc, target: t}, {formula: '0.1*fc.weight'}]", "", 7,
     r"a parameter in a loss formula is read inside a reduction over all its axes"),
    ("[{type: mse, prediction: fc, target: t}, {formula: 'sum(fc.wieght)'}]", "", 7,
     r"unknown parameter 'fc.wieght' \(parameters: fc.bias, fc.weight\)"),
    ("[{type: mse, prediction: fc, target: t}, {formula: 'sum(fc.weight.__class__)'}]", "", 7,
     r"unknown parameter 'fc.weight.__class__'"),
    ("[{formula: 'sum(fc.weight**2)'}]", "", 7, r"no loss term names a prediction"),
]


@pytest.mark.parametrize("loss,extra,line,message", BAD, ids=[f"{b[0]} {b[1]}" for b in BAD])
def test_bad_composite_loss_is_a_located_error(tmp_path, capsys, loss, extra, line,
                                               message) -> None:
    spec = _spec_with(tmp_path, loss, extra)
    out = tmp_path / "out"
    assert main(["generate", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{spec}:{line}:"), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


@pytest.mark.parametrize("layers, loss", [
    # a softmax layer named sm builds sm_lse; the cross-entropy over sm builds its own
    ("  - {name: fc, type: dense, units: 3}\n  - {name: sm, type: softmax}",
     "loss: {type: softmax_cross_entropy, target: t}"),
    # two cross-entropy terms over the same prediction: one log-sum-exp each
    ("  - {name: fc, type: dense, units: 3}",
     "loss:\n  - {type: softmax_cross_entropy, prediction: fc, target: t}\n"
     "  - {type: softmax_cross_entropy, prediction: fc, target: t, weight: 0.5}"),
])
def test_loss_intermediates_never_clash_with_other_names(tmp_path, layers, loss) -> None:
    """Both were refused with "'sm_lse' names two tensors of the network"."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: s\ninputs: {{x: [N, 2]}}\ntargets: {{t: [N, 3]}}\nlayers:\n"
                    f"{layers}\n{loss}\n")
    assert main(["check", str(spec)]) == 0
