"""Every registered activation, loss and layer type x {numpy, torch} x {float64, float32}.

Each case builds a small network around the thing under test and checks the generated
gradients against central finite differences and against the independent torch.nn +
autograd oracle (which is built from the spec by the layers' ``reference`` functions and
shares nothing with the sympy derivation). A newly registered layer, activation or loss
is picked up here without new test code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from symbackprop.check import call_args, finite_differences, oracle_grads, random_batch
from symbackprop.layers import ACTIVATIONS, LAYERS, LOSSES


def _opts(options: dict) -> str:
    return json.dumps(options)[1:-1]


def activation_spec(act: str) -> str:
    return f"""
    name: act_{act}
    inputs: {{x: [N, 3]}}
    targets: {{t: [N, 2]}}
    layers:
      - {{name: h, type: dense, units: 4, activation: {act}}}
      - {{name: a, type: activation, activation: {act}}}
      - {{name: out, type: dense, units: 2}}
    loss: {{type: mse, target: t}}
    """


def loss_spec(loss: str, options: dict) -> str:
    """``_int_targets``: int64 class ids of shape [N] instead of a float [N, 4] target."""
    final = "sigmoid" if LOSSES[loss].wants_probability else "identity"
    options = dict(options)
    target = "{shape: [N], dtype: int64}" if options.pop("_int_targets", False) else "[N, 4]"
    extra = f", {_opts(options)}" if options else ""
    return f"""
    name: loss_{loss}
    inputs: {{x: [N, 3]}}
    targets: {{t: {target}}}
    layers:
      - {{name: h, type: dense, units: 5, activation: tanh}}
      - {{name: out, type: dense, units: 4, activation: {final}}}
    loss: {{type: {loss}, target: t{extra}}}
    """


def layer_spec(key: str, options: dict) -> str:
    """A network h -> [branches] -> layer under test -> out, for one test case.

    A case's ``_branches`` ({name: width}) become dense branches from h feeding the layer;
    without it a layer of arity 1 reads h, and a multi-input layer gets width-3 branches.
    ``_input`` sets the input's shape (default ``[N, 3]``). ``_ids`` (a shape) makes the
    input an int64 tensor of ids that the layer under test reads directly (an embedding),
    and ``_dims`` bounds symbolic dimensions ({T: max}).
    """
    cls = LAYERS[key]
    lo, _ = cls.arity
    options = dict(options)
    widths = options.pop("_branches", None)
    bounds = options.pop("_dims", {})
    dims = ("dims: {" + ", ".join(f"{k}: {{max: {v}}}" for k, v in bounds.items()) + "}\n"
            if bounds else "")
    ids = options.pop("_ids", None)
    if ids is not None:
        extra = f", {_opts(options)}" if options else ""
        shape = ", ".join(map(str, ids))
        return f"""name: layer_{key}
inputs: {{x: {{shape: [{shape}], dtype: int64}}}}
targets: {{t: [{shape}, 2]}}
{dims}layers:
  - {{name: under_test, type: {key}, input: x{extra}}}
  - {{name: h, type: dense, units: 3, activation: tanh}}
  - {{name: out, type: dense, units: 2}}
loss: {{type: mse, target: t}}
"""
    # "_input": the network's input shape, for layers on rank-3 and rank-4 tensors
    # (every layer of the harness acts on the last axis, so the others carry through).
    shape = list(options.pop("_input", ["N", 3]))
    # "_target": the target's leading axes, for layers that change them (default: the
    # input's leading axes)
    lead = ", ".join(map(str, options.pop("_target", shape[:-1])))
    if widths is None and lo > 1:
        widths = {f"b{i}": 3 for i in range(lo)}
    extra = f", {_opts(options)}" if options else ""
    if not widths:
        middle = f"  - {{name: under_test, type: {key}, input: h{extra}}}"
    else:
        names = list(widths)
        branches = "\n".join(
            f"  - {{name: {n}, type: dense, units: {widths[n]}, input: h, activation: "
            f"{'sigmoid' if i % 2 else 'tanh'}}}" for i, n in enumerate(names))
        middle = (f"{branches}\n  - {{name: under_test, type: {key}, "
                  f"input: [{', '.join(names)}]{extra}}}")
    return f"""name: layer_{key}
inputs: {{x: [{", ".join(map(str, shape))}]}}
targets: {{t: [{lead}, 2]}}
{dims}layers:
  - {{name: h, type: dense, units: 3, activation: tanh}}
{middle}
  - {{name: out, type: dense, units: 2, input: under_test}}
loss: {{type: mse, target: t}}
"""


CASES = (
    [pytest.param(activation_spec(a), id=f"activation-{a}") for a in sorted(ACTIVATIONS)]
    + [pytest.param(loss_spec(name, opts), id=f"loss-{name}-{i}")
       for name in sorted(LOSSES) for i, opts in enumerate(LOSSES[name].test_cases)]
    + [pytest.param(layer_spec(key, opts), id=f"layer-{key}-{i}")
       for key in sorted(LAYERS) for i, opts in enumerate(LAYERS[key].test_cases)]
)

TOLERANCE = {  # (finite differences, oracle) relative error bounds
    np.float64: (1e-6, 1e-9),
    np.float32: (3e-2, 2e-4),
}


def _wrap(backend: str):
    if backend == "torch":
        return torch.from_numpy, lambda t: t.detach().numpy()
    return (lambda a: a), np.asarray


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spec_text", CASES)
def test_gradients(tmp_build, spec_text: str, backend: str, dtype: type) -> None:
    model, modules = tmp_build(spec_text)
    module = modules[backend]
    fd_tol, oracle_tol = TOLERANCE[dtype]
    params64 = modules["numpy"].init_params(0)
    if backend == "torch":  # both modules start from the same numbers: bit for bit for
        # uniform draws, to the last bit or two for normal ones (log and cos may round
        # differently in the two backends)
        same = module.init_params(0, dtype=torch.float64)
        assert all(np.allclose(same[k].numpy(), v, rtol=1e-15, atol=0)
                   for k, v in params64.items())
    params = {k: v.astype(dtype) for k, v in _no_zero_params(params64).items()}
    batch = random_batch(model, batch=4, dtype=dtype)
    wrap, to_numpy = _wrap(backend)

    # 1. Central finite differences of the module's own loss.
    errors = finite_differences(module, params, batch, wrap=wrap, to_numpy=to_numpy)
    assert set(errors) == set(module.TRAINABLE)
    for name, (_, rel) in errors.items():
        assert rel <= fd_tol, f"{name}: finite-difference relative error {rel:.2e}"

    # 2. The independent torch.nn + autograd oracle, in float64.
    trainable = list(module.TRAINABLE)
    batch64 = {k: v if v.dtype.kind == "i" else v.astype(np.float64) for k, v in batch.items()}
    ref_loss, ref = oracle_grads(model.spec, {k: v.astype(np.float64) for k, v in
                                              params.items()}, batch64, trainable)
    loss, grads = module.loss_and_grad({k: wrap(v) for k, v in params.items()},
                                       **{k: wrap(v) for k, v in call_args(module,
                                                                            batch).items()})
    assert abs(float(to_numpy(loss)) - ref_loss) <= oracle_tol * max(1.0, abs(ref_loss))
    for name in trainable:
        got = np.asarray(to_numpy(grads[name]), dtype=np.float64)
        assert got.dtype == np.float64 and to_numpy(grads[name]).dtype == np.dtype(dtype)
        scale = max(np.max(np.abs(ref[name])), 1e-12)
        assert np.max(np.abs(got - ref[name])) / scale <= oracle_tol, name


def _no_zero_params(params: dict) -> dict:
    """Parameters that start at zero (a LoRA adapter's B, embeddings' biases) drawn at
    random instead: at zero they would zero the gradient of what they multiply (B = 0
    sends nothing to A), and a check of that gradient could not fail."""
    rng = np.random.default_rng(7)
    return {k: (rng.normal(scale=0.3, size=v.shape).astype(v.dtype) if not np.any(v) else v)
            for k, v in params.items()}


@pytest.mark.parametrize("spec_text", CASES)
def test_model_backward_matches_oracle(tmp_build, spec_text: str) -> None:
    """Model.loss(...).backward() runs the generated backward and agrees with autograd."""
    model, modules = tmp_build(spec_text)
    module = modules["torch"]
    net = module.Model(seed=3, dtype=torch.float64)
    net.eval()  # the oracle is the evaluation-mode network (dropout draws no mask)
    params = _no_zero_params({k: v.detach().numpy().copy() for k, v in
                              net.state_dict().items()})
    net.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    batch = random_batch(model, batch=4)
    loss = net.loss(**{k: torch.from_numpy(v) for k, v in call_args(module, batch).items()})
    assert loss.grad_fn is not None and "LossFunction" in type(loss.grad_fn).__name__
    loss.backward()
    ref_loss, ref = oracle_grads(model.spec, params, batch, list(module.TRAINABLE))
    assert abs(float(loss.detach()) - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss))
    for name, param in net.named_parameters():
        if name in ref:
            scale = max(np.max(np.abs(ref[name])), 1e-12)
            assert np.max(np.abs(param.grad.numpy() - ref[name])) / scale <= 1e-9, name
        else:
            assert param.grad is None and not param.requires_grad
