"""``MPSCNNConvolutionDescriptor`` and the convolution family's enumerations ."""
from __future__ import annotations

import enum
import math

import numpy as np

from ._api import Strict, decode_with, keywords
from .errors import MPSTypeError, MPSValueError
from .types import as_float, as_int
from .core.activations import MPSCNNNeuronType
from .core.geometry import NeuronSpec
from .neuron import MPSCNNNeuron, MPSNNNeuronDescriptor, _deprecated, float32_values


class MPSCNNConvolutionFlags(enum.IntEnum):
    """``MPSCNNConvolutionFlags`` (deprecated): ``none`` is the only value."""

    none = 0


class MPSCNNWeightsQuantizationType(enum.IntEnum):
    """``MPSCNNWeightsQuantizationType``."""

    none = 0
    linear = 1
    lookupTable = 2


class MPSNNConvolutionAccumulatorPrecisionOption(enum.IntFlag):
    """``MPSNNConvolutionAccumulatorPrecisionOption``."""

    half = 0
    float = 1


class MPSCNNConvolutionGradientOption(enum.IntFlag):
    """``MPSCNNConvolutionGradientOption``."""

    gradientWithData = 1
    gradientWithWeightsAndBias = 2
    all = 3


class MPSCNNConvolutionWeightsLayout(enum.IntEnum):
    """``MPSCNNConvolutionWeightsLayout``: ``OHWI`` is the only layout."""

    OHWI = 0


class MPSCNNBinaryConvolutionType(enum.IntEnum):
    """``MPSCNNBinaryConvolutionType``."""

    binaryWeights = 0
    xnor = 1
    AND = 2


class MPSCNNBinaryConvolutionFlags(enum.IntEnum):
    """``MPSCNNBinaryConvolutionFlags``."""

    none = 0
    useBetaScaling = 1


#: The largest kernel size, channel count, stride, dilation, group count or scale factor: sizes and
#: strides stay 32-bit integers, as Metal's are in practice (textures are at most 16384 wide) and as
#: the backends' index arithmetic needs.
MAX_DESCRIPTOR_VALUE = 2**31 - 1


def positive_int(value, owner: str, prop: str, minimum: int = 1) -> int:
    return as_int(value, owner, prop, minimum, MAX_DESCRIPTOR_VALUE)


class _BatchNorm:
    """Inference batch-norm parameters, copied when set."""

    def __init__(self, mean, variance, gamma, beta, epsilon):
        self.mean, self.variance, self.gamma, self.beta, self.epsilon = mean, variance, gamma, beta, epsilon

    def fold(self) -> tuple[np.ndarray, np.ndarray]:
        """``(I_o, J_o)`` in float32: ``I = gamma / sqrt(variance + epsilon)``, ``J = beta - I·mean``."""
        scale = self.gamma / np.sqrt(self.variance + np.float32(self.epsilon))
        return scale.astype(np.float32), (self.beta - scale * self.mean).astype(np.float32)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.mean, self.variance, self.gamma, self.beta


@keywords("kernelWidth", "kernelHeight", "inputFeatureChannels", "outputFeatureChannels", "neuronFilter", "coder")
class MPSCNNConvolutionDescriptor(Strict):
    """``MPSCNNConvolutionDescriptor``: window, channels, groups, dilation, fused neuron, batch norm.

    ``MPSCNNConvolutionDescriptor()`` gives a 3x3 window and 0 channels (a kernel needs them set);
    ``MPSCNNConvolutionDescriptor(kernelWidth=, kernelHeight=, inputFeatureChannels=,
    outputFeatureChannels=)`` and the factory ``cnnConvolutionDescriptor(...)`` set all four.

    Example:
        >>> d = MPSCNNConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=8,
        ...                                 outputFeatureChannels=16)
        >>> (d.strideInPixelsX, d.groups, d.fusedNeuronDescriptor.neuronType.name)
        (1, 1, 'none')
    """

    _owner = "MPSCNNConvolutionDescriptor"

    def __init__(self, **kwargs):
        if set(kwargs) == {"coder"}:  # init?(coder:)
            decode_with(kwargs["coder"], self, with_device=False)
            return
        four = {"kernelWidth", "kernelHeight", "inputFeatureChannels", "outputFeatureChannels"}
        if kwargs and set(kwargs) not in (four, four | {"neuronFilter"}):
            raise MPSTypeError(
                f"{type(self).__name__}({', '.join(sorted(kwargs))}): pass no arguments, or all of "
                "kernelWidth=, kernelHeight=, inputFeatureChannels=, outputFeatureChannels= (and, deprecated, "
                "neuronFilter=)"
            )
        self._kernelWidth = self._kernelHeight = 3
        self._inputFeatureChannels = self._outputFeatureChannels = 0
        self._strideInPixelsX = self._strideInPixelsY = 1
        self._dilationRateX = self._dilationRateY = 1
        self._groups = 1
        self._fused = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.none)
        self._neuron = None
        self._neuron_source = "fused"  # which of the two neuron routes was set last
        self._batch_norm: _BatchNorm | None = None
        for name in ("kernelWidth", "kernelHeight"):
            if name in kwargs:
                setattr(self, name, kwargs[name])
        for name in ("inputFeatureChannels", "outputFeatureChannels"):
            if name in kwargs:
                setattr(self, name, positive_int(kwargs[name], self._owner, name))
        if "neuronFilter" in kwargs:  # init(kernelWidth:kernelHeight:inputFeatureChannels:outputFeatureChannels:neuronFilter:)
            _deprecated(f"{type(self).__name__}(..., neuronFilter=)", "fusedNeuronDescriptor")
            self._set_legacy_neuron(kwargs["neuronFilter"])

    @classmethod
    def cnnConvolutionDescriptor(cls, *, kernelWidth, kernelHeight, inputFeatureChannels, outputFeatureChannels,
                                 neuronFilter=None):
        """ObjC factory ``cnnConvolutionDescriptorWithKernelWidth:kernelHeight:inputFeatureChannels:
        outputFeatureChannels:[neuronFilter:]`` (the ``neuronFilter`` form is deprecated)."""
        d = cls(kernelWidth=kernelWidth, kernelHeight=kernelHeight, inputFeatureChannels=inputFeatureChannels,
                outputFeatureChannels=outputFeatureChannels)
        if neuronFilter is not None:
            _deprecated("cnnConvolutionDescriptor(..., neuronFilter:)", "fusedNeuronDescriptor")
            d._set_legacy_neuron(neuronFilter)
        return d

    # -- geometry properties
    def _int_prop(name: str, minimum: int):
        attr = "_" + name

        def get(self):
            return getattr(self, attr)

        def set_(self, value):
            setattr(self, attr, positive_int(value, self._owner, name, minimum))

        return property(get, set_)

    kernelWidth = _int_prop("kernelWidth", 1)
    kernelHeight = _int_prop("kernelHeight", 1)
    inputFeatureChannels = _int_prop("inputFeatureChannels", 0)
    outputFeatureChannels = _int_prop("outputFeatureChannels", 0)
    strideInPixelsX = _int_prop("strideInPixelsX", 1)
    strideInPixelsY = _int_prop("strideInPixelsY", 1)
    groups = _int_prop("groups", 1)
    dilationRateX = _int_prop("dilationRateX", 1)
    dilationRateY = _int_prop("dilationRateY", 1)
    del _int_prop

    @classmethod
    def supportsSecureCoding(cls) -> bool:
        return True

    # -- neuron
    @property
    def fusedNeuronDescriptor(self) -> MPSNNNeuronDescriptor:
        return self._fused

    @fusedNeuronDescriptor.setter
    def fusedNeuronDescriptor(self, value) -> None:
        if not isinstance(value, MPSNNNeuronDescriptor):
            raise MPSTypeError(f"{self._owner}: fusedNeuronDescriptor={value!r} must be an MPSNNNeuronDescriptor "
                               "(it is never None; use neuron type none for no activation)")
        self._fused = value
        self._neuron_source = "fused"

    @property
    def neuron(self):
        """Deprecated legacy neuron kernel (an ``MPSCNNNeuron``), or None."""
        return self._neuron

    @neuron.setter
    def neuron(self, value) -> None:
        _deprecated("MPSCNNConvolutionDescriptor.neuron", "fusedNeuronDescriptor")
        self._set_legacy_neuron(value)

    def _set_legacy_neuron(self, value) -> None:
        if value is not None and not isinstance(value, MPSCNNNeuron):
            raise MPSTypeError(f"{self._owner}: neuron={value!r} must be an MPSCNNNeuron or None")
        self._neuron = value
        self._neuron_source = "legacy" if value is not None else "fused"

    def _active_neuron(self) -> MPSNNNeuronDescriptor:
        if self._neuron_source == "legacy" and self._neuron is not None:
            return self._neuron._descriptor
        return self._fused

    def setNeuronType(self, type, /, parameterA: float = 0.0, parameterB: float = 0.0) -> None:
        """``setNeuronType(_:parameterA:parameterB:)`` (deprecated); ``c`` takes the type's default."""
        _deprecated("MPSCNNConvolutionDescriptor.setNeuronType", "fusedNeuronDescriptor")
        neuron = MPSNNNeuronDescriptor.cnnNeuronDescriptor(type)
        if neuron.neuronType == MPSCNNNeuronType.pReLU:
            raise MPSValueError(f"{self._owner}.setNeuronType: pReLU needs per-channel parameters; use "
                                "setNeuronToPReLUWithParametersA or a cnnNeuronPReLUDescriptor")
        owner = f"{self._owner}.setNeuronType"
        neuron.a, neuron.b = as_float(parameterA, owner, "parameterA"), as_float(parameterB, owner, "parameterB")
        self.fusedNeuronDescriptor = neuron

    def setNeuronToPReLUWithParametersA(self, A, /) -> None:
        """``setNeuronToPReLUWithParametersA(_:)`` (deprecated): ``A`` holds ``O`` float32 values."""
        _deprecated("MPSCNNConvolutionDescriptor.setNeuronToPReLUWithParametersA", "fusedNeuronDescriptor")
        values = float32_values(A, f"{self._owner}.setNeuronToPReLUWithParametersA", "A")
        if values.size != self._outputFeatureChannels:
            raise MPSValueError(
                f"{self._owner}.setNeuronToPReLUWithParametersA: A holds {values.size * 4} bytes; "
                f"outputFeatureChannels={self._outputFeatureChannels} needs {4 * self._outputFeatureChannels}"
            )
        self.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(values.tobytes())

    def neuronType(self) -> MPSCNNNeuronType:
        """Deprecated getter: the active neuron's type."""
        _deprecated("MPSCNNConvolutionDescriptor.neuronType()", "fusedNeuronDescriptor.neuronType")
        return self._active_neuron().neuronType

    def neuronParameterA(self) -> float:
        _deprecated("MPSCNNConvolutionDescriptor.neuronParameterA()", "fusedNeuronDescriptor.a")
        return self._active_neuron().a

    def neuronParameterB(self) -> float:
        _deprecated("MPSCNNConvolutionDescriptor.neuronParameterB()", "fusedNeuronDescriptor.b")
        return self._active_neuron().b

    # -- batch norm
    def setBatchNormalizationParametersForInferenceWithMean(self, mean, /, variance, gamma, beta,
                                                            epsilon: float) -> None:
        """``setBatchNormalizationParametersForInferenceWithMean(_:variance:gamma:beta:epsilon:)``.

        Copies four float arrays of ``outputFeatureChannels`` values; all four None removes batch norm.
        """
        owner = f"{self._owner}.setBatchNormalizationParametersForInferenceWithMean"
        arrays = {"mean": mean, "variance": variance, "gamma": gamma, "beta": beta}
        given = [k for k, v in arrays.items() if v is not None]
        if not given:
            self._batch_norm = None
            return
        if len(given) != 4:
            missing = sorted(set(arrays) - set(given))
            raise MPSValueError(f"{owner}: {', '.join(missing)} is None; pass all four arrays, or all None to "
                                "remove batch normalization")
        eps = as_float(epsilon, owner, "epsilon")
        if not math.isfinite(eps):
            raise MPSValueError(f"{owner}: epsilon={epsilon!r} must be a finite float")
        copied = {}
        for name, value in arrays.items():
            values = float32_values(value, owner, name).copy()
            if values.size != self._outputFeatureChannels:
                raise MPSValueError(f"{owner}: {name} holds {values.size} floats; outputFeatureChannels="
                                    f"{self._outputFeatureChannels} needs exactly that many")
            copied[name] = values
        self._batch_norm = _BatchNorm(copied["mean"], copied["variance"], copied["gamma"], copied["beta"], eps)

    # -- copying, equality
    def copy(self, zone=None, /):
        """NSCopying: an independent deep copy."""
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._fused = self._fused.copy()
        if self._batch_norm is not None:
            bn = self._batch_norm
            other._batch_norm = _BatchNorm(*(a.copy() for a in bn.arrays()), bn.epsilon)
        return other

    def _fields(self) -> dict:
        return {name: getattr(self, name) for name in (
            "kernelWidth", "kernelHeight", "inputFeatureChannels", "outputFeatureChannels", "strideInPixelsX",
            "strideInPixelsY", "groups", "dilationRateX", "dilationRateY")}

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        bn_a, bn_b = self._batch_norm, other._batch_norm
        same_bn = (bn_a is None and bn_b is None) or (
            bn_a is not None and bn_b is not None and bn_a.epsilon == bn_b.epsilon
            and all(np.array_equal(x, y) for x, y in zip(bn_a.arrays(), bn_b.arrays())))
        return self._fields() == other._fields() and self._active_neuron() == other._active_neuron() and same_bn

    __hash__ = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self._fields().items())
        return f"{type(self).__name__}({fields}, neuron={self._active_neuron().neuronType.name})"

    # -- resolution (used at kernel construction)
    def _check_for_kernel(self, owner: str) -> None:
        """Combination rules checked when a kernel is built."""
        i, o, g = self._inputFeatureChannels, self._outputFeatureChannels, self._groups
        if i < 1 or o < 1:
            raise MPSValueError(f"{owner}: inputFeatureChannels={i} and outputFeatureChannels={o} must both be >= 1")
        if i % g:
            raise MPSValueError(f"{owner}: groups={g} must divide inputFeatureChannels={i}")
        if o % g:
            raise MPSValueError(f"{owner}: groups={g} must divide outputFeatureChannels={o}")
        if g > 1 and ((i // g) % 4 or (o // g) % 4):
            raise MPSValueError(
                f"{owner}: with groups={g}, channels per group must be multiples of 4; got {i // g} input and "
                f"{o // g} output channels per group"
            )

    def _resolve_neuron(self, owner: str) -> tuple[NeuronSpec, np.ndarray | None]:
        return self._active_neuron().resolve(owner, self._outputFeatureChannels)

    def _weight_shape(self) -> tuple[int, int, int, int]:
        """The effective weights' shape, OHWI: ``[O][kH][kW][I/G]``."""
        return (self._outputFeatureChannels, self._kernelHeight, self._kernelWidth,
                self._inputFeatureChannels // self._groups)

    def _kernel_groups(self) -> int:
        """The groups the convolution runs with (depthwise: one per channel)."""
        return self._groups


class MPSCNNDepthWiseConvolutionDescriptor(MPSCNNConvolutionDescriptor):
    """``MPSCNNDepthWiseConvolutionDescriptor``: each input channel filtered on its own.

    Output channel ``k·M + m`` reads input channel ``k`` only, with weights ``[O][kH][kW]`` (no
    input-channel axis). ``channelMultiplier = O / I``; only ``M = 1`` is supported, and ``groups``
    must stay 1.
    """

    _owner = "MPSCNNDepthWiseConvolutionDescriptor"

    @property
    def channelMultiplier(self) -> int:
        i = self._inputFeatureChannels
        return self._outputFeatureChannels // i if i else 0

    def _check_for_kernel(self, owner: str) -> None:
        i, o = self._inputFeatureChannels, self._outputFeatureChannels
        if i < 1 or o < 1:
            raise MPSValueError(f"{owner}: inputFeatureChannels={i} and outputFeatureChannels={o} must both be >= 1")
        if self._groups != 1:
            raise MPSValueError(f"{owner}: groups={self._groups}; a depthwise descriptor has groups 1 (each channel "
                                "is its own group already)")
        if o % i:
            raise MPSValueError(f"{owner}: outputFeatureChannels={o} must be a multiple of inputFeatureChannels={i}")
        if o != i:
            raise MPSValueError(f"{owner}: channelMultiplier={o // i} is not supported; a depthwise descriptor needs "
                                f"outputFeatureChannels == inputFeatureChannels (got {o} and {i})")

    def _weight_shape(self) -> tuple[int, int, int, int]:
        return self._outputFeatureChannels, self._kernelHeight, self._kernelWidth, 1

    def _kernel_groups(self) -> int:
        return self._inputFeatureChannels


@keywords("kernelWidth", "kernelHeight", "inputFeatureChannels", "outputFeatureChannels", "neuronFilter", "coder")
class MPSCNNSubPixelConvolutionDescriptor(MPSCNNConvolutionDescriptor):
    """``MPSCNNSubPixelConvolutionDescriptor``: a convolution of ``N = outputFeatureChannels`` channels
    fused with depth-to-space by ``r = subPixelScaleFactor``.

    Destination pixel ``(x, y)`` of the clip region, channel ``c < N/r²``, is intermediate pixel
    ``(x // r, y // r)``, channel ``(N/r²)·(r·(y mod r) + (x mod r)) + c``: TensorFlow's NHWC
    ``depth_to_space``, not PyTorch's ``pixel_shuffle`` (whose channel is ``c·r² + sub``).
    """

    _owner = "MPSCNNSubPixelConvolutionDescriptor"

    def __init__(self, **kwargs):
        self._subPixelScaleFactor = 1
        super().__init__(**kwargs)

    @property
    def subPixelScaleFactor(self) -> int:
        return self._subPixelScaleFactor

    @subPixelScaleFactor.setter
    def subPixelScaleFactor(self, value) -> None:
        self._subPixelScaleFactor = positive_int(value, self._owner, "subPixelScaleFactor")

    def _fields(self) -> dict:
        return {**super()._fields(), "subPixelScaleFactor": self._subPixelScaleFactor}

    def _check_for_kernel(self, owner: str) -> None:
        super()._check_for_kernel(owner)
        n, r = self._outputFeatureChannels, self._subPixelScaleFactor
        if n % (r * r):
            raise MPSValueError(f"{owner}: outputFeatureChannels={n} must be a multiple of subPixelScaleFactor² = "
                                f"{r * r}")
        if self._groups > 1 and (n // (r * r)) % 4:
            raise MPSValueError(f"{owner}: with groups={self._groups}, outputFeatureChannels / subPixelScaleFactor² = "
                                f"{n // (r * r)} must be a multiple of 4")
