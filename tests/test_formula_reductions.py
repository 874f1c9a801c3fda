"""Reductions inside formulas: sum, mean, max and logsumexp over axes, broadcast back.

Each network is compared with a torch twin written here by hand (``torch.mean``,
``torch.amax``, ``torch.logsumexp`` over the same axes, ``keepdim=True``) in float64, for
the loss and every trainable gradient of numpy, torch ``loss_and_grad`` and the torch
Model, and with finite differences (tests/twin.py). Bad reduction calls fail with one
located line and exit code 2.
"""

from __future__ import annotations

import numpy as np
import pytest

from symbackprop.cli import main

from conftest import write_spec

torch = pytest.importorskip("torch")
F = torch.nn.functional

from twin import check_twin, rel  # noqa: E402

NORM = """
name: norm
inputs: {x: [N, 4]}
targets: {t: [N, 3]}
layers:
  - {name: fc, type: dense, units: 3}
  - name: g
    type: elementwise
    input: [fc]
    formula: "(fc - mean(fc, axis=-1)) / sqrt(mean((fc - mean(fc, axis=-1))**2, axis=-1) + 0.1)"
  - name: h
    type: elementwise
    input: [g]
    formula: "g - logsumexp(g, axis=1) + 0.1*sum(g, axis=[0, 1])"
loss: {type: mse, prediction: h, target: t}
"""


def norm_twin(p, b):
    fc = F.linear(b["x"], p["fc.weight"], p["fc.bias"])
    c = fc - fc.mean(dim=-1, keepdim=True)
    g = c / torch.sqrt((c ** 2).mean(dim=-1, keepdim=True) + 0.1)
    h = g - torch.logsumexp(g, dim=1, keepdim=True) + 0.1 * g.sum()
    return F.mse_loss(h, b["t"])


def test_user_written_normalisation_matches_torch(tmp_build) -> None:
    _, mods = tmp_build(NORM)
    rng = np.random.default_rng(0)
    check_twin(mods, norm_twin, {"x": rng.normal(size=(6, 4)), "t": rng.normal(size=(6, 3))})


MAX = """
name: maxes
inputs: {x: [N, 4]}
targets: {t: [N, 3]}
layers:
  - {name: fc, type: dense, units: 3}
  - {name: g, type: elementwise, input: [fc], formula: "fc - max(fc, axis=-1) + max(fc, 0.5)"}
loss: {formula: "(y - t)**2 + 0.1*max(y*t, axis=[0, 1]) + 0.2*max(y)", prediction: g, target: t}
"""


def max_twin(p, b):
    fc = F.linear(b["x"], p["fc.weight"], p["fc.bias"])
    g = fc - torch.amax(fc, dim=-1, keepdim=True) + torch.maximum(fc, torch.tensor(0.5))
    t = b["t"]
    per = (g - t) ** 2 + 0.1 * torch.amax(g * t, dim=(0, 1), keepdim=True) + 0.2 * g.amax()
    return per.mean()


def test_max_over_axes_matches_torch_amax(tmp_build) -> None:
    _, mods = tmp_build(MAX)
    rng = np.random.default_rng(1)
    check_twin(mods, max_twin, {"x": rng.normal(size=(5, 4)), "t": rng.normal(size=(5, 3))})


def test_max_gradient_is_shared_evenly_between_ties_as_torch_amax(tmp_build) -> None:
    """Two equal output units tie in every row: each gets half of the gradient, which is
    what torch.amax's backward does (torch.max(dim) would pick one)."""
    _, mods = tmp_build(MAX)
    m = mods["numpy"]
    params = m.init_params(2)
    params["fc.weight"][1] = params["fc.weight"][0]
    params["fc.bias"][1] = params["fc.bias"][0] = 5.0  # the tied units are the maximum
    rng = np.random.default_rng(4)
    batch = {"x": rng.normal(size=(5, 4)) * 0.1, "t": rng.normal(size=(5, 3))}
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ref = max_twin(tparams, {k: torch.from_numpy(v) for k, v in batch.items()})
    ref.backward()
    loss, grads = m.loss_and_grad(params, **batch)
    assert rel(loss, ref.item()) <= 1e-12
    for k, p in tparams.items():
        assert rel(grads[k], p.grad.numpy()) <= 1e-9, k
    tl, tg = mods["torch"].loss_and_grad({k: torch.from_numpy(v) for k, v in params.items()},
                                         **{k: torch.from_numpy(v) for k, v in batch.items()})
    for k, p in tparams.items():
        assert rel(tg[k].numpy(), p.grad.numpy()) <= 1e-9, k
    # the max term alone: its gradient is split 1/2, 1/2 between the tied units
    g = np.asarray(torch.autograd.functional.jacobian(
        lambda z: torch.amax(z, dim=-1, keepdim=True), torch.ones(1, 3, dtype=torch.float64)))
    assert np.allclose(g.reshape(3), [1 / 3] * 3)


MAX_ABS = """
name: max_abs
inputs: {x: [N, 2]}
targets: {t: [N, 2]}
layers:
  - {name: fc, type: dense, units: 2}
  - {name: m, type: elementwise, input: [fc], formula: "max(fc, axis=-1)"}
loss: {formula: "abs(y - t)", target: t}
"""


def test_sign_of_a_stored_comparison_keeps_its_minus_one(tmp_build) -> None:
    """|y - t|'s derivative is where(y - t > 0, 1, where(y - t < 0, -1, 0)); with both
    comparisons stored as masks of their own, the -1 once took the masks' dtype (a
    boolean -1 is True): the gradient summed the signs' magnitudes. Against autograd."""
    _, mods = tmp_build(MAX_ABS)

    def twin(p, b):
        fc = F.linear(b["x"], p["fc.weight"], p["fc.bias"])
        return torch.abs(torch.amax(fc, dim=-1, keepdim=True) - b["t"]).mean()

    rng = np.random.default_rng(0)
    check_twin(mods, twin, {"x": rng.normal(size=(6, 2)), "t": rng.normal(size=(6, 2))})


RECIPROCAL = """
name: reciprocal
inputs: {x: [N, 2]}
targets: {t: [N, 2]}
layers:
  - {name: fc, type: dense, units: 2}
  - {name: ew, type: elementwise, input: fc, formula: "1/(1 + fc)"}
loss: {type: mse, target: t}
"""


def test_a_cubed_divisor_keeps_its_brackets(tmp_build) -> None:
    """1/(1 + fc)'s gradient divides by (1 + fc)**3, which numpy prints as a product of
    three reads: without brackets the divisor was one factor and the gradient wrong."""
    _, mods = tmp_build(RECIPROCAL)

    def twin(p, b):
        fc = F.linear(b["x"], p["fc.weight"], p["fc.bias"])
        return ((1 / (1 + fc) - b["t"]) ** 2).mean()

    rng = np.random.default_rng(2)
    check_twin(mods, twin, {"x": rng.normal(size=(6, 2)) * 0.1, "t": rng.normal(size=(6, 2))})


LOSS_AXIS = """
name: loss_axis
inputs: {x: [N, 3]}
targets: {t: [N, 3]}
layers:
  - {name: fc, type: dense, units: 3}
loss: {formula: "LOSS", target: t}
"""


@pytest.mark.parametrize("formula", ["logsumexp(y, axis=-1)",
                                     "logsumexp(y, axis=-1) - sum(t*y, axis=-1)"])
def test_loss_formula_with_a_row_reduction_is_the_mean_of_its_broadcast(tmp_build,
                                                                        formula) -> None:
    """A per-row reduction in a loss formula broadcasts back over the row, and the loss
    is the mean over every entry: a sum over an index the summand does not read (the
    broadcast axis) multiplies by its extent. The loss value was a third of the truth,
    and the second formula's loss an array."""
    _, mods = tmp_build(LOSS_AXIS.replace("LOSS", formula))

    def twin(p, b):
        y = F.linear(b["x"], p["fc.weight"], p["fc.bias"])
        per = torch.logsumexp(y, dim=-1, keepdim=True).expand_as(y)
        if "t*y" in formula:
            per = per - (b["t"] * y).sum(-1, keepdim=True)
        return per.mean()

    rng = np.random.default_rng(3)
    batch = {"x": rng.normal(size=(5, 3)), "t": rng.normal(size=(5, 3))}
    if "t*y" not in formula:  # a loss that reads no target takes none
        twin_on = twin

        def twin(p, b):  # noqa: F811 - the same twin with a target it ignores
            return twin_on(p, {**b, "t": torch.zeros(5, 3, dtype=torch.float64)})

        del batch["t"]
    check_twin(mods, twin, batch)
    assert np.ndim(mods["numpy"].loss(mods["numpy"].init_params(0), **batch)) == 0


SOFTMAX = """
name: act
inputs: {x: [N, 4]}
targets: {t: [N, 3]}
layers:
  - {name: fc, type: dense, units: 3, activation: {formula: "exp(x - logsumexp(x, axis=-1))"}}
loss: {type: mse, target: t}
"""


def test_activation_formula_with_a_reduction_is_a_stable_softmax(tmp_build) -> None:
    _, mods = tmp_build(SOFTMAX)
    rng = np.random.default_rng(2)

    def twin(p, b):
        return F.mse_loss(torch.softmax(F.linear(b["x"], p["fc.weight"], p["fc.bias"]), -1),
                          b["t"])

    check_twin(mods, twin, {"x": rng.normal(size=(4, 4)), "t": rng.normal(size=(4, 3))})
    # far from zero (logits about ±800): finite, and equal to torch's softmax
    m = mods["numpy"]
    params = m.init_params(0)
    x = rng.normal(size=(4, 4)) * 2000
    t = rng.normal(size=(4, 3))
    loss, grads = m.loss_and_grad(params, x=x, t=t)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
    tparams = {k: torch.tensor(v) for k, v in params.items()}
    assert rel(loss, twin(tparams, {"x": torch.from_numpy(x), "t": torch.from_numpy(t)})
               .item()) <= 1e-9


RANK3 = """
name: seq
inputs: {x: [N, T, 4]}
targets: {t: [N, T, 3]}
layers:
  - {name: fc, type: dense, units: 3}
  - name: g
    type: elementwise
    input: [fc]
    formula: "fc*sum(fc, axis=1) - mean(fc**2, axis=[-2, -1]) + logsumexp(fc, axis=0) + sum(fc)"
loss: {type: mse, prediction: g, target: t}
"""


def test_rank3_reductions_over_time_batch_and_several_axes(tmp_build) -> None:
    _, mods = tmp_build(RANK3)
    rng = np.random.default_rng(3)

    def twin(p, b):
        fc = F.linear(b["x"], p["fc.weight"], p["fc.bias"])
        g = (fc * fc.sum(dim=1, keepdim=True) - (fc ** 2).mean(dim=(-2, -1), keepdim=True)
             + torch.logsumexp(fc, dim=0, keepdim=True) + fc.sum())
        return F.mse_loss(g, b["t"])

    check_twin(mods, twin, {"x": rng.normal(size=(3, 5, 4)), "t": rng.normal(size=(3, 5, 3))})


BROADCAST = """
name: bc
inputs: {x: [N, 4]}
targets: {t: [N, 3]}
layers:
  - {name: a, type: dense, units: 3}
  - {name: b, type: dense, input: x, units: 1}
  - {name: g, type: elementwise, input: [a, b], formula: "a*sum(b, axis=-1) + mean(a*b, axis=-1)"}
loss: {type: mse, prediction: g, target: t}
"""


def test_a_reduction_over_an_axis_its_argument_does_not_span(tmp_build) -> None:
    """b is [N, 1]: sum(b, axis=-1) is b itself (numpy's b.sum(-1, keepdims=True))."""
    _, mods = tmp_build(BROADCAST)
    rng = np.random.default_rng(5)

    def twin(p, bt):
        a = F.linear(bt["x"], p["a.weight"], p["a.bias"])
        b = F.linear(bt["x"], p["b.weight"], p["b.bias"])
        g = a * b.sum(dim=-1, keepdim=True) + (a * b).mean(dim=-1, keepdim=True)
        return F.mse_loss(g, bt["t"])

    check_twin(mods, twin, {"x": rng.normal(size=(4, 4)), "t": rng.normal(size=(4, 3))})


def test_derivation_shows_each_reduction_and_its_broadcast_gradient(tmp_path, capsys) -> None:
    spec = write_spec(tmp_path, MAX)
    assert main(["latex", str(spec)]) == 0
    text = capsys.readouterr().out
    assert r"\max_{" in text                  # the maximum, printed as one
    assert r"\mathrm{ties1}_{\mathrm{g}" in text  # the ties it routes the gradient to
    assert r"\frac{\partial L}{\partial \mathbf{max1}_{\mathrm{g}}}" in text
    spec = write_spec(tmp_path, NORM, "norm.yaml")
    assert main(["latex", str(spec)]) == 0
    text = capsys.readouterr().out
    assert r"\mathrm{mean1}_{\mathrm{g}" in text
    assert r"\frac{\partial L}{\partial \mathbf{mean1}_{\mathrm{g}}}" in text


BAD = [
    ("sum(fc, axis=2)", r"axis 2 is out of range: the formula has 2 axes \(-2\.\.1\)"),
    ("mean(fc, axis=[-3])", r"axis -3 is out of range"),
    ("sum(fc, axis=[1, -1])", r"axis -1 is named twice"),
    ("sum(fc, axis=fc)", r"axis must be a constant integer"),
    ("sum(fc, axis=1.0)", r"axis must be a constant integer"),
    ("sum(fc, axis=[])", r"axis is an integer or a non-empty list"),
    ("sum(fc, dim=1)", r"sum\(\) takes one argument and optionally axis="),
    ("sum(fc, fc, axis=1)", r"sum\(\) takes one argument"),
    ("logsumexp(2, axis=1)", r"logsumexp\(\) of a constant"),
    ("max(fc, fc, axis=1)", r"max\(\) takes one argument"),
    ("sum(fc, axis=True)", r"axis must be a constant integer"),
    ("sum(fc, axis=99999999)", r"axis must be a constant integer"),
]


@pytest.mark.parametrize("formula,message", BAD, ids=[b[0] for b in BAD])
def test_bad_reduction_is_a_located_formula_error(tmp_path, capsys, formula, message) -> None:
    text = f"""
    name: bad
    inputs: {{x: [N, 4]}}
    targets: {{t: [N, 3]}}
    layers:
      - {{name: fc, type: dense, units: 3}}
      - {{name: g, type: elementwise, input: [fc], formula: "{formula}"}}
    loss: {{type: mse, target: t}}
    """
    spec = write_spec(tmp_path, text)
    out = tmp_path / "out"
    assert main(["generate", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{spec}:7:"), err
    assert "layers[1].formula" in err[0] and "(formula column" in err[0]
    assert __import__("re").search(message, err[0]), err[0]
    assert not out.exists()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "{formula: 'abs(x)'}"])
def test_a_mask_read_inside_a_reduction_stays_inside_it(tmp_path, activation) -> None:
    """A relu (any branch function) fused into a logsumexp over its axis had its mask
    lifted out of the sum by sympy, the summed index left outside (refused at
    lowering); the activation now stays a tensor of its own there."""
    spec = write_spec(tmp_path, f"""
name: masked_lse
inputs: {{x: [N, 2]}}
targets: {{t: [N, 2]}}
layers:
  - {{name: fc, type: dense, units: 2, activation: {activation}}}
  - {{name: ew, type: elementwise, input: [x, fc], formula: "logsumexp(x*fc, axis=-1)"}}
loss: {{type: mse, target: t}}
""")
    assert main(["check", str(spec)]) == 0


@pytest.mark.parametrize(("layers", "loss"), [
    # where() with a number in a branch: the oracle made the number in the condition's
    # dtype (True), so check failed on a right network or crashed with a bool matmul
    ("- {name: fc, type: dense, units: 2, activation: {formula: 'where(x > 0, 2, x)'}}",
     "{type: mse, target: t}"),
    ("- {name: fc, type: dense, units: 2}\n"
     "  - {name: e, type: elementwise, input: [fc], formula: 'where(fc > 0, 1, 2) * fc'}\n"
     "  - {name: out, type: dense, units: 2}", "{type: mse, target: t}"),
    ("- {name: fc, type: dense, units: 2, activation: "
     "{formula: 'x/(1 + exp(-x)) - where(x > 1, 0.5, 0.25)'}}", "{type: mse, target: t}"),
    ("- {name: fc, type: dense, units: 2}",
     "{formula: 'where(y > t, (y - t)**2, 0.5)', target: t}"),
    # an activation that is a reduction broadcasts back in the oracle too
    ("- {name: fc, type: dense, units: 2, activation: {formula: 'sum(x, axis=-1)'}}\n"
     "  - {name: out, type: dense, units: 2}", "{type: mse, target: t}"),
])
def test_oracle_reads_numbers_and_reductions_as_the_modules_do(tmp_path, layers, loss) -> None:
    spec = write_spec(tmp_path, f"""
name: oracle_forms
inputs: {{x: [N, 2]}}
targets: {{t: [N, 2]}}
layers:
  {layers}
loss: {loss}
""")
    assert main(["check", str(spec)]) == 0
