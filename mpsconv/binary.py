"""``MPSCNNBinaryConvolution`` and ``MPSCNNBinaryFullyConnected`` (docs/semantics.md, "Binary convolution")."""
from __future__ import annotations

import numpy as np

from ._api import decode_with, keywords
from .convolution import DescribedKernel
from .datasource import check_protocol, read_array
from .descriptor import (
    MPSCNNBinaryConvolutionFlags, MPSCNNBinaryConvolutionType, MPSCNNConvolutionDescriptor,
)
from .errors import MPSTypeError, MPSValueError
from .types import as_enum, as_flags, as_float
from .core.geometry import MPSNNPaddingMethod, NeuronSpec
from .core.weights import BinaryParams
from .kernel import MPSCNNKernel


_INITIALIZERS = ("MPSCNNBinaryConvolution(device=, convolutionData=, scaleValue=, type=, flags=)",
                 "MPSCNNBinaryConvolution(device=, convolutionData=, outputBiasTerms=, outputScaleTerms=, "
                 "inputBiasTerms=, inputScaleTerms=, type=, flags=)",
                 "MPSCNNBinaryConvolution(coder=, device=)")


@keywords("device", "convolutionData", "scaleValue", "outputBiasTerms", "outputScaleTerms", "inputBiasTerms",
          "inputScaleTerms", "type", "flags", "coder")
class MPSCNNBinaryConvolution(DescribedKernel, MPSCNNKernel):
    """``MPSCNNBinaryConvolution``: 1-bit weights, optionally binarized input (XNOR / AND), scales.

    Per destination pixel and output channel ``o``, with ``S' = (S̃ + inBias) · inScale``::

        term = S'·(2·bit - 1)   (binaryWeights)   sgn(S')·(2·bit - 1)   (xnor)   [S' >= 0]·bit   (AND)
        D(X, Y, dfo + o) = f(Σ_{q,p,c} term · scale[o] · β(X, Y) + bias[o])

    ``β = 1`` unless ``flags`` has ``useBetaScaling``; then it is the mean of ``mean_c |S'|`` over a
    ``kW x kH`` window around the window centre. ``sgn(v) = v < 0 ? -1 : +1``. Window placement,
    offsets, clip region and edge modes are those of ``MPSCNNConvolution`` with ``groups = 1``.
    Weights (``convolutionData.weights()``) are ``ceil(I/32)·O·kH·kW`` uint32 words,
    ``[O][kH][kW][ceil(I/32)]``, channel ``c`` in bit ``c mod 32`` of word ``c // 32``.
    The default padding policy is valid-only.
    """

    _default_padding_method = MPSNNPaddingMethod.sizeValidOnly

    def __init__(self, **kwargs):
        keys = frozenset(kwargs)
        scale_form = {"device", "convolutionData", "scaleValue", "type", "flags"}
        full_form = {"device", "convolutionData", "outputBiasTerms", "outputScaleTerms", "inputBiasTerms",
                     "inputScaleTerms", "type", "flags"}
        owner = type(self).__name__
        if keys == scale_form:
            self._init_binary(kwargs, scale_value=kwargs["scaleValue"])
        elif keys == full_form:
            self._init_binary(kwargs, scale_value=None)
        elif keys in ({"coder", "device"}, {"coder"}):
            decode_with(kwargs["coder"], self, kwargs.get("device"))
        else:
            unavailable = " (init(device:) alone is unavailable)" if keys == {"device"} else ""
            raise MPSTypeError(f"{owner}({', '.join(sorted(keys))}){unavailable}: valid initializers are "
                               + "; ".join(i.replace("MPSCNNBinaryConvolution", owner) for i in _INITIALIZERS))

    def _init_binary(self, kwargs: dict, scale_value) -> None:
        owner = type(self).__name__
        self._init_cnn_kernel(kwargs["device"])
        self._type = as_enum(kwargs["type"], MPSCNNBinaryConvolutionType, owner, "type")
        try:
            self._flags = as_flags(kwargs["flags"], MPSCNNBinaryConvolutionFlags, owner, "flags")
        except MPSValueError:
            raise MPSValueError(f"{owner}: flags={kwargs['flags']!r} is not an MPSCNNBinaryConvolutionFlags "
                                "(none 0, useBetaScaling 1)") from None
        ds = kwargs["convolutionData"]
        self._data_source = ds
        check_protocol(ds, owner)
        if not ds.load():
            raise MPSValueError(f"{owner}: convolutionData.load() returned False; the kernel cannot be built")
        try:
            desc = ds.descriptor()
            if type(desc) is not MPSCNNConvolutionDescriptor:
                raise MPSTypeError(f"{owner}: convolutionData.descriptor() must be a plain "
                                   f"MPSCNNConvolutionDescriptor, not {type(desc).__name__}")
            desc = desc.copy()
            desc._check_for_kernel(owner)
            if desc.groups != 1:
                raise MPSValueError(f"{owner}: groups={desc.groups}; binary convolution has groups 1")
            self._check_descriptor(desc)
            i, o = desc.inputFeatureChannels, desc.outputFeatureChannels
            words = (i + 31) // 32
            bits = read_array(ds.weights(), np.uint32, o * desc.kernelHeight * desc.kernelWidth * words, owner,
                              "convolutionData.weights()").reshape(o, desc.kernelHeight, desc.kernelWidth, words)
            if i % 32:  # bits of channels >= I are ignored (our reading): clear them once, here
                bits[..., -1] &= np.uint32((1 << (i % 32)) - 1)
            if scale_value is not None:  # our reading: the data source's bias, one scale for all
                bias = ds.biasTerms()
                out_bias = np.zeros(o, np.float32) if bias is None else \
                    read_array(bias, np.float32, o, owner, "convolutionData.biasTerms()")
                out_scale = np.full(o, as_float(scale_value, owner, "scaleValue"), np.float32)
                in_bias, in_scale = np.zeros(i, np.float32), np.ones(i, np.float32)
            else:
                out_bias = _terms(kwargs["outputBiasTerms"], o, 0.0, owner, "outputBiasTerms")
                out_scale = _terms(kwargs["outputScaleTerms"], o, 1.0, owner, "outputScaleTerms")
                in_bias = _terms(kwargs["inputBiasTerms"], i, 0.0, owner, "inputBiasTerms")
                in_scale = _terms(kwargs["inputScaleTerms"], i, 1.0, owner, "inputScaleTerms")
            neuron, prelu = desc._resolve_neuron(owner)
            label = ds.label()
        finally:
            ds.purge()
        self._desc = desc
        self._neuron_spec, self._prelu = neuron, prelu
        self._binary_params = BinaryParams(bits, in_bias, in_scale, out_bias, out_scale)
        self._param_tuple = (self._binary_params, None, prelu)
        self.label = label

    def _check_descriptor(self, descriptor) -> None:
        """Class-specific descriptor rules (the fully connected subclass adds its own)."""

    # -- properties
    type = property(lambda self: self._type)
    flags = property(lambda self: self._flags)

    # -- kernel interface
    def _channels(self):
        return self._desc.inputFeatureChannels, self._desc.outputFeatureChannels, 1

    def _neuron(self) -> NeuronSpec:
        return self._neuron_spec

    def _params(self):
        return self._param_tuple

    def _binary(self) -> tuple[int, bool]:
        return int(self._type), bool(self._flags & MPSCNNBinaryConvolutionFlags.useBetaScaling)


class MPSCNNBinaryFullyConnected(MPSCNNBinaryConvolution):
    """``MPSCNNBinaryFullyConnected``: binary convolution whose window is the whole source."""

    _fully_connected = True

    def _check_descriptor(self, descriptor) -> None:
        owner = type(self).__name__
        if descriptor.strideInPixelsX != 1 or descriptor.strideInPixelsY != 1 or descriptor.dilationRateX != 1 \
                or descriptor.dilationRateY != 1:
            raise MPSValueError(f"{owner}: a fully connected kernel has stride 1 and dilation 1")


def _terms(values, count: int, default: float, owner: str, name: str) -> np.ndarray:
    if values is None:
        return np.full(count, default, np.float32)
    return read_array(values, np.float32, count, owner, name)


