"""Neurons: ``MPSNNNeuronDescriptor`` and the ``MPSCNNNeuron`` kernels (``MPSCNNNeuronReLU`` and the
other deprecated per-type classes). The activations themselves, ``MPSCNNNeuronType`` and its one
formula table, live in ``core.activations``, where every backend reads them.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ._api import Strict, decode_with, keywords
from .core.activations import MPSCNNNeuronType, default_parameters
from .core.geometry import NeuronSpec
from .errors import MPSTypeError, MPSValueError
from .types import as_enum, as_float, as_int
from .kernel import MPSCNNKernel
from .state import MPSNNGradientState

T = MPSCNNNeuronType


def _check_type(value, owner: str) -> MPSCNNNeuronType:
    neuron_type = as_enum(value, MPSCNNNeuronType, owner, "neuronType")
    if neuron_type == T.count:
        raise MPSValueError(f"{owner}: neuronType=count is a sentinel, not an activation")
    return neuron_type


def float32_values(data, owner: str, prop: str) -> np.ndarray:
    """An ``NSData`` / pointer argument read as float32 values (a copy)."""
    if data is None:
        raise MPSValueError(f"{owner}: {prop} is None")
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) % 4:
            raise MPSValueError(f"{owner}: {prop} holds {len(raw)} bytes; float32 data needs a multiple of 4")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    try:
        return np.array(data, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise MPSTypeError(f"{owner}: {prop} must be bytes or an array of floats, not {type(data).__name__}") from None


@keywords()  # unavailable: made by its class methods
class MPSNNNeuronDescriptor(Strict):
    """``MPSNNNeuronDescriptor``: an activation type and its parameters.

    Made by ``cnnNeuronDescriptor(type, a=, b=, c=)`` or ``cnnNeuronPReLUDescriptor(data, noCopy=)``;
    ``MPSNNNeuronDescriptor()`` is unavailable.
    """

    data = None

    def _parameter(name: str):
        def get(self) -> float:
            return getattr(self, "_" + name)

        def set_(self, value) -> None:
            setattr(self, "_" + name, as_float(value, "MPSNNNeuronDescriptor", name))

        return property(get, set_, doc=f"``{name}``: a parameter of the activation (Float).")

    a, b, c = _parameter("a"), _parameter("b"), _parameter("c")
    del _parameter

    def __init__(self, *args, **kwargs):
        raise MPSTypeError("MPSNNNeuronDescriptor() is unavailable; use MPSNNNeuronDescriptor.cnnNeuronDescriptor("
                           "type, a=, b=, c=) or cnnNeuronPReLUDescriptor(data, noCopy=)")

    @classmethod
    def _make(cls, neuron_type, a, b, c, data=None) -> "MPSNNNeuronDescriptor":
        self = object.__new__(cls)
        self._type = neuron_type
        self.a, self.b, self.c = a, b, c
        self.data = data
        return self

    @classmethod
    def cnnNeuronDescriptor(cls, type, /, a: float | None = None, b: float | None = None,
                            c: float | None = None) -> "MPSNNNeuronDescriptor":
        """``cnnNeuronDescriptor(with:[a:[b:[c:]]])``: parameters not given take the type's defaults."""
        neuron_type = _check_type(type, "MPSNNNeuronDescriptor.cnnNeuronDescriptor")
        da, db, dc = default_parameters(neuron_type)
        return cls._make(neuron_type, da if a is None else a, db if b is None else b, dc if c is None else c)

    @classmethod
    def cnnNeuronPReLUDescriptor(cls, data, /, noCopy: bool = False) -> "MPSNNNeuronDescriptor":
        """``cnnNeuronPReLUDescriptor(with:noCopy:)``: per-channel ``a`` as packed float32 bytes."""
        values = float32_values(data, "MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor", "data")
        if values.size == 0:
            raise MPSValueError("MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor: data must hold at least one float")
        return cls._make(T.pReLU, 0.0, 0.0, 0.0, data)

    @property
    def neuronType(self) -> MPSCNNNeuronType:
        return self._type

    @neuronType.setter
    def neuronType(self, value) -> None:
        self._type = _check_type(value, "MPSNNNeuronDescriptor")

    def copy(self) -> "MPSNNNeuronDescriptor":
        """NSCopying (``data`` is retained, as Metal does)."""
        return MPSNNNeuronDescriptor._make(self._type, self.a, self.b, self.c, self.data)

    def resolve(self, owner: str, channels: int | None) -> tuple[NeuronSpec, np.ndarray | None]:
        """Snapshot: the resolved scalars and, for PReLU, ``channels`` float32 coefficients (a copy).

        ``channels=None`` keeps every coefficient (checked later against the processed channels).
        """
        resolved = NeuronSpec(int(self._type), self.a, self.b, self.c)
        if self._type != T.pReLU:
            return resolved, None
        if self.data is None:
            raise MPSValueError(f"{owner}: a pReLU neuron needs per-channel data (cnnNeuronPReLUDescriptor)")
        values = float32_values(self.data, owner, "pReLU data")
        if channels is not None and values.size != channels:
            raise MPSValueError(f"{owner}: pReLU data holds {values.size} floats; outputFeatureChannels={channels} "
                                "needs exactly that many")
        return NeuronSpec(int(T.pReLU), 0.0, 0.0, 0.0), values

    def __eq__(self, other) -> bool:
        if not isinstance(other, MPSNNNeuronDescriptor):
            return NotImplemented
        same_data = (self.data is None and other.data is None) or (
            self.data is not None and other.data is not None
            and np.array_equal(float32_values(self.data, "", ""), float32_values(other.data, "", "")))
        return (self._type, self.a, self.b, self.c) == (other._type, other.a, other.b, other.c) and same_data

    __hash__ = None

    def __repr__(self) -> str:
        extra = f", data={len(float32_values(self.data, '', ''))} floats" if self.data is not None else ""
        return f"MPSNNNeuronDescriptor({self._type.name}, a={self.a}, b={self.b}, c={self.c}{extra})"


def _deprecated(what: str, instead: str) -> None:
    warnings.warn(f"{what} is deprecated; use {instead}", DeprecationWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Neuron kernels. Deprecated subclasses carry a neuron into a convolution descriptor.


class NeuronKernel(MPSCNNKernel):
    """What ``MPSCNNNeuron`` and ``MPSCNNNeuronGradient`` share: the initializers and the activation
    they take from an ``MPSNNNeuronDescriptor`` (a snapshot: later changes to it do not reach them)."""

    def __init__(self, **kwargs):
        name = type(self).__name__
        if set(kwargs) in ({"coder"}, {"coder", "device"}):  # init?(coder:device:)
            decode_with(kwargs["coder"], self, kwargs.get("device"))
            return
        if set(kwargs) != {"device", "neuronDescriptor"}:
            raise MPSTypeError(f"{name}({', '.join(sorted(kwargs))}): use {name}(device=, neuronDescriptor=) "
                               f"or {name}(coder=, device=); init(device:) is unavailable")
        descriptor = kwargs["neuronDescriptor"]
        if not isinstance(descriptor, MPSNNNeuronDescriptor):
            raise MPSTypeError(f"{name}: neuronDescriptor={descriptor!r} must be an MPSNNNeuronDescriptor")
        self._init_neuron(kwargs["device"], descriptor)

    def _init_neuron(self, device, descriptor: MPSNNNeuronDescriptor) -> None:
        self._init_cnn_kernel(device)
        self._descriptor = descriptor.copy()
        self._spec, self._prelu = self._descriptor.resolve(type(self).__name__, None)
        if self._prelu is not None:
            self._descriptor.data = self._prelu.tobytes()  # a snapshot: later changes do not reach the kernel
        self._param_tuple = (None, None, self._prelu)

    neuronType = property(lambda self: self._descriptor.neuronType)
    a = property(lambda self: self._descriptor.a)
    b = property(lambda self: self._descriptor.b)
    c = property(lambda self: self._descriptor.c)
    data = property(lambda self: self._descriptor.data)

    def _channels(self):
        return None, None, 1

    def _neuron(self) -> NeuronSpec:
        return self._spec

    def _params(self):
        return self._param_tuple


@keywords("device", "neuronDescriptor", "coder")
class MPSCNNNeuron(NeuronKernel):
    """``MPSCNNNeuron``: applies an activation to each feature channel of each pixel.

    ``MPSCNNNeuron(device=, neuronDescriptor=)``, ``MPSCNNNeuron(coder=, device=)``. A 1x1 window:
    destination pixel ``(X, Y)`` reads source pixel ``offset + (u, v)`` through ``edgeMode``;
    channels follow the source (``min(sourceFeatureChannelMaxCount, featureChannels -
    sourceFeatureChannelOffset)``). For training, ``resultState`` / the ``destinationState`` encodes
    fill an ``MPSNNGradientState`` that ``MPSCNNNeuronGradient`` reads.
    """

    _state_reused_across_batch = False  # a neuron's gradient reads its own source: one state per image

    def _result_state_class(self):
        return MPSNNGradientState

    def _resolve(self, source, destination, owner):
        problem = super()._resolve(source, destination, owner)
        if self._prelu is not None and self._prelu.size < problem.out_channels:
            raise MPSValueError(f"{owner}: pReLU data holds {self._prelu.size} floats; the neuron processes "
                                f"{problem.out_channels} channels and needs at least that many")
        return problem


def _legacy(name: str, neuron_type, params: tuple[str, ...]):
    def __init__(self, **kwargs):
        expected = {"device", *params}
        if set(kwargs) != expected:
            raise MPSTypeError(f"{name}({', '.join(sorted(kwargs))}): use {name}("
                               f"{', '.join(p + '=' for p in ('device', *params))})")
        _deprecated(name, "MPSCNNNeuron(device=, neuronDescriptor=)")
        values = {p: kwargs[p] for p in params}
        if neuron_type == T.pReLU:
            count = as_int(values.pop("count"), name, "count")
            coefficients = float32_values(values["a"], name, "a")
            if coefficients.size < count or count < 1:
                raise MPSValueError(f"{name}: a holds {coefficients.size} floats; count={count}")
            descriptor = MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(coefficients[:count].tobytes())
        else:
            descriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(neuron_type, **values)
        self._init_neuron(kwargs["device"], descriptor)

    doc = f"``{name}`` (deprecated): ``MPSCNNNeuron`` of type ``{neuron_type.name}``."
    return keywords("device", *params)(type(name, (MPSCNNNeuron,), {"__init__": __init__, "__doc__": doc}))


MPSCNNNeuronLinear = _legacy("MPSCNNNeuronLinear", T.linear, ("a", "b"))
MPSCNNNeuronReLU = _legacy("MPSCNNNeuronReLU", T.reLU, ("a",))
MPSCNNNeuronPReLU = _legacy("MPSCNNNeuronPReLU", T.pReLU, ("a", "count"))
MPSCNNNeuronSigmoid = _legacy("MPSCNNNeuronSigmoid", T.sigmoid, ())
MPSCNNNeuronHardSigmoid = _legacy("MPSCNNNeuronHardSigmoid", T.hardSigmoid, ("a", "b"))
MPSCNNNeuronTanH = _legacy("MPSCNNNeuronTanH", T.tanH, ("a", "b"))
MPSCNNNeuronAbsolute = _legacy("MPSCNNNeuronAbsolute", T.absolute, ())
MPSCNNNeuronSoftPlus = _legacy("MPSCNNNeuronSoftPlus", T.softPlus, ("a", "b"))
MPSCNNNeuronSoftSign = _legacy("MPSCNNNeuronSoftSign", T.softSign, ())
MPSCNNNeuronELU = _legacy("MPSCNNNeuronELU", T.ELU, ("a",))
MPSCNNNeuronReLUN = _legacy("MPSCNNNeuronReLUN", T.reLUN, ("a", "b"))
MPSCNNNeuronPower = _legacy("MPSCNNNeuronPower", T.power, ("a", "b", "c"))
MPSCNNNeuronExponential = _legacy("MPSCNNNeuronExponential", T.exponential, ("a", "b", "c"))
MPSCNNNeuronLogarithm = _legacy("MPSCNNNeuronLogarithm", T.logarithm, ("a", "b", "c"))
