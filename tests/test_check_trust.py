"""`symbackprop check` never says ok to a NaN, checks at the user's own point, and
refuses a network too large to check instead of running out of memory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from symbackprop import check
from symbackprop.cli import main

from conftest import EXAMPLES

NAN_SPEC = """name: nanny
inputs: {x: [N, 8]}
targets: {t: [N, 1]}
layers:
  - {name: wide, type: dense, units: 16, activation: {formula: "sqrt(x)"}}
  - {name: out, type: dense, units: 1}
loss: {type: mse, target: t}
"""


@pytest.mark.parametrize("with_torch", [True, False])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # sqrt of a negative: the point
def test_a_nan_model_fails_every_table(with_torch, tmp_path, monkeypatch, capsys) -> None:
    """sqrt of a negative pre-activation: the loss and most gradients are NaN. The
    128-entry weight is checked along random directions, where a NaN used to vanish."""
    if with_torch:
        pytest.importorskip("torch")
    else:
        monkeypatch.setattr(check, "torch_available", lambda: False)
    spec = tmp_path / "nan.yaml"
    spec.write_text(NAN_SPEC)
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "check FAILED" in err and "all checks passed" not in err
    rows = [line.split() for line in err.splitlines() if line.startswith("  wide.weight")]
    assert rows and all(row[-1] == "FAIL" and row[1] == "nan" for row in rows), rows


def test_a_gradient_that_is_zero_passes_and_a_wrong_small_one_fails(tmp_path) -> None:
    """A softmax over the time axis makes the dense layer's bias gradient zero (rounding,
    ~1e-17): against its own size it failed every tolerance. The floor (a millionth of
    the largest gradient) lets it pass, while an error of 1e-3 of the largest gradient
    in a small one still fails."""
    spec = tmp_path / "zero.yaml"
    spec.write_text("""
name: zero_bias
inputs: {x: [N, 2, 2]}
targets: {t: [N, 2, 2]}
layers:
  - {name: fc, type: dense, units: 2}
  - {name: sm, type: softmax, causal: true, axis: 1}
loss: {type: mse, target: t}
""")
    assert main(["check", str(spec)]) == 0
    big, small = np.array([1.0, -2.0]), np.array([1e-5, 0.0])
    floor = check._floor([big, small])
    assert floor == 2e-6
    assert check._rel(small + 2e-3, small, floor)[1] > 1e-6


# two classes, class 1 ignored (the spec's name goes first)
CE_IGNORED_ONE = """
inputs: {x: [N, 2]}
targets: {t: {shape: [N], dtype: int64}}
layers:
  - {name: fc, type: dense, units: 2}
loss: {type: softmax_cross_entropy, target: t, ignore_index: 1}
"""


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("seed", range(8))
def test_check_draws_a_counted_label_where_the_ignored_one_is_valid(batch, seed) -> None:
    """With two classes and ignore_index 1 every drawn label could be 1, and the loss over
    no counted row is NaN (as torch's): check's batch failed on its own draw. Each batch
    now has a counted label, and about a quarter of the others are ignored."""
    from symbackprop.api import compile_text

    model = compile_text("name: ce_two" + CE_IGNORED_ONE)
    labels = check.random_batch(model, batch=batch, seed=seed)["t"]
    assert labels.shape == (batch,) and set(labels.tolist()) <= {0, 1}
    assert (labels == 0).any()


def test_check_passes_where_every_label_but_one_is_ignored(tmp_path) -> None:
    spec = tmp_path / "ce.yaml"
    spec.write_text("name: ce_one_counted" + CE_IGNORED_ONE)
    assert main(["check", str(spec)]) == 0


KEY_BIAS = """
name: key_bias
inputs: {x: [N, T, 4]}
targets: {t: [N, T, 4]}
layers:
  - {name: q, type: dense, units: 4}
  - {name: k, type: dense, input: x, units: 4}
  - {name: s, type: einsum, input: [q, k], equation: "ntd,nsd->nts", scale: 0.5}
  - {name: p, type: softmax, causal: true}
  - {name: o, type: einsum, input: [p, x], equation: "nts,nsd->ntd"}
loss: {type: mse, target: t}
"""


def test_a_zero_gradient_within_the_differences_noise_passes(tmp_path) -> None:
    """A key's bias before a softmax over the keys has a gradient of exactly zero; the
    torch module's central differences there are rounding, ~2e-11 (0.4 eps |L| / h), which
    against a millionth of the largest gradient (7e-8) failed. The finite differences'
    floor is now their own noise over the tolerance."""
    spec = tmp_path / "keys.yaml"
    spec.write_text(KEY_BIAS)
    assert main(["check", str(spec)]) == 0


def test_finite_differences_still_see_a_zero_gradient_gone_wrong() -> None:
    """The noise floor forgives only what a difference of two losses cannot resolve: that
    zero gradient off by 1e-8 (about 50 times the noise, 4 eps |L| / h = 2e-10) fails."""
    from symbackprop.api import compile_text

    model = compile_text(KEY_BIAS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "key_bias_numpy.py"
        path.write_text(model.source("numpy"), encoding="utf-8")
        module = check.load_module(path)
    params = module.init_params(0)
    batch = check.random_batch(model)
    tol = check.FD_TOL[np.dtype(np.float64)]
    honest = check.finite_differences(module, params, batch)
    assert all(r <= tol for _, r in honest.values()), honest
    real = module.loss_and_grad

    def off(params, **kw):
        loss, grads = real(params, **kw)
        return loss, dict(grads, **{"k.bias": grads["k.bias"] + 1e-8})

    module.loss_and_grad = off
    wrong = check.finite_differences(module, params, batch)
    assert wrong["k.bias"][1] > 10 * tol, wrong


def test_rel_never_passes_a_non_finite_value() -> None:
    finite = np.array([1.0, 2.0])
    for bad in (np.array([np.nan, 2.0]), np.array([np.inf, 2.0])):
        for a, b in ((bad, finite), (finite, bad), (bad, bad)):
            _, rel = check._rel(a, b)
            assert not check._within(rel, 1e-6)
    assert check._within(check._rel(finite, finite)[1], 1e-12)


def _seed_point(tmp_path, suffix: str) -> tuple[str, str]:
    from symbackprop.api import compile_spec
    from symbackprop.check import load_module

    model = compile_spec(EXAMPLES / "seed_mlp.yaml")
    path = tmp_path / "m.py"
    path.write_text(model.source("numpy"))
    module = load_module(path)
    rng = np.random.default_rng(7)
    params = {k: rng.normal(size=s) for k, s in module.PARAM_SHAPES.items()}
    batch = {"x": rng.normal(size=(6, 2)), "t": rng.uniform(size=(6, 1))}
    if suffix == ".npz":
        np.savez(tmp_path / "p.npz", **params)
        np.savez(tmp_path / "b.npz", **batch)
    else:
        torch = pytest.importorskip("torch")
        torch.save({k: torch.from_numpy(v) for k, v in params.items()}, tmp_path / "p.pt")
        torch.save({k: torch.from_numpy(v) for k, v in batch.items()}, tmp_path / "b.pt")
    return str(tmp_path / f"p{suffix}"), str(tmp_path / f"b{suffix}")


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_check_at_the_users_point(suffix, tmp_path, capsys) -> None:
    params, batch = _seed_point(tmp_path, suffix)
    assert main(["check", str(EXAMPLES / "seed_mlp.yaml"), "--params", params,
                 "--batch", batch]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_the_users_point_is_the_one_checked(tmp_path, monkeypatch) -> None:
    params, batch = _seed_point(tmp_path, ".npz")
    seen = {}
    real = check.finite_differences

    def spy(module, p, b, **kwargs):
        seen.setdefault("params", p)
        seen.setdefault("batch", b)
        return real(module, p, b, **kwargs)

    monkeypatch.setattr(check, "finite_differences", spy)
    check.check_path(EXAMPLES / "seed_mlp.yaml", params=params, batch=batch)
    with np.load(params) as p, np.load(batch) as b:
        assert np.array_equal(seen["params"]["fc1.weight"], p["fc1.weight"])
        assert np.array_equal(seen["batch"]["x"], b["x"])


def test_bad_point_files_are_usage_errors(tmp_path, capsys) -> None:
    spec = str(EXAMPLES / "seed_mlp.yaml")
    np.savez(tmp_path / "short.npz", **{"fc1.weight": np.zeros((3, 2))})
    np.savez(tmp_path / "shape.npz", **{"fc1.weight": np.zeros((2, 3)), "fc1.bias": np.zeros(3),
                                        "fc2.weight": np.zeros((1, 3)), "fc2.bias": np.zeros(1)})
    np.savez(tmp_path / "batch.npz", x=np.zeros((4, 3)), t=np.zeros((4, 1)))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    cases = [(["--params", str(tmp_path / "short.npz")], "missing fc1.bias"),
             (["--params", str(tmp_path / "shape.npz")], r"fc1.weight: expected shape (3, 2)"),
             (["--batch", str(tmp_path / "batch.npz")], "x: shape (4, 3) does not fit"),
             (["--params", str(tmp_path / "junk.npz")], "cannot read the parameters"),
             (["--params", str(tmp_path / "p.txt")], "must be .npz"),
             (["--params", str(tmp_path / "fifo.npz")], "not a regular file")]
    os.mkfifo(tmp_path / "fifo.npz")  # reading it would block forever
    for args, message in cases:
        assert main(["check", spec, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_network_too_large_to_check_is_refused(tmp_path, capsys) -> None:
    spec = tmp_path / "big.yaml"
    spec.write_text((EXAMPLES / "seed_mlp.yaml").read_text().replace("units: 3",
                                                                      "units: 16777216"))
    assert main(["check", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "GiB of memory" in err and err.count("\n") == 1


def test_parameters_start_from_their_declared_initialisation(tmp_path, monkeypatch) -> None:
    """A layer that declares a constant initialisation (a frozen summing layer) starts
    there in init_params of both modules, and so in `check`: never from random values."""
    pytest.importorskip("torch")
    from symbackprop.api import compile_spec
    from symbackprop.layers import Param, core

    monkeypatch.setitem(core.Dense.params, "weight", Param("all ones", "ones"))
    spec = tmp_path / "mean.yaml"
    spec.write_text("name: mean\ninputs: {x: [N, 4]}\ntargets: {t: [N, 1]}\nlayers:\n"
                    "  - {name: avg, type: dense, units: 1, bias: false, trainable: false}\n"
                    "  - {name: out, type: dense, units: 1}\n"
                    "loss: {type: mse, target: t}\n")
    model = compile_spec(spec)
    seen = {}
    for backend in ("numpy", "torch"):
        path = tmp_path / f"mean_{backend}.py"
        path.write_text(model.source(backend))
        module = check.load_module(path)
        value = module.init_params(3)["avg.weight"]
        seen[backend] = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        assert np.array_equal(seen[backend], np.ones((1, 4)))
    real_fd = check.finite_differences
    points = []
    monkeypatch.setattr(check, "finite_differences",
                        lambda m, p, b, **k: points.append(p) or real_fd(m, p, b, **k))
    rows = check.check_model(model)
    assert rows and all(row.ok for row in rows)
    assert np.array_equal(points[0]["avg.weight"], np.ones((1, 4)))


@pytest.mark.parametrize("layers, loss", [
    # a one-term loss list keeps its weight (the oracle used to drop it)
    ("  - {name: fc, type: dense, units: 1}",
     "loss:\n  - {type: mse, prediction: fc, target: t, weight: 0.5}"),
    # a trainable layer that feeds nothing: a zero gradient (the oracle used to raise)
    ("  - {name: unused, type: dense, units: 1}\n  - {name: fc, type: dense, input: x, units: 1}",
     "loss: {type: mse, target: t}"),
])
def test_oracle_reads_every_spec_as_the_modules_do(tmp_path, layers, loss) -> None:
    pytest.importorskip("torch")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: s\ninputs: {{x: [N, 2]}}\ntargets: {{t: [N, 1]}}\nlayers:\n"
                    f"{layers}\n{loss}\n")
    assert main(["check", str(spec)]) == 0
