"""The generated modules at run time: wrong parameters and inputs get a ValueError that
names them, inputs are converted as documented, an empty batch raises, NaN propagates
like torch, and the warnings of discarded where() branches stay silent."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from symbackprop.check import load_module
from symbackprop.cli import main

from conftest import ROOT

torch = pytest.importorskip("torch")

GENERATED = ROOT / "generated"


def _modules(name: str) -> dict[str, object]:
    return {b: load_module(GENERATED / f"{name}_{b}.py") for b in ("numpy", "torch")}


SEED = _modules("seed_mlp")
MLP = _modules("mlp_classifier")


def _as(backend: str, value: np.ndarray) -> object:
    return torch.from_numpy(value) if backend == "torch" else value


def _seed_call(backend: str, params: dict, **batch) -> None:
    module = SEED[backend]
    module.loss_and_grad(params, **batch)


def _params(backend: str, dtype=np.float64) -> dict:
    module = SEED["numpy"]
    return {k: _as(backend, v.astype(dtype)) for k, v in module.init_params(0).items()}


def _batch(backend: str, n: int = 4, dtype=np.float64) -> dict:
    rng = np.random.default_rng(0)
    return {"x": _as(backend, rng.normal(size=(n, 2)).astype(dtype)),
            "t": _as(backend, rng.uniform(size=(n, 1)).astype(dtype))}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("bad", [(1,), (4, 3), ()])
@pytest.mark.parametrize("function", ["forward", "loss", "loss_and_grad"])
def test_wrong_parameter_shape_is_refused(backend, bad, function) -> None:
    params = _params(backend)
    params["fc1.bias"] = _as(backend, np.zeros(bad))
    batch = _batch(backend)
    if function == "forward":
        batch.pop("t")
    with pytest.raises(ValueError, match=r"fc1\.bias: expected shape \(3,\)"):
        getattr(SEED[backend], function)(params, **batch)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_parameter_problems_are_named(backend) -> None:
    module = SEED[backend]
    batch = _batch(backend)
    params = _params(backend)
    del params["fc2.weight"]
    with pytest.raises(ValueError, match="'fc2.weight' is missing"):
        module.loss(params, **batch)
    params = _params(backend)
    params["fc2.weight"] = [[0.1, 0.2, 0.3]]
    with pytest.raises(ValueError, match="fc2.weight: expected a"):
        module.loss(params, **batch)
    params = _params(backend)
    params["fc1.weight"] = _as(backend, np.ones((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="fc1.weight: expected a floating dtype"):
        module.loss(params, **batch)
    params = _params(backend)
    params["fc2.bias"] = _as(backend, np.zeros(1, dtype=np.float32))
    with pytest.raises(ValueError, match="fc2.bias: dtype .*float32 differs"):
        module.loss(params, **batch)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_inputs_are_converted_as_documented(backend) -> None:
    module = SEED[backend]
    params = _params(backend)
    x = [[0.5, -1.0], [2.0, 0.25]]
    t = [[1], [0]]  # integers
    got = module.loss(params, x=x, t=t)
    want = module.loss(params, x=_as(backend, np.array(x)), t=_as(backend, np.array(t, float)))
    assert float(got) == float(want)
    with pytest.raises(ValueError, match=r"x: expected dtype .*float64.*got .*float32"):
        module.loss(params, x=_as(backend, np.array(x, dtype=np.float32)), t=t)
    params32 = _params(backend, np.float32)
    with pytest.raises(ValueError, match=r"x: expected dtype .*float32.*got .*float64"):
        module.loss(params32, x=_as(backend, np.array(x)), t=t)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_an_empty_batch_raises(backend) -> None:
    with pytest.raises(ValueError, match="the batch is empty"):
        SEED[backend].loss(_params(backend), **_batch(backend, n=0))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_nan_in_nan_out_like_torch(backend) -> None:
    """relu of NaN is NaN in torch; the generated relu must not turn it into 0."""
    module = MLP[backend]
    params = {k: _as(backend, v) for k, v in MLP["numpy"].init_params(0).items()}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 64))
    x[1, 5] = np.nan
    label = np.eye(10)[[1, 2, 3]]
    loss = module.loss(params, x=_as(backend, x), label=_as(backend, label))
    assert np.isnan(float(loss))
    value, _ = module.loss_and_grad(params, x=_as(backend, x), label=_as(backend, label))
    assert np.isnan(float(value))
    weight = torch.from_numpy(MLP["numpy"].init_params(0)["h1.weight"])
    h = torch.tanh(torch.nn.functional.linear(torch.from_numpy(x), weight))
    assert torch.isnan(torch.relu(h)).any()  # the reference behaviour


def _formula_module(tmp_path, formula: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "f.yaml"
    spec.write_text("name: f\ninputs: {x: [N, 1]}\ntargets: {t: [N, 1]}\nlayers:\n"
                    "  - {name: fc, type: dense, units: 1, "
                    f'activation: {{formula: "{formula}"}}}}\n'
                    "loss: {type: mse, target: t}\n")
    assert main(["generate", str(spec), "--out", str(tmp_path / "o")]) == 0
    return load_module(tmp_path / "o" / "f_numpy.py")


def test_abs_of_nan_is_nan(tmp_path) -> None:
    module = _formula_module(tmp_path, "abs(x)")
    params = {"fc.weight": np.ones((1, 1)), "fc.bias": np.zeros(1)}
    out = module.forward(params, x=np.array([[np.nan], [-2.0], [0.0]]))
    assert np.isnan(out[0, 0]) and out[1, 0] == 2.0 and out[2, 0] == 0.0


def test_discarded_branch_warnings_are_silenced(tmp_path) -> None:
    module = _formula_module(tmp_path, "where(x > 0, log(x), x)")
    params = {"fc.weight": np.ones((1, 1)), "fc.bias": np.zeros(1)}
    x = np.array([[-3.0], [2.0], [0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = module.forward(params, x=x)
        module.loss(params, x=x, t=np.zeros((3, 1)))
        # also in the gradient: nothing is shared out of a where() branch, so the log is
        # evaluated only under the mask there too
        _, grads = module.loss_and_grad(params, x=x, t=np.zeros((3, 1)))
    assert np.allclose(out.ravel(), [-3.0, np.log(2.0), 0.0])
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    # A taken entry that becomes NaN still warns (log of a negative number is kept).
    module = _formula_module(tmp_path / "b", "where(x > -5, log(x), x)")
    with pytest.warns(RuntimeWarning):
        module.forward(params, x=np.array([[-3.0]]))


def test_infinities_print_as_module_constants() -> None:
    """repr(inf) is the bare name inf: a NameError at the first call of a module."""
    import ast

    import sympy as sp

    from symbackprop.emit.printers import NumpyCodePrinter, TorchCodePrinter

    x = sp.Symbol("x")
    for printer, module in ((NumpyCodePrinter(), "numpy"), (TorchCodePrinter(), "torch")):
        for expr in (sp.oo * x, x - sp.oo, sp.Float("1e400") * x, sp.Float("-1e999") + x):
            text = printer.doprint(expr)
            names = {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}
            assert names <= {"x", module}, (text, names)
            assert f"{module}.inf" in text


@pytest.mark.parametrize("targets", [True, False], ids=["loss", "prediction"])
def test_model_checks_its_parameters_and_inputs(targets: bool) -> None:
    """The Model path (LossFunction) checks what the functions check."""
    model = SEED["torch"].Model(dtype=torch.float64)
    batch = _batch("torch")
    if not targets:
        batch.pop("t")
    model.fc1.bias = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"fc1\.bias: expected shape \(3,\)"):
        model(**batch)
    model = SEED["torch"].Model(dtype=torch.float64)
    batch["x"] = batch["x"].float()
    with pytest.raises(ValueError, match=r"x: expected dtype torch\.float64"):
        model(**batch)
    batch["x"] = [[0.5, 1.0]] * 4  # a list is converted to the parameters' dtype
    assert model(**batch).dtype == torch.float64
