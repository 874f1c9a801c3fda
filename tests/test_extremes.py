"""Forward values and gradients at extreme inputs agree with a 60-digit mpmath reference.

For every activation (and custom formulas a user might write naively, such as
``log(1 + exp(x))``) and every loss, the generated modules are evaluated at
x in {+-800, +-40, +-1e-8, 0} in float64 and {+-80, +-20, 0} in float32, in both
backends. Wherever the true value is finite, ours must be finite and within the stated
tolerance: |ours - ref| <= RTOL * |ref| + ATOL * scale, where scale is the size of the
largest term of the true value (so a result that is a tiny difference of O(1) terms is
held to O(1) rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import mpmath as mp
import numpy as np
import pytest
import torch

from symbackprop.derive.functions import PRIMITIVES
from symbackprop.layers import ACTIVATIONS

from conftest import build

mp.mp.dps = 60

POINTS = {np.float64: [-800.0, -40.0, -1e-8, 0.0, 1e-8, 40.0, 800.0],
          np.float32: [-80.0, -20.0, 0.0, 20.0, 80.0]}
TOL = {np.float64: (1e-9, 1e-15), np.float32: (2e-5, 2e-7)}  # (RTOL, ATOL)


def sig(x):
    return 1 / (1 + mp.exp(-x))


def softplus(x):
    return mp.log(1 + mp.exp(x))


# Independent definitions (mpmath, not sympy): value and, for kinks, the derivative.
REFERENCE: dict[str, tuple[Callable, Callable | None]] = {
    "identity": (lambda x: x, None),
    "sigmoid": (sig, None),
    "tanh": (mp.tanh, None),
    "relu": (lambda x: max(x, 0), lambda x: mp.mpf(1) if x > 0 else mp.mpf(0)),
    "leaky_relu": (lambda x: x if x > 0 else mp.mpf("0.01") * x,
                   lambda x: mp.mpf(1) if x > 0 else mp.mpf("0.01")),
    "elu": (lambda x: x if x > 0 else mp.expm1(x),
            lambda x: mp.mpf(1) if x > 0 else mp.exp(x)),
    "softplus": (softplus, None),
    "gelu": (lambda x: x / 2 * (1 + mp.erf(x / mp.sqrt(2))), None),
    "silu": (lambda x: x * sig(x), None),
    "gelu_tanh": (lambda x: x / 2 * (1 + mp.tanh(mp.sqrt(2 / mp.pi)
                                                 * (x + mp.mpf("0.044715") * x**3))), None),
}
FORMULAS = {
    "x*tanh(softplus(x))": lambda x: x * mp.tanh(softplus(x)),
    "log(1+exp(x))": softplus,
    "log(1/(1+exp(-x)))": lambda x: mp.log(sig(x)),
    "x*sigmoid(x)": lambda x: x * sig(x),
    "exp(x) - 1": mp.expm1,
    "log(1 + x**2)": lambda x: mp.log1p(x**2),
}
# Every primitive callable in formulas, as ``name(x)``, against its record's mpmath
# reference, at the points of its domain: how both backends print it, in both dtypes.
PRIMITIVE_FORMULAS = {f"{p.name}(x)": p for p in PRIMITIVES if p.formula and p.arity == 1}


def test_every_activation_has_a_reference() -> None:
    assert set(REFERENCE) == set(ACTIVATIONS)


def _finite(value: mp.mpf) -> bool:
    return mp.isfinite(value) and abs(value) < mp.mpf("1e300")


def _close(got: float, want: mp.mpf, scale: mp.mpf, dtype: type, what: str) -> None:
    if not _finite(want):
        return
    rtol, atol = TOL[dtype]
    assert np.isfinite(got), f"{what}: got {got}, true value {mp.nstr(want, 8)}"
    err = abs(mp.mpf(float(got)) - want)
    bound = rtol * abs(want) + atol * max(scale, 1)
    assert err <= bound, f"{what}: got {got!r}, true {mp.nstr(want, 12)} (error {float(err):.3g})"


def _activation_spec(activation: str) -> str:
    return f"""
    name: extreme
    inputs: {{x: [N, 1]}}
    layers:
      - {{name: a, type: dense, units: 1, activation: {activation}}}
    loss: {{formula: "y"}}
    """


CASES = ([pytest.param(name, REFERENCE[name], id=name) for name in REFERENCE]
         + [pytest.param(f"{{formula: '{f}'}}", (ref, None), id=f"formula:{f}")
            for f, ref in FORMULAS.items()]
         + [pytest.param(f"{{formula: '{f}'}}", (p.reference, None), id=f"primitive:{p.name}")
            for f, p in PRIMITIVE_FORMULAS.items()])
DOMAIN = {f"{{formula: '{f}'}}": p.domain for f, p in PRIMITIVE_FORMULAS.items()}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(spec: str) -> dict:
        if spec not in cache:
            folder = tmp_path_factory.mktemp("extreme")
            cache[spec] = build(folder, spec)[1]
        return cache[spec]

    return get


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("activation,ref", CASES)
def test_activation_at_extremes(compiled, activation, ref, backend, dtype) -> None:
    value_fn, deriv_fn = ref
    mod = compiled(_activation_spec(activation))[backend]
    wrap = (lambda a: torch.from_numpy(a)) if backend == "torch" else (lambda a: a)
    params = {"a.weight": np.ones((1, 1), dtype), "a.bias": np.zeros(1, dtype)}
    for x in POINTS[dtype]:
        if not DOMAIN.get(activation, lambda x: True)(x):
            continue
        xs = np.array([[x]], dtype)
        px = {k: wrap(v) for k, v in params.items()}
        y = float(mod.forward(px, x=wrap(xs))[0, 0])
        loss, grads = mod.loss_and_grad(px, x=wrap(xs))
        dbias = float(grads["a.bias"][0])
        xm = mp.mpf(float(xs[0, 0]))
        want = value_fn(xm)
        dwant = deriv_fn(xm) if deriv_fn else mp.diff(value_fn, xm)
        _close(y, want, abs(xm), dtype, f"{activation}({x}) [{backend}]")
        _close(float(loss), want, abs(xm), dtype, f"loss {activation}({x}) [{backend}]")
        _close(dbias, dwant, mp.mpf(1), dtype, f"{activation}'({x}) [{backend}]")


# Losses on one logit z = x: (spec fragment for the output layer and loss, target values,
# reference loss as a function of (z, t)).
LOSS_CASES = {
    "mse": ("identity", "{type: mse, target: t}", [0.5], lambda z, t: (z - t) ** 2),
    "bce": ("sigmoid", "{type: bce, target: t}", [0.0, 0.3, 1.0],
            lambda z, t: -(t * mp.log(sig(z)) + (1 - t) * mp.log(1 - sig(z)))),
    "bce_with_logits": ("identity", "{type: bce_with_logits, target: t}", [0.0, 0.3, 1.0],
                        lambda z, t: -(t * mp.log(sig(z)) + (1 - t) * mp.log(1 - sig(z)))),
    "formula": ("identity", "{formula: 'log(1+exp(-y*t))', target: t}", [1.0, -1.0],
                lambda z, t: mp.log(1 + mp.exp(-z * t))),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("loss", sorted(LOSS_CASES))
def test_loss_at_extremes(compiled, loss, backend, dtype) -> None:
    act, loss_yaml, targets, ref = LOSS_CASES[loss]
    spec = f"""
    name: extreme_loss
    inputs: {{x: [N, 1]}}
    targets: {{t: [N, 1]}}
    layers:
      - {{name: a, type: dense, units: 1, activation: {act}}}
    loss: {loss_yaml}
    """
    mod = compiled(spec)[backend]
    wrap = (lambda a: torch.from_numpy(a)) if backend == "torch" else (lambda a: a)
    params = {"a.weight": np.ones((1, 1), dtype), "a.bias": np.zeros(1, dtype)}
    for x in POINTS[dtype]:
        for t in targets:
            xs, ts = np.array([[x]], dtype), np.array([[t]], dtype)
            loss_value, grads = mod.loss_and_grad({k: wrap(v) for k, v in params.items()},
                                                  x=wrap(xs), t=wrap(ts))
            zm, tm = mp.mpf(float(xs[0, 0])), mp.mpf(float(ts[0, 0]))
            want = ref(zm, tm)
            dwant = mp.diff(lambda z, tm=tm: ref(z, tm), zm)
            scale = abs(zm) + 1
            _close(float(loss_value), want, scale, dtype, f"{loss}(z={x}, t={t}) [{backend}]")
            _close(float(grads["a.bias"][0]), dwant, mp.mpf(1), dtype,
                   f"d{loss}/dz(z={x}, t={t}) [{backend}]")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_softmax_cross_entropy_at_extremes(compiled, backend, dtype) -> None:
    spec = """
    name: extreme_ce
    inputs: {x: [N, 1]}
    targets: {t: [N, 2]}
    layers:
      - {name: a, type: dense, units: 2}
    loss: {type: softmax_cross_entropy, target: t}
    """
    mod = compiled(spec)[backend]
    wrap = (lambda a: torch.from_numpy(a)) if backend == "torch" else (lambda a: a)
    params = {"a.weight": np.array([[1.0], [-1.0]], dtype), "a.bias": np.zeros(2, dtype)}
    for x in POINTS[dtype]:
        for cls in (0, 1):
            t = np.eye(2, dtype=dtype)[[cls]]
            loss_value, grads = mod.loss_and_grad({k: wrap(v) for k, v in params.items()},
                                                  x=wrap(np.array([[x]], dtype)), t=wrap(t))
            z = [mp.mpf(float(np.float64(x).astype(dtype))), -mp.mpf(float(x))]
            lse = mp.log(mp.exp(z[0]) + mp.exp(z[1]))
            _close(float(loss_value), lse - z[cls], abs(z[0]) + 1, dtype, f"ce({x}, {cls})")
            for c in (0, 1):
                want = mp.exp(z[c] - lse) - (1 if c == cls else 0)
                _close(float(grads["a.bias"][c]), want, mp.mpf(1), dtype,
                       f"dce/dz{c}({x}, {cls}) [{backend}]")
