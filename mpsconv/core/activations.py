"""Activations: ``MPSCNNNeuronType`` and the one neuron formula table every backend evaluates.

``FORMULAS[type](x, a, b, c, ops)`` is the activation of each type, written once against a small
array namespace (``NUMPY_OPS`` for the float64 reference, ``TORCH_OPS`` for the fast paths), so
every backend computes the same expression; ``DERIVATIVES`` beside it is ``f'(x)`` for the
gradient kernels. The Triton kernels' ``_neuron`` and ``_neuron_grad`` mirror them, and tests hold
them together. ``neuron_args`` / ``neuron_supported`` say how the Triton kernels take a
neuron and which they fuse.
"""
from __future__ import annotations

import enum
import math
from types import SimpleNamespace

import numpy as np
import torch

from .geometry import NeuronSpec


class MPSCNNNeuronType(enum.IntEnum):
    """``MPSCNNNeuronType``: activation functions with Apple's raw values."""

    none = 0
    reLU = 1
    linear = 2
    sigmoid = 3
    hardSigmoid = 4
    tanH = 5
    absolute = 6
    softPlus = 7
    softSign = 8
    ELU = 9
    pReLU = 10
    reLUN = 11
    power = 12
    exponential = 13
    logarithm = 14
    geLU = 15
    count = 16


T = MPSCNNNeuronType

#: Parameter values used for every parameter a constructor does not receive (our choice where Apple gives none).
DEFAULT_PARAMETERS = {
    T.reLU: (0.0, 0.0, 0.0),
    T.linear: (1.0, 0.0, 0.0),
    T.hardSigmoid: (0.2, 0.5, 0.0),
    T.tanH: (1.0, 1.0, 0.0),
    T.softPlus: (1.0, 1.0, 0.0),
    T.ELU: (1.0, 0.0, 0.0),
    T.reLUN: (1.0, 6.0, 0.0),
    T.power: (1.0, 0.0, 1.0),
    T.exponential: (1.0, 0.0, -1.0),
    T.logarithm: (1.0, 0.0, -1.0),
}


def default_parameters(neuron_type) -> tuple[float, float, float]:
    return DEFAULT_PARAMETERS.get(MPSCNNNeuronType(neuron_type), (0.0, 0.0, 0.0))


_np_erf = np.vectorize(math.erf, otypes=[np.float64])

NUMPY_OPS = SimpleNamespace(
    where=np.where, exp=np.exp, expm1=np.expm1, log=np.log, tanh=np.tanh, abs=np.abs, erf=_np_erf,
    minimum=np.minimum, clip=np.clip, power=np.power, logaddexp=np.logaddexp, rpow=np.power,
    full_like=np.full_like,
)


def _torch_minimum(x, b):
    return torch.clamp(x, max=b)


TORCH_OPS = SimpleNamespace(
    where=torch.where, exp=torch.exp, expm1=torch.expm1, log=torch.log, tanh=torch.tanh, abs=torch.abs,
    erf=torch.erf, minimum=_torch_minimum, clip=lambda x, lo, hi: torch.clamp(x, lo, hi), power=torch.pow,
    logaddexp=lambda lhs, y: torch.logaddexp(y.new_tensor(lhs), y), rpow=torch.pow,
    full_like=torch.full_like,
)


def _exponential(x, a, b, c, ops):
    y = a * x + b
    return ops.exp(y) if c == -1 else ops.rpow(c, y)


def _logarithm(x, a, b, c, ops):
    y = ops.log(a * x + b)
    if c == -1:
        return y
    return y / math.log(c) if c > 0 else y * math.nan  # no real logarithm to a non-positive base


#: f(x, a, b, c, ops): the activation of each type; ``a`` is an array broadcast over channels for PReLU.
FORMULAS = {
    T.none: lambda x, a, b, c, ops: x,
    T.reLU: lambda x, a, b, c, ops: ops.where(x >= 0, x, a * x),
    T.linear: lambda x, a, b, c, ops: a * x + b,
    T.sigmoid: lambda x, a, b, c, ops: 1.0 / (1.0 + ops.exp(-x)),
    T.hardSigmoid: lambda x, a, b, c, ops: ops.clip(a * x + b, 0.0, 1.0),
    T.tanH: lambda x, a, b, c, ops: a * ops.tanh(b * x),
    T.absolute: lambda x, a, b, c, ops: ops.abs(x),
    T.softPlus: lambda x, a, b, c, ops: a * ops.logaddexp(0.0, b * x),
    T.softSign: lambda x, a, b, c, ops: x / (1.0 + ops.abs(x)),
    T.ELU: lambda x, a, b, c, ops: ops.where(x >= 0, x, a * ops.expm1(x)),
    T.pReLU: lambda x, a, b, c, ops: ops.where(x >= 0, x, a * x),
    T.reLUN: lambda x, a, b, c, ops: ops.minimum(ops.where(x >= 0, x, a * x), b),
    T.power: lambda x, a, b, c, ops: ops.power(a * x + b, c),
    T.exponential: _exponential,
    T.logarithm: _logarithm,
    T.geLU: lambda x, a, b, c, ops: 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0)))),
}


def _right_slope(x, a, ops):
    """The slope of ``where(x >= 0, x, a·x)``, from the right at 0 (1)."""
    return ops.where(x >= 0, 1.0, a) if not isinstance(a, float) else ops.where(x >= 0, 1.0, ops.full_like(x, a))


def _hard_sigmoid_grad(x, a, b, c, ops):
    y = a * x + b
    if a > 0:  # from the right: the slope where a(x + ε) + b lands inside [0, 1)
        inside = (y >= 0.0) & (y < 1.0)
    elif a < 0:
        inside = (y > 0.0) & (y <= 1.0)
    else:
        return ops.full_like(x, 0.0)
    return ops.where(inside, ops.full_like(x, a), 0.0)


def _relu_n_grad(x, a, b, c, ops):
    slope = _right_slope(x, a, ops)
    y = ops.where(x >= 0, x, a * x)
    capped = ops.where(slope > 0, y >= b, y > b)  # min(y, b) takes b just right of x
    return ops.where(capped, 0.0, slope)


def _exponential_grad(x, a, b, c, ops):
    y = a * x + b
    if c == -1:
        return a * ops.exp(y)
    return (a * math.log(c) if c > 0 else math.nan) * ops.rpow(c, y)


def _logarithm_grad(x, a, b, c, ops):
    scale = 1.0 if c == -1 else (1.0 / math.log(c) if c > 0 and c != 1 else math.nan)
    return a * scale / (a * x + b)


def _power_grad(x, a, b, c, ops):
    if c == 0:
        return ops.full_like(x, 0.0)
    return c * a * ops.power(a * x + b, c - 1.0)


#: f'(x, a, b, c, ops): each type's derivative. Where f has a kink (reLU, pReLU and reLUN at 0,
#: reLUN at its ceiling, absolute at 0, hardSigmoid at 0 and 1, ELU at 0) it is the slope on the
#: right of the kink, x + ε: reLU'(0) = 1, reLUN'(b) = 0 (b > 0), |0|' = 1.
DERIVATIVES = {
    T.none: lambda x, a, b, c, ops: ops.full_like(x, 1.0),
    T.reLU: lambda x, a, b, c, ops: _right_slope(x, a, ops),
    T.linear: lambda x, a, b, c, ops: ops.full_like(x, a),
    T.sigmoid: lambda x, a, b, c, ops: (lambda s: s * (1.0 - s))(1.0 / (1.0 + ops.exp(-x))),
    T.hardSigmoid: _hard_sigmoid_grad,
    T.tanH: lambda x, a, b, c, ops: (lambda t: a * b * (1.0 - t * t))(ops.tanh(b * x)),
    T.absolute: lambda x, a, b, c, ops: ops.where(x >= 0, 1.0, ops.full_like(x, -1.0)),
    T.softPlus: lambda x, a, b, c, ops: a * b / (1.0 + ops.exp(-b * x)),
    T.softSign: lambda x, a, b, c, ops: 1.0 / ((1.0 + ops.abs(x)) * (1.0 + ops.abs(x))),
    T.ELU: lambda x, a, b, c, ops: ops.where(x >= 0, 1.0, a * ops.exp(x)),
    T.pReLU: lambda x, a, b, c, ops: _right_slope(x, a, ops),
    T.reLUN: _relu_n_grad,
    T.power: _power_grad,
    T.exponential: _exponential_grad,
    T.logarithm: _logarithm_grad,
    T.geLU: lambda x, a, b, c, ops: (0.5 * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))
                                     + x * ops.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))),
}


def apply_neuron(x, neuron: NeuronSpec, prelu, ops):
    """``f(x)`` for a resolved neuron; ``prelu`` is the per-channel ``a`` (broadcast on the last axis)."""
    neuron_type = MPSCNNNeuronType(neuron.type)
    a = prelu if neuron_type == T.pReLU else neuron.a
    return FORMULAS[neuron_type](x, a, neuron.b, neuron.c, ops)


def neuron_derivative(x, neuron: NeuronSpec, prelu, ops):
    """``f'(x)`` for a resolved neuron (``prelu`` as in ``apply_neuron``)."""
    neuron_type = MPSCNNNeuronType(neuron.type)
    a = prelu if neuron_type == T.pReLU else neuron.a
    return DERIVATIVES[neuron_type](x, a, neuron.b, neuron.c, ops)


def neuron_args(neuron) -> tuple[int, float, float, float, float]:
    """``(code, a, b, c, p2)`` for ``_neuron``; ``p2`` folds the base of exponential / logarithm."""
    kind, a, b, c = T(neuron.type), float(neuron.a), float(neuron.b), float(neuron.c)
    p2 = 0.0
    if kind == T.exponential:
        p2 = math.log2(math.e) if c == -1 else math.log2(c)
    elif kind == T.logarithm:
        p2 = 1.0 if c == -1 else (1.0 / math.log(c) if c > 0 and c != 1 else math.nan)
    return int(kind), a, b, c, p2


def neuron_supported(neuron) -> bool:
    """Whether the Triton kernels fuse ``neuron``: all but ``c^y`` for a base ``c <= 0``, which is
    real only for integral ``y`` (the torch backend evaluates the formula table instead)."""
    return not (neuron.type == T.exponential and neuron.c != -1 and neuron.c <= 0)
