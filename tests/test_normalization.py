"""layernorm, rmsnorm, softmax (causal too) and the gelu_tanh activation.

Each network is checked in float64 against central finite differences and against a
hand-written torch model (F.layer_norm, F.rms_norm, F.softmax, a manual causal mask,
F.gelu(approximate="tanh")) that shares nothing with the layers' own ``reference``
functions, in numpy and torch ``loss_and_grad`` and the torch ``Model``. Parameters are
drawn at random (not the ones/zeros init), so the affine parts are exercised too.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from symbackprop.api import compile_text
from symbackprop.check import finite_differences
from symbackprop.errors import SpecError
from symbackprop.graph import Graph, Node
from symbackprop.ir.lower import Lowerer
from symbackprop.layers import LAYERS, Layer, Param
from symbackprop.spec import LayerSpec

from conftest import ROOT, write_spec

Hand = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


def _causal(z: torch.Tensor) -> torch.Tensor:
    t = z.shape[-1]
    future = torch.arange(t)[None, :] > torch.arange(t)[:, None]
    return torch.softmax(z.masked_fill(future, float("-inf")), dim=-1)


def _mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((y - t) ** 2).mean()


def _lin(p: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


CASES: dict[str, tuple[str, dict[str, tuple[int, ...]], Hand]] = {
    "layernorm-rank2": ("""
name: ln_rank2
inputs: {x: [N, 5]}
targets: {t: [N, 3]}
layers:
  - {name: h, type: dense, units: 5, activation: gelu_tanh}
  - {name: ln, type: layernorm}
  - {name: out, type: dense, units: 3}
loss: {type: mse, target: t}
""", {"x": (4, 5), "t": (4, 3)}, lambda p, b: _mse(_lin(p, "out", F.layer_norm(
        F.gelu(_lin(p, "h", b["x"]), approximate="tanh"), (5,), p["ln.weight"], p["ln.bias"],
        1e-5)), b["t"])),
    "norms-rank3-softmax": ("""
name: norms_rank3
inputs: {x: [N, T, 6]}
targets: {t: [N, T, 4]}
layers:
  - {name: h, type: dense, units: 6, activation: tanh}
  - {name: ln, type: layernorm, bias: false, eps: 0.001}
  - {name: rms, type: rmsnorm}
  - {name: out, type: dense, units: 4}
  - {name: p, type: softmax}
loss: {type: mse, target: t}
""", {"x": (3, 5, 6), "t": (3, 5, 4)}, lambda p, b: _mse(torch.softmax(_lin(p, "out", F.rms_norm(
        F.layer_norm(torch.tanh(_lin(p, "h", b["x"])), (6,), p["ln.weight"], None, 1e-3),
        (6,), p["rms.weight"], 1e-6)), dim=-1), b["t"])),
    "rank4-rmsnorm-eps": ("""
name: norms_rank4
inputs: {x: [N, 2, 3, 4]}
targets: {t: [N, 2, 3, 4]}
layers:
  - {name: h, type: dense, units: 4, activation: tanh}
  - {name: rms, type: rmsnorm, eps: 0.01}
  - {name: ln, type: layernorm}
loss: {type: mse, target: t}
""", {"x": (2, 2, 3, 4), "t": (2, 2, 3, 4)}, lambda p, b: _mse(F.layer_norm(F.rms_norm(
        torch.tanh(_lin(p, "h", b["x"])), (4,), p["rms.weight"], 0.01), (4,), p["ln.weight"],
        p["ln.bias"], 1e-5), b["t"])),
    "softmax-axis1-rank3": ("""
name: softmax_axis1
inputs: {x: [N, 4, 3]}
targets: {t: [N, 4, 2]}
layers:
  - {name: h, type: dense, units: 3, activation: tanh}
  - {name: p, type: softmax, axis: 1}
  - {name: out, type: dense, units: 2}
loss: {type: mse, target: t}
""", {"x": (3, 4, 3), "t": (3, 4, 2)}, lambda p, b: _mse(_lin(p, "out", torch.softmax(
        torch.tanh(_lin(p, "h", b["x"])), dim=1)), b["t"])),
    "causal-rank3": ("""
name: causal_rank3
inputs: {x: [N, 4, 3]}
targets: {t: [N, 4, 2]}
layers:
  - {name: h, type: dense, units: 4}
  - {name: att, type: softmax, causal: true}
  - {name: out, type: dense, units: 2}
loss: {type: mse, target: t}
""", {"x": (3, 4, 3), "t": (3, 4, 2)}, lambda p, b: _mse(_lin(p, "out", _causal(
        _lin(p, "h", b["x"]))), b["t"])),
    "causal-rank4": ("""
name: causal_rank4
inputs: {x: [N, 2, 5, 3]}
targets: {t: [N, 2, 5, 5]}
layers:
  - {name: h, type: dense, units: 5, activation: tanh}
  - {name: att, type: softmax, causal: true, axis: -1}
loss: {type: mse, target: t}
""", {"x": (2, 2, 5, 3), "t": (2, 2, 5, 5)}, lambda p, b: _mse(_causal(
        torch.tanh(_lin(p, "h", b["x"]))), b["t"])),
}


def _build(tmp_build, key: str):
    text, shapes, hand = CASES[key]
    model, modules = tmp_build(text)
    rng = np.random.default_rng(7)
    params = {k: rng.normal(size=v.shape) for k, v in modules["numpy"].init_params(0).items()}
    batch = {k: rng.normal(size=s) for k, s in shapes.items()}
    return model, modules, params, batch, hand


def _reference(hand: Hand, params: dict[str, np.ndarray], batch: dict[str, np.ndarray],
               wrt: tuple[str, ...]) -> tuple[float, dict[str, np.ndarray]]:
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tb = {k: torch.tensor(v, requires_grad=k in wrt) for k, v in batch.items()}
    loss = hand(tp, tb)
    leaves = {**tp, **{k: tb[k] for k in wrt}}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return float(loss.detach()), {k: g.numpy() for k, g in zip(leaves, grads, strict=True)}


def _generated(module, backend: str, params: dict[str, np.ndarray],
               batch: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients (every trainable parameter and the input x) from the generated
    backward: numpy's ``loss_and_grad(wrt=...)``; torch's ``loss_and_grad`` for the
    parameters and the Model's generated backward for x."""
    if backend == "numpy":
        loss, grads = module.loss_and_grad(params, **batch, wrt=(*module.TRAINABLE, "x"))
        return float(loss), {k: np.asarray(v) for k, v in grads.items()}
    tp = {k: torch.from_numpy(v) for k, v in params.items()}
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    loss, grads = module.loss_and_grad(tp, **tb)
    out = {k: v.numpy() for k, v in grads.items()}
    net = module.Model(seed=0, dtype=torch.float64)
    net.load_state_dict(tp)
    x = tb["x"].clone().requires_grad_(True)
    again = net.loss(**{**tb, "x": x})
    assert "LossFunction" in type(again.grad_fn).__name__
    (out["x"],) = (g.numpy() for g in torch.autograd.grad(again, [x]))
    return float(loss), out


def _close(got: np.ndarray, ref: np.ndarray, name: str) -> None:
    scale = max(float(np.max(np.abs(ref))), 1e-12)
    rel = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref))) / scale
    assert rel <= 1e-9, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("key", list(CASES))
def test_three_paths_match_hand_written_torch(tmp_build, key: str) -> None:
    model, modules, params, batch, hand = _build(tmp_build, key)
    ref_loss, ref = _reference(hand, params, batch, ("x",))
    for backend in ("numpy", "torch"):
        module = modules[backend]
        wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
        unwrap = (lambda t: t.detach().numpy()) if backend == "torch" else np.asarray
        errors = finite_differences(module, params, batch, wrap=wrap, to_numpy=unwrap)
        assert set(errors) == set(module.TRAINABLE)
        assert max(rel for _, rel in errors.values()) <= 1e-6, errors
        loss, grads = _generated(module, backend, params, batch)
        assert abs(loss - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss))
        assert set(grads) == {*module.TRAINABLE, "x"}
        for name, grad in grads.items():
            _close(grad, ref[name], f"{backend} {name}")
    net = modules["torch"].Model(seed=0, dtype=torch.float64)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    x = torch.from_numpy(batch["x"]).requires_grad_(True)
    loss = net.loss(x=x, t=torch.from_numpy(batch["t"]))
    loss.backward()
    assert abs(float(loss.detach()) - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss))
    checked = 0
    for name, param in net.named_parameters():
        _close(param.grad.numpy(), ref[name], f"Model {name}")
        checked += 1
    assert checked == len(params) > 0
    _close(x.grad.numpy(), ref["x"], "Model x")


def test_parameters_match_torch_modules() -> None:
    model = compile_text("""
name: ln_params
inputs: {x: [N, 6]}
layers:
  - {name: ln, type: layernorm}
  - {name: ln2, type: layernorm, bias: false}
  - {name: rms, type: rmsnorm}
loss: {formula: "y**2"}
""")
    ns: dict = {}
    exec(model.source("numpy"), ns)  # noqa: S102 - the module generated under test
    assert ns["PARAM_SHAPES"] == {"ln.weight": (6,), "ln.bias": (6,), "ln2.weight": (6,),
                                  "rms.weight": (6,)}
    params = ns["init_params"](0)
    ref = {**{f"ln.{k}": v for k, v in torch.nn.LayerNorm(6).state_dict().items()},
           "rms.weight": torch.nn.RMSNorm(6).state_dict()["weight"]}
    for name, value in ref.items():
        assert np.array_equal(params[name], value.numpy()), name
    assert np.array_equal(params["ln2.weight"], np.ones(6))


def _softmax_code(model) -> list[str]:
    return [line for b in ("numpy", "torch") for line in model.source(b).splitlines()
            if not line.strip().startswith("#")]


def test_softmax_backward_never_forms_a_jacobian() -> None:
    """Every array of the program is at most rank 2 for a rank-2 softmax (no N x C x C),
    and dz is y (g - sum(y g)): one sum per row, then elementwise."""
    model = compile_text("""
name: sm_rank2
inputs: {x: [N, 7]}
targets: {t: [N, 2]}
layers:
  - {name: h, type: dense, units: 7}
  - {name: p, type: softmax}
  - {name: out, type: dense, units: 2}
loss: {type: mse, target: t}
""")
    program = Lowerer(model.derivation, seed_argument=False).lower()
    assert max(len(s) for s in program.shapes.values()) <= 2
    adj = {a.var: a.expr for a in model.derivation.adjoints}
    k0, k1, i1 = (sp.Symbol(n, integer=True) for n in ("k0", "k1", "i1"))
    y, g = sp.IndexedBase("p", real=True), sp.IndexedBase("d_p", real=True)
    d_lse = sp.Symbol("d_lse")
    assert sp.expand(adj["d_p_lse"] + sp.Sum(y[k0, i1] * g[k0, i1], (i1, 0, 6))) == 0
    dz = adj["d_h"].xreplace({sp.IndexedBase("d_p_lse", real=True)[k0]: d_lse})
    assert sp.expand(dz - y[k0, k1] * (g[k0, k1] + d_lse)) == 0


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_large_logits_stay_finite(tmp_build, backend: str, causal: bool) -> None:
    model, modules = tmp_build(f"""
name: sm_large_{int(causal)}
inputs: {{x: [N, 5, 5]}}
targets: {{t: [N, 5, 2]}}
layers:
  - {{name: p, type: softmax, input: x, causal: {str(causal).lower()}}}
  - {{name: out, type: dense, units: 2}}
loss: {{type: mse, target: t}}
""")
    rng = np.random.default_rng(3)
    params = {k: rng.normal(size=v.shape) for k, v in modules["numpy"].init_params(0).items()}
    batch = {"x": 1000 * rng.normal(size=(3, 5, 5)), "t": rng.normal(size=(3, 5, 2))}

    def hand(p, b):
        z = b["x"]
        return _mse(_lin(p, "out", _causal(z) if causal else torch.softmax(z, -1)), b["t"])

    ref_loss, ref = _reference(hand, params, batch, ("x",))
    module = modules[backend]
    loss, grads = _generated(module, backend, params, batch)
    assert np.isfinite(loss) and abs(loss - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss))
    assert set(grads) == {*module.TRAINABLE, "x"}
    for name, grad in grads.items():
        assert np.all(np.isfinite(grad)), name
        _close(grad, ref[name], name)
    wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
    probs = np.asarray(module.forward({k: wrap(v) for k, v in params.items()},
                                      x=wrap(batch["x"])))
    assert np.all(np.isfinite(probs))


@pytest.mark.parametrize("layer", ["{type: layernorm}", "{type: rmsnorm}", "{type: softmax}",
                                   "{type: softmax, causal: true}",
                                   "{type: softmax, axis: 0}"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_nan_in_nan_out(tmp_build, backend: str, layer: str) -> None:
    """One NaN input element makes exactly the outputs that depend on it NaN."""
    model, modules = tmp_build(f"""
name: nan_case
inputs: {{x: [N, 4, 4]}}
targets: {{t: [N, 4, 4]}}
layers:
  - {{name: h, type: dense, units: 4}}
  - {{name: under_test, {layer[1:-1]}}}
loss: {{type: mse, target: t}}
""")
    module = modules[backend]
    x = np.random.default_rng(0).normal(size=(3, 4, 4))
    x[1, 2, 1] = np.nan
    if backend == "torch":
        params = module.init_params(0, dtype=torch.float64)
        out = module.forward(params, x=torch.from_numpy(x)).numpy()
    else:
        params = module.init_params(0)
        out = module.forward(params, x=x)
    p = {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}
    h = F.linear(torch.from_numpy(x), p["h.weight"], p["h.bias"])
    spec = model.spec.layer("under_test")
    ref = LAYERS[spec.type].reference(spec, [h], p).numpy()
    assert np.isnan(out).any() and not np.isnan(out).all()
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    _close(np.nan_to_num(out), np.nan_to_num(ref), "forward")


BAD = [
    ("{name: n, type: layernorm, eps: 0}", "eps must be a positive number"),
    ("{name: n, type: layernorm, eps: -1.0e-5}", "eps must be a positive number"),
    ("{name: n, type: rmsnorm, eps: 0.0}", "eps must be a positive number"),
    ("{name: n, type: layernorm, bias: false, trainable: {bias: false}}",
     "trainable names 'bias'"),
    ("{name: n, type: softmax, axis: 3}", "axis 3 is out of range"),
    ("{name: n, type: softmax, axis: -4}", "axis -4 is out of range"),
    ("{name: n, type: softmax, axis: 1.5}", "expected an integer"),
    ("{name: n, type: softmax, axis: true}", "expected an integer"),
    ("{name: n, type: softmax, causal: true, input: y}",
     "causal softmax needs the last two axes of 'y' to be equal"),
    ("{name: n, type: softmax, causal: true, input: v}", "causal softmax needs at least two"),
    ("{name: n, type: softmax, causal: 1}", "expected true or false"),
    ("{name: n, type: softmax, causal: true, axis: 0}",
     "a causal softmax normalises over the keys or the queries"),
]


@pytest.mark.parametrize("layer,message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_options_are_spec_errors(tmp_path, layer: str, message: str) -> None:
    if "input:" not in layer:
        layer = layer[:-1] + ", input: x}"
    text = f"""name: bad
inputs: {{x: [N, 4, 4], y: [N, T, 4], v: [N]}}
layers:
  - {layer}
loss: {{formula: "y**2", prediction: n}}
"""
    with pytest.raises(SpecError, match=message) as info:
        compile_text(text, "bad.yaml")
    assert str(info.value).startswith("bad.yaml:4:")
    path = write_spec(tmp_path, text, "bad.yaml")
    run = subprocess.run([sys.executable, "-m", "symbackprop.cli", "generate", str(path),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gelu_tanh_matches_torch_far_out(tmp_build) -> None:
    """The activation and its sympy derivative against torch over a wide range, through
    a 1 x 1 dense layer with weight 1 and bias 0 (so the activation sees x itself)."""
    model, modules = tmp_build("""
name: gelu_far
inputs: {x: [N, 1]}
layers:
  - {name: a, type: dense, units: 1, activation: gelu_tanh}
loss: {formula: "y"}
""")
    x = np.concatenate([np.linspace(-800, 800, 161), np.linspace(-6, 6, 241)])[:, None]
    params = {"a.weight": np.ones((1, 1)), "a.bias": np.zeros(1)}
    xt = torch.tensor(x, requires_grad=True)
    ref = F.gelu(xt, approximate="tanh")
    ref.mean().backward()
    for backend in ("numpy", "torch"):
        module = modules[backend]
        loss, grads = _generated(module, backend, params, {"x": x})
        wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
        out = np.asarray(module.forward({k: wrap(v) for k, v in params.items()}, x=wrap(x)))
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(grads["x"]))
        assert np.allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-15)
        assert np.allclose(grads["x"], xt.grad.numpy(), rtol=1e-11, atol=1e-16)
        assert abs(loss - float(ref.mean())) <= 1e-12 * abs(float(ref.mean()))


def test_derivation_shows_the_compact_forms(tmp_path) -> None:
    from symbackprop.api import compile_spec
    from symbackprop.latex import build

    path = write_spec(tmp_path, """
name: block
inputs: {x: [N, T, 8]}
targets: {t: [N, T, 6]}
layers:
  - {name: h, type: dense, units: 8}
  - {name: ln, type: layernorm}
  - {name: proj, type: dense, units: 6}
  - {name: p, type: softmax, causal: false}
loss: {type: mse, target: t}
""")
    model = compile_spec(path)
    text = build(model.spec, model.derivation, "model.yaml").markdown()
    assert r"\hat{g}" in text and "layer norm" in text.lower()
    assert "softmax" in text.lower() and r"\delta_{ij} - y" in text


def test_layernorm_backward_is_the_compact_form() -> None:
    """The engine's adjoints of layer norm, substituted into dL/dh, are exactly
    (1/sigma)(g' - mean(g') - xhat mean(g' xhat)) with g' = g w: sympy checks the identity
    with the variance and the mean as free symbols (no property of them is used)."""
    model = compile_text("""
name: ln_compact
inputs: {x: [N, 4]}
targets: {t: [N, 2]}
layers:
  - {name: h, type: dense, units: 3}
  - {name: ln, type: layernorm}
  - {name: out, type: dense, units: 2}
loss: {type: mse, target: t}
""")
    adj = {a.var: a.expr for a in model.derivation.adjoints}
    # the variance's derivative with respect to the mean (a sum of deviations) is gone
    assert not any(str(r.base) == "h" for r in adj["d_ln_mean"].atoms(sp.Indexed))
    k0, k1 = (sp.Symbol(n, integer=True) for n in ("k0", "k1"))
    base = {n: sp.IndexedBase(n, real=True) for n in ("d_ln_mean", "d_ln_var", "d_ln",
                                                        "h", "ln_mean", "ln_var", "ln_weight")}
    d_h = adj["d_h"].xreplace({base["d_ln_mean"][k0]: adj["d_ln_mean"],
                               base["d_ln_var"][k0]: adj["d_ln_var"]})
    j = sp.Symbol("j", integer=True)
    g = lambda c: base["d_ln"][k0, c] * base["ln_weight"][c]  # noqa: E731
    rstd = 1 / sp.sqrt(base["ln_var"][k0] + sp.Float(1e-5))
    xhat = lambda c: (base["h"][k0, c] - base["ln_mean"][k0]) * rstd  # noqa: E731
    compact = rstd * (g(k1) - sp.Sum(g(j), (j, 0, 2)) / 3
                      - xhat(k1) * sp.Sum(g(j) * xhat(j), (j, 0, 2)) / 3)
    for column in range(3):
        diff = (d_h - compact).xreplace({k1: column}).doit()
        assert sp.simplify(sp.expand(diff)) == 0


def test_deviation_sums_are_dropped_only_when_exact() -> None:
    from symbackprop.derive.identities import Mean, drop_deviation_sums

    i0, s0, j, k0 = (sp.Symbol(n, integer=True) for n in ("i0", "s0", "j", "k0"))
    x, m, w = (sp.IndexedBase(n, real=True) for n in ("x", "m", "w"))
    c = sp.Symbol("c", real=True)
    table = {"m": Mean("m", (i0,), s0, x[i0, s0], sp.Integer(4))}
    assert drop_deviation_sums(c * sp.Sum(2 * x[k0, j] - 2 * m[k0], (j, 0, 3)), table) == 0
    kept = [sp.Sum((x[k0, j] - m[k0]) ** 2, (j, 0, 3)),      # not linear in the mean
            sp.Sum(x[k0, j] - m[k0], (j, 0, 2)),             # another extent
            sp.Sum(x[k0, j] * w[j] - m[k0], (j, 0, 3)),      # not the mean's summand
            sp.Sum(w[j] * (x[k0, j] - m[k0]), (j, 0, 3)),    # a weight that depends on j
            sp.Sum(x[j, k0] - m[k0], (j, 0, 3))]             # another axis
    for expr in kept:
        assert drop_deviation_sums(expr, table) == expr, expr


class _Scale(Layer):
    """Test-only: out = x * a[0], one trainable number (so a spec of symbolic T x T
    scores has something to train)."""

    key = "scale_test"
    doc = "test-only scalar scale"
    params = {"a": Param("one number", "ones")}

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        a = cls.param(graph, spec, "a", (sp.Integer(1),))
        return graph.op(spec.name, x.shape, x.element() * a.element((sp.Integer(0),)),
                        layer=spec.name, where=spec.where, label="scale")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list, params: dict) -> torch.Tensor:
        return inputs[0] * params[f"{spec.name}.a"][0]


@pytest.mark.parametrize("axis", [-1, 1])
def test_causal_softmax_over_a_symbolic_length(monkeypatch: pytest.MonkeyPatch, tmp_build,
                                               axis: int) -> None:
    """Scores [N, T, T] with T symbolic: the mask's index arrays take T at run time."""
    monkeypatch.setitem(LAYERS, _Scale.key, _Scale)
    model, modules = tmp_build(f"""
name: causal_symbolic_{axis + 1}
inputs: {{x: [N, T, T]}}
targets: {{t: [N, T, T]}}
layers:
  - {{name: s, type: scale_test}}
  - {{name: att, type: softmax, causal: true, axis: {axis}}}
loss: {{type: mse, target: t}}
""")
    rng = np.random.default_rng(5)
    params = {"s.a": np.array([1.7])}
    for length in (1, 4, 6):
        batch = {"x": rng.normal(size=(2, length, length)),
                 "t": rng.normal(size=(2, length, length))}

        def hand(p, b, size=length):
            # every row and every column keeps its diagonal, so axis 1 is finite too
            z = b["x"] * p["s.a"][0]
            future = torch.arange(size)[None, :] > torch.arange(size)[:, None]
            return _mse(torch.softmax(z.masked_fill(future, float("-inf")), dim=axis), b["t"])

        ref_loss, ref = _reference(hand, params, batch, ("x",))
        for backend in ("numpy", "torch"):
            loss, grads = _generated(modules[backend], backend, params, batch)
            assert abs(loss - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss))
            for name, grad in grads.items():
                _close(grad, ref[name], f"{backend} {name} T={length}")
