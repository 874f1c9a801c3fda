"""Built-in activations: each a scalar sympy formula plus its torch reference.

sympy differentiates the formula; nothing here states a derivative. Piecewise
activations take the branch ``x > 0`` strictly, so their derivative at the kink x = 0
is the value of the other branch (0 for relu, alpha for leaky_relu), as in torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy as sp

from ..derive.functions import Expm1, Sigmoid, Softplus
from .base import Activation, register_activation


def _number(value: float) -> sp.Expr:
    # alpha = 1 multiplies by nothing in the generated code.
    return sp.Integer(int(value)) if float(value).is_integer() else sp.Float(value)


def _torch() -> Any:
    import torch

    return torch


register_activation(Activation(
    "identity", "f(x) = x", lambda x, p: x, lambda x, p: x))
register_activation(Activation(
    "sigmoid", "f(x) = 1 / (1 + exp(-x))", lambda x, p: Sigmoid(x),
    lambda x, p: _torch().sigmoid(x)))
register_activation(Activation(
    "tanh", "f(x) = tanh(x)", lambda x, p: sp.tanh(x), lambda x, p: _torch().tanh(x)))
register_activation(Activation(
    "relu", "f(x) = max(x, 0)", lambda x, p: sp.Piecewise((x, x > 0), (0, True)),
    lambda x, p: _torch().relu(x), kink="f'(0) = 0"))
register_activation(Activation(
    "leaky_relu", "f(x) = x if x > 0 else alpha x",
    lambda x, p: sp.Piecewise((x, x > 0), (sp.Float(p["alpha"]) * x, True)),
    lambda x, p: _torch().nn.functional.leaky_relu(x, p["alpha"]),
    params={"alpha": 0.01}, kink="f'(0) = alpha"))
register_activation(Activation(
    "elu", "f(x) = x if x > 0 else alpha (exp(x) - 1)",
    lambda x, p: sp.Piecewise((x, x > 0), (_number(p["alpha"]) * Expm1(x), True)),
    lambda x, p: _torch().nn.functional.elu(x, p["alpha"]),
    params={"alpha": 1.0}, kink="f'(0) = alpha"))
register_activation(Activation(
    "softplus", "f(x) = log(1 + exp(x))", lambda x, p: Softplus(x),
    lambda x, p: _torch().nn.functional.softplus(x, threshold=60.0)))
register_activation(Activation(
    "gelu", "f(x) = x/2 (1 + erf(x / sqrt(2)))",
    lambda x, p: x / 2 * (1 + sp.erf(x / sp.sqrt(2))),
    lambda x, p: _torch().nn.functional.gelu(x)))
register_activation(Activation(
    "gelu_tanh", "f(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's approximation",
    # 0.044715 exactly (a Rational), so the printed constant is the one torch uses
    lambda x, p: x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 10**6)
                                                             * x**3))),
    lambda x, p: _torch().nn.functional.gelu(x, approximate="tanh")))
register_activation(Activation(
    "silu", "f(x) = x sigma(x)", lambda x, p: x * Sigmoid(x),
    lambda x, p: _torch().nn.functional.silu(x)))


def activation_params(params: tuple[tuple[str, float], ...]) -> Mapping[str, float]:
    return dict(params)
