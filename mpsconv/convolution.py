"""``MPSCNNConvolution`` and ``MPSCNNFullyConnected`` (docs/semantics.md, "The convolution")."""
from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import torch

from ._api import decode_with, keywords
from .core.activations import MPSCNNNeuronType
from .core.geometry import MPSNNPaddingMethod, NeuronSpec
from .core.weights import KeptWeights, round_weights
from .datasource import LoadedWeights, _ArrayDataSource, load_weights, read_array
from .descriptor import (
    MPSCNNConvolutionDescriptor, MPSCNNConvolutionFlags, MPSNNConvolutionAccumulatorPrecisionOption,
)
from .errors import MPSTypeError, MPSValueError
from .image import MPSImage
from .kernel import MPSCNNKernel
from .neuron import MPSNNNeuronDescriptor, _deprecated
from .convolution_state import MPSCNNConvolutionGradientState, MPSCNNConvolutionWeightsAndBiasesState
from .types import as_enum, MPSDataType

Accumulator = MPSNNConvolutionAccumulatorPrecisionOption

_INITIALIZERS = (
    "MPSCNNConvolution(device=, weights=dataSource)",
    "MPSCNNConvolution(device=, convolutionDescriptor=, kernelWeights=, biasTerms=, flags=) (deprecated)",
    "MPSCNNConvolution(coder=, device=)",
)


class DescribedKernel:
    """The read-only properties of a kernel made from a convolution descriptor (its ``_desc``)."""

    inputFeatureChannels = property(lambda self: self._desc.inputFeatureChannels)
    outputFeatureChannels = property(lambda self: self._desc.outputFeatureChannels)
    kernelWidth = property(lambda self: self._desc.kernelWidth)
    kernelHeight = property(lambda self: self._desc.kernelHeight)
    strideInPixelsX = property(lambda self: self._desc.strideInPixelsX)
    strideInPixelsY = property(lambda self: self._desc.strideInPixelsY)
    dilationRateX = property(lambda self: self._desc.dilationRateX)
    dilationRateY = property(lambda self: self._desc.dilationRateY)


class _WeightedKernel(DescribedKernel, MPSCNNKernel):
    """What every kernel with a data source shares: the load cycle, the effective weights, their
    properties and reloads, archiving. Public classes add their initializers and geometry."""

    _default_padding_method = MPSNNPaddingMethod.sizeSame
    _data_types = (MPSDataType.float32, MPSDataType.float16, MPSDataType.uInt8)

    # -- construction
    def _init_data_source(self, device, data_source, archivable: bool = True) -> None:
        self._init_cnn_kernel(device)
        self._accumulator = Accumulator.float
        self._data_source = data_source
        self._archivable = archivable
        self._install(self._load())
        self.label = self._loaded.label

    def _init_pointers(self, device, descriptor, kernel_weights, bias_terms, flags) -> None:
        owner = type(self).__name__
        if not isinstance(descriptor, MPSCNNConvolutionDescriptor):
            raise MPSTypeError(f"{owner}: convolutionDescriptor={descriptor!r} must be an MPSCNNConvolutionDescriptor")
        try:
            flags = MPSCNNConvolutionFlags(int(flags))
        except (TypeError, ValueError):
            raise MPSValueError(f"{owner}: flags={flags!r}; MPSCNNConvolutionFlags.none (0) is the only value") from None
        desc = descriptor.copy()
        desc._check_for_kernel(owner)
        weights = read_array(kernel_weights, np.float32, int(np.prod(desc._weight_shape())), owner, "kernelWeights")
        bias = None if bias_terms is None else \
            read_array(bias_terms, np.float32, desc.outputFeatureChannels, owner, "biasTerms")
        self._init_data_source(device, _ArrayDataSource(desc, weights, bias), archivable=False)

    def _load(self) -> LoadedWeights:
        return load_weights(self._data_source, type(self).__name__, accumulator=self._accumulator,
                            check_descriptor=self._check_descriptor, data_types=self._data_types)

    def _install(self, loaded: LoadedWeights) -> None:
        self._loaded = loaded
        self._param_tuple = (loaded.kept, loaded.bias, loaded.prelu)
        self._drop_caches()

    def _check_descriptor(self, descriptor: MPSCNNConvolutionDescriptor) -> None:
        """Class-specific descriptor rules (subclasses add theirs)."""

    def _copy_into(self, other, device) -> None:
        """As MPS does: the data source's ``copy(zone, device)`` if it takes a device, else
        ``copy(zone)``, else the copy shares the data source."""
        copy = getattr(self._data_source, "copy", None)
        if callable(copy):
            if "device" in inspect.signature(copy).parameters:
                other._data_source = copy(None, device=device or self._device)
            else:
                other._data_source = copy(None)

    # -- properties
    @property
    def _desc(self) -> MPSCNNConvolutionDescriptor:
        return self._loaded.descriptor

    groups = property(lambda self: self._desc.groups)
    dataSource = property(lambda self: self._data_source)
    subPixelScaleFactor = property(lambda self: getattr(self._desc, "subPixelScaleFactor", 1))

    @property
    def channelMultiplier(self) -> int:
        """``M`` for a depthwise kernel, 0 for every other kernel."""
        return getattr(self._desc, "channelMultiplier", 0)

    @property
    def accumulatorPrecisionOption(self) -> Accumulator:
        return self._accumulator

    @accumulatorPrecisionOption.setter
    def accumulatorPrecisionOption(self, value) -> None:
        value = as_enum(value, Accumulator, type(self).__name__, "accumulatorPrecisionOption")
        if value == Accumulator.half and self._loaded.kernel_weights_type == MPSDataType.float32:
            raise MPSValueError(f"{type(self).__name__}: accumulatorPrecisionOption=.half is not allowed with "
                                "float32 kernel weights (kernelWeightsDataType() == float32)")
        self._accumulator = value

    @property
    def fusedNeuronDescriptor(self) -> MPSNNNeuronDescriptor:
        return self._desc._active_neuron().copy()

    @property
    def neuron(self):
        _deprecated(f"{type(self).__name__}.neuron", "fusedNeuronDescriptor")
        return self._desc._neuron

    @property
    def neuronType(self) -> MPSCNNNeuronType:
        _deprecated(f"{type(self).__name__}.neuronType", "fusedNeuronDescriptor.neuronType")
        return self._desc._active_neuron().neuronType

    def _legacy_parameter(self, name: str) -> float:
        _deprecated(f"{type(self).__name__}.neuronParameter{name.upper()}", f"fusedNeuronDescriptor.{name}")
        neuron = self._desc._active_neuron()
        return 1.0 if neuron.neuronType == MPSCNNNeuronType.none else getattr(neuron, name)

    neuronParameterA = property(lambda self: self._legacy_parameter("a"))
    neuronParameterB = property(lambda self: self._legacy_parameter("b"))
    neuronParameterC = property(lambda self: self._legacy_parameter("c"))

    # -- kernel interface
    def _channels(self):
        d = self._desc
        return d.inputFeatureChannels, d.outputFeatureChannels, d._kernel_groups()

    def _neuron(self) -> NeuronSpec:
        return self._loaded.neuron

    def _subpixel(self) -> int:
        return self.subPixelScaleFactor

    def _float32_weights(self) -> bool:
        return self._loaded.kernel_weights_type == MPSDataType.float32

    def _allocated_geometry(self, source, kernel, stride, dilation, rule, owner):
        """Sub-pixel kernels allocate ``r ·`` the forward size (our reading); ``offset`` as forward."""
        (h, w), offset = super()._allocated_geometry(source, kernel, stride, dilation, rule, owner)
        r = self._subpixel()
        return (h * r, w * r), offset

    def _params(self):
        return self._param_tuple

    def encodingStorageSize(self, *, sourceImage, sourceStates=None, destinationImage=None) -> int:
        """The float32 intermediate the backends allocate: ``O x H x W`` of the destination."""
        image = destinationImage if destinationImage is not None else sourceImage
        if not isinstance(image, MPSImage):
            raise MPSTypeError(f"{type(self).__name__}.encodingStorageSize: {image!r} is not an MPSImage")
        return 4 * self.outputFeatureChannels * image.width * image.height * image.numberOfImages

    # -- weights
    def reloadWeightsAndBiasesFromDataSource(self) -> None:
        """Re-run the data-source cycle; encodes issued afterwards use the new weights."""
        if not self._archivable:
            raise MPSValueError(f"{type(self).__name__}.reloadWeightsAndBiasesFromDataSource: a kernel made with "
                                "the deprecated pointer initializer has no data source to reload")
        self._install(self._load())

    def reloadWeightsAndBiases(self, with_=None, /, **kwargs) -> None:
        """``reloadWeightsAndBiases(with: commandBuffer, state:)`` and, deprecated,
        ``reloadWeightsAndBiases(with: dataSource)`` (the argument is ignored; the original data
        source is read again)."""
        if "state" in kwargs:
            return self.reloadWeightsAndBiasesWithCommandBuffer(with_, kwargs["state"])
        _deprecated("reloadWeightsAndBiases(with: dataSource)", "reloadWeightsAndBiasesFromDataSource()")
        self.reloadWeightsAndBiasesFromDataSource()

    reloadWeightsAndBiasesWithDataSource = reloadWeightsAndBiases

    def reloadWeightsAndBiasesWithCommandBuffer(self, commandBuffer, state, /) -> None:
        """``reloadWeightsAndBiases(with:state:)``: the state's float32 OHWI weights and biases (None:
        zeros) become the effective weights, taken as final (no batch-norm folding) and rounded to the
        kernel weight type; the state's read count drops by one.

        Like every property, the weights are read when this is encoded (as every property):
        encodes recorded after it use them; CPU writes into the state after this call are not seen.
        """
        owner = f"{type(self).__name__}.reloadWeightsAndBiases"
        self._check_cb(commandBuffer, owner)
        commandBuffer._check_open(owner)
        if not self._archivable:
            raise MPSValueError(f"{owner}: a kernel made with the deprecated pointer initializer cannot be "
                                "trained; build it from a data source")
        if not isinstance(state, MPSCNNConvolutionWeightsAndBiasesState):
            raise MPSTypeError(f"{owner}: state={type(state).__name__} must be an "
                               "MPSCNNConvolutionWeightsAndBiasesState")
        state._check_for_encode(commandBuffer, owner, "state")
        shape = self._desc._weight_shape()
        weights = state.weight_values(int(np.prod(shape)), owner).numpy().reshape(shape).copy()
        biases = state.bias_values(shape[0], owner)
        bias = np.zeros(shape[0], np.float32) if biases is None else biases.numpy().copy()
        self._install(replace(self._loaded, kept=KeptWeights(round_weights(weights, self._loaded.kernel_weights_type)),
                              bias=bias))
        state._consume_read()

    def exportWeightsAndBiases(self, commandBuffer, /, resultStateCanBeTemporary: bool = False):
        """``exportWeightsAndBiases(with:resultStateCanBeTemporary:)``: a new state holding the
        effective weights (float32 OHWI, batch norm folded, widened from half) and biases."""
        owner = f"{type(self).__name__}.exportWeightsAndBiases"
        self._check_cb(commandBuffer, owner)
        commandBuffer._check_open(owner)
        if resultStateCanBeTemporary:
            state = MPSCNNConvolutionWeightsAndBiasesState.temporaryCNNConvolutionWeightsAndBiasesState(
                commandBuffer=commandBuffer, cnnConvolutionDescriptor=self._desc)
        else:
            state = MPSCNNConvolutionWeightsAndBiasesState(device=self._device, cnnConvolutionDescriptor=self._desc)
        weights = self._loaded.weights
        state.weight_values(weights.size, owner).copy_(torch.from_numpy(weights.reshape(-1)))
        state.bias_values(self._loaded.bias.size, owner).copy_(torch.from_numpy(self._loaded.bias))
        return state

    def _result_state_class(self):
        return MPSCNNConvolutionGradientState




@keywords("device", "weights", "convolutionDescriptor", "kernelWeights", "biasTerms", "flags", "coder")
class MPSCNNConvolution(_WeightedKernel):
    """``MPSCNNConvolution``: cross-correlation + bias + inference batch norm + fused neuron.

    For each destination pixel of the clip region and output channel ``o``::

        D(X, Y, dfo + o) = f(B'[o] + Σ_{q,p,c} W'[o][q][p][c] · S̃(xs(u, p), ys(v, q), sfo + grp(o)·Ig + c))

    with the window centred at ``offset + (u·strideX, v·strideY)`` (docs/semantics.md, "Window placement") and ``W'``, ``B'`` the
    effective weights (batch norm folded, float16-rounded unless the data source asks for float32).

    Initializers (keyword sets, as Swift's overloads):
      ``MPSCNNConvolution(device=, weights=dataSource)``: the designated one.
      ``MPSCNNConvolution(device=, convolutionDescriptor=, kernelWeights=, biasTerms=, flags=)``:
      deprecated; float32 OHWI weights, always rounded to float16; cannot be archived.
      ``MPSCNNConvolution(coder=, device=)``: from an archive (see ``mpsconv.coding``).

    Example (a 3x3 box sum; out-of-image taps read 0):
        >>> import numpy as np, warnings
        >>> from mpsconv import *
        >>> dev = MTLCreateSystemDefaultDevice()
        >>> desc = MPSCNNConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=1,
        ...                                    outputFeatureChannels=1)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     conv = MPSCNNConvolution(device=dev, convolutionDescriptor=desc, kernelWeights=np.ones(9),
        ...                              biasTerms=None, flags=MPSCNNConvolutionFlags.none)
        >>> src = MPSImage.from_numpy(np.ones((3, 3, 1)), device=dev)
        >>> with use_backend("reference"):
        ...     cb = dev.makeCommandQueue().makeCommandBuffer()
        ...     dst = conv.encode(commandBuffer=cb, sourceImage=src)
        ...     cb.commit(); cb.waitUntilCompleted()
        >>> dst.featureChannels, conv.offset
        (1, MPSOffset(x=0, y=0, z=0))
    """

    def __init__(self, **kwargs):
        keys = frozenset(kwargs)
        owner = type(self).__name__
        if keys == {"device", "weights"}:
            self._init_data_source(kwargs["device"], kwargs["weights"])
        elif keys in ({"device", "convolutionDescriptor", "kernelWeights", "biasTerms", "flags"},
                      {"device", "convolutionDescriptor", "kernelWeights", "biasTerms"}):
            _deprecated(f"{owner}(device:convolutionDescriptor:kernelWeights:biasTerms:flags:)",
                        f"{owner}(device=, weights=dataSource)")
            self._init_pointers(kwargs["device"], kwargs["convolutionDescriptor"], kwargs["kernelWeights"],
                                kwargs["biasTerms"], kwargs.get("flags", MPSCNNConvolutionFlags.none))
        elif keys in ({"coder", "device"}, {"coder"}):
            decode_with(kwargs["coder"], self, kwargs.get("device"))
        else:
            unavailable = " (init(device:) alone is unavailable)" if keys == {"device"} else ""
            raise MPSTypeError(f"{owner}({', '.join(sorted(keys))}){unavailable}: valid initializers are "
                               + "; ".join(i.replace("MPSCNNConvolution", owner) for i in _INITIALIZERS))



class MPSCNNFullyConnected(MPSCNNConvolution):
    """``MPSCNNFullyConnected``: a convolution whose window is the whole source; writes one pixel.

    ``r(o) = B'[o] + Σ_{y,x,c} W'[o][y][x][c] · S(x, y, sfo + c)``, i.e. a matrix-vector product
    per image. The window must equal the source (``kernelWidth == width``, ``kernelHeight ==
    height``, checked at encode); ``offset`` x/y is ignored; the clip region is one pixel. The
    default padding policy is valid-only, so the allocating encode returns a 1x1 image.
    """

    _default_padding_method = MPSNNPaddingMethod.sizeValidOnly
    _fully_connected = True

    def _check_descriptor(self, descriptor) -> None:
        super()._check_descriptor(descriptor)
        owner = type(self).__name__
        if type(descriptor) is not MPSCNNConvolutionDescriptor:
            raise MPSTypeError(f"{owner}: a fully connected kernel takes a plain MPSCNNConvolutionDescriptor, not "
                               f"{type(descriptor).__name__}")
        if descriptor.strideInPixelsX != 1 or descriptor.strideInPixelsY != 1:
            raise MPSValueError(f"{owner}: strideInPixelsX={descriptor.strideInPixelsX}, strideInPixelsY="
                                f"{descriptor.strideInPixelsY}; a fully connected kernel has stride 1")
        if descriptor.groups != 1:
            raise MPSValueError(f"{owner}: groups={descriptor.groups}; a fully connected kernel has groups 1")
        if descriptor.dilationRateX != 1 or descriptor.dilationRateY != 1:
            raise MPSValueError(f"{owner}: dilation {descriptor.dilationRateX}x{descriptor.dilationRateY}; the "
                                "window of a fully connected kernel is the whole source (dilation 1)")


