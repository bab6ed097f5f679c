"""The gradient kernels: ``MPSCNNConvolutionGradient``, ``MPSCNNFullyConnectedGradient`` and
``MPSCNNConvolutionTransposeGradient`` (the states they read live in ``convolution_state.py``),
``MPSCNNNeuronGradient``, and ``encode_data_source_update``."""
from __future__ import annotations

import inspect
import warnings
from dataclasses import replace

import numpy as np

from ._api import decode_with, keywords
from .convolution import _WeightedKernel
from .descriptor import MPSCNNConvolutionDescriptor, MPSCNNConvolutionGradientOption
from .encoder import GradientJob, NeuronGradientJob
from .errors import MPSDeviceError, MPSTypeError, MPSValueError
from .core.geometry import (
    ConvProblem, NeuronSpec, backwards_kernel_offset, gradient_secondary_offset, gradient_window_shifts,
)
from .image import MPSImage, MPSImageDescriptor, MPSTemporaryImage
from .kernel import MPSCNNKernel, MPSImageEdgeMode, kernel_offset_property
from .metal import MTLCommandBuffer, check_open_buffer
from .neuron import MPSCNNNeuron, NeuronKernel, _deprecated
from .state import MPSNNGradientState
from .convolution_state import (
    MPSCNNConvolutionGradientState, MPSCNNConvolutionTransposeGradientState,
)
from .types import MPSDataType, MPSOffset, as_bool, as_int, as_list, as_offset


# --------------------------------------------------------------------------------------------
# MPSCNNConvolutionGradient


@keywords("device", "weights", "coder")
class MPSCNNConvolutionGradient(_WeightedKernel):
    """``MPSCNNConvolutionGradient``: back-propagation through an ``MPSCNNConvolution``.

    ``encode(commandBuffer=, sourceGradient=E, sourceImage=S, gradientState=state[,
    destinationGradient=])`` writes ``dL/dS`` (the forward source's size, ``I`` channels) and fills
    ``state.gradientForWeights`` / ``gradientForBiases`` (float32, OHWI), per ``gradientOption``.
    ``E`` is the gradient of the forward output before its neuron (docs/semantics.md, "Gradients") and has the
    forward clip region's size. The encode that returns ``dL/dS`` places the windows as the forward
    encode recorded in the state, and sets ``kernelOffsetX/Y``, ``primaryOffset`` and
    ``secondaryOffset`` to match (so does ``destinationImageDescriptor(sourceImages:sourceStates:)``);
    the encode into a caller's ``destinationGradient`` uses them as they are set, as in MPS
    (docs/semantics.md, "Gradients"). Over a batch the weight and bias gradients are summed. Initializers:
    ``MPSCNNConvolutionGradient(device=, weights=dataSource)`` (the forward kernel's data source),
    ``MPSCNNConvolutionGradient(coder=, device=)``.
    """

    _input_state_class = MPSCNNConvolutionGradientState

    def __init__(self, **kwargs):
        keys = frozenset(kwargs)
        name = type(self).__name__
        if keys == {"device", "weights"}:
            self._gradient_option = MPSCNNConvolutionGradientOption.all
            self._serialize = False
            self._init_data_source(kwargs["device"], kwargs["weights"])
        elif keys in ({"coder", "device"}, {"coder"}):
            decode_with(kwargs["coder"], self, kwargs.get("device"))
        else:
            unavailable = " (init(device:) alone is unavailable)" if keys == {"device"} else ""
            raise MPSTypeError(f"{name}({', '.join(sorted(keys))}){unavailable}: valid initializers are "
                               f"{name}(device=, weights=dataSource) and {name}(coder=, device=)")

    def _result_state_class(self):
        return None

    def _check_descriptor(self, descriptor) -> None:
        if getattr(descriptor, "subPixelScaleFactor", 1) > 1:
            raise MPSValueError(f"{type(self).__name__}: sub-pixel kernels (subPixelScaleFactor="
                                f"{descriptor.subPixelScaleFactor}) have no gradient")

    sourceGradientFeatureChannels = property(lambda self: self._desc.outputFeatureChannels)
    sourceImageFeatureChannels = property(lambda self: self._desc.inputFeatureChannels)

    @property
    def gradientOption(self) -> MPSCNNConvolutionGradientOption:
        return self._gradient_option

    @gradientOption.setter
    def gradientOption(self, value) -> None:
        value = as_int(value, type(self).__name__, "gradientOption")
        if value not in (1, 2, 3):
            raise MPSValueError(f"{type(self).__name__}: gradientOption must be gradientWithData (1), "
                                "gradientWithWeightsAndBias (2) or all (3)")
        self._gradient_option = MPSCNNConvolutionGradientOption(value)

    @property
    def serializeWeightsAndBiases(self) -> bool:
        _deprecated(f"{type(self).__name__}.serializeWeightsAndBiases", "nothing (it has no effect)")
        return self._serialize

    @serializeWeightsAndBiases.setter
    def serializeWeightsAndBiases(self, value) -> None:
        _deprecated(f"{type(self).__name__}.serializeWeightsAndBiases", "nothing (it has no effect)")
        self._serialize = as_bool(value, type(self).__name__, "serializeWeightsAndBiases")

    # -- window placement (MPSCNNGradientKernel, MPSCNNBinaryKernel). The primary source is the
    # incoming gradient, the secondary the forward source. The allocating encode and
    # destinationImageDescriptor(sourceImages:sourceStates:) set the offsets from the gradient state;
    # the encode into a caller's destinationGradient uses them as they are.
    _kernel_offset = (0, 0)  # (y, x)
    _primary_offset = _secondary_offset = MPSOffset(0, 0, 0)
    _secondary_edge = MPSImageEdgeMode.zero

    kernelOffsetY = kernel_offset_property(0, "kernelOffsetY")
    kernelOffsetX = kernel_offset_property(1, "kernelOffsetX")

    @property
    def primaryOffset(self) -> MPSOffset:
        """``primaryOffset``: where the incoming gradient's data starts (the data gradient only)."""
        return self._primary_offset

    @primaryOffset.setter
    def primaryOffset(self, value) -> None:
        self._primary_offset = as_offset(value, f"{type(self).__name__}.primaryOffset")

    @property
    def secondaryOffset(self) -> MPSOffset:
        """``secondaryOffset``: the forward source's first read pixel, ``offset - (Kd >> 1)`` (the
        weight and bias gradients only)."""
        return self._secondary_offset

    @secondaryOffset.setter
    def secondaryOffset(self, value) -> None:
        self._secondary_offset = as_offset(value, f"{type(self).__name__}.secondaryOffset")

    # the two sources' windows: the forward convolution's (read-only here; MPS sets them at init)
    primaryKernelWidth = secondaryKernelWidth = property(lambda self: self.kernelWidth)
    primaryKernelHeight = secondaryKernelHeight = property(lambda self: self.kernelHeight)
    primaryStrideInPixelsX = secondaryStrideInPixelsX = property(lambda self: self.strideInPixelsX)
    primaryStrideInPixelsY = secondaryStrideInPixelsY = property(lambda self: self.strideInPixelsY)
    primaryDilationRateX = secondaryDilationRateX = property(lambda self: self.dilationRateX)
    primaryDilationRateY = secondaryDilationRateY = property(lambda self: self.dilationRateY)
    primaryEdgeMode = property(lambda self: MPSImageEdgeMode.zero,
                               doc="``primaryEdgeMode``: the incoming gradient is zero outside its data.")
    secondaryEdgeMode = property(lambda self: self._secondary_edge,
                                 doc="``secondaryEdgeMode``: the forward encode's edge mode, from the state.")
    primarySourceFeatureChannelOffset = MPSCNNKernel.sourceFeatureChannelOffset
    primarySourceFeatureChannelMaxCount = MPSCNNKernel.sourceFeatureChannelMaxCount

    def _configured(self, state) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(kernelOffset, secondaryOffset)`` as ``(y, x)`` pairs for ``state``'s forward offset ``o``:
        ``-o + (1 if Kd is even else 0)`` and ``o - (Kd >> 1)`` (``primaryOffset`` 0)."""
        o = state.forward_offset
        kernel, _, dilation = self._window()
        return (backwards_kernel_offset((o.y, o.x), kernel, dilation),
                gradient_secondary_offset((o.y, o.x), kernel, dilation))

    def _configure(self, state) -> None:
        """Set the offsets as the state-driven encode does (MPS's "Note on setting correct offsets")."""
        kernel_offset, (sy, sx) = self._configured(state)
        z = state.forward_offset.z
        self._kernel_offset = kernel_offset
        self._primary_offset, self._secondary_offset = MPSOffset(0, 0, 0), MPSOffset(sx, sy, z)
        problem = getattr(state, "_problem", None)
        if problem is not None:
            self._secondary_edge = MPSImageEdgeMode(int(problem.edge))

    def _shifts(self, state) -> tuple[tuple[int, int], tuple[int, int]]:
        """How far the offsets as set move the data and weight gradients' windows from the state's."""
        p, q = self._primary_offset, self._secondary_offset
        _, stride, _ = self._window()
        return gradient_window_shifts(self._kernel_offset, (p.y, p.x), (q.y, q.x), self._configured(state), stride)

    def destinationImageDescriptor(self, *, sourceImages, sourceStates=None) -> MPSImageDescriptor:
        """``destinationImageDescriptor(sourceImages:sourceStates:)``: ``sourceImages`` are the
        incoming gradient and the forward source; with the forward's gradient state it also **sets**
        ``kernelOffsetX/Y``, ``primaryOffset`` and ``secondaryOffset`` as the state-driven encode does.
        The descriptor is the forward source's size with ``destinationFeatureChannelOffset +
        inputFeatureChannels`` channels in its format."""
        owner = f"{type(self).__name__}.destinationImageDescriptor"
        images = as_list(sourceImages, owner, "sourceImages")
        if len(images) != 2 or not all(isinstance(image, MPSImage) for image in images):
            raise MPSTypeError(f"{owner}: sourceImages must be [sourceGradient, sourceImage], two MPSImages")
        states = [s for s in (as_list(sourceStates, owner, "sourceStates", allow_none=True) or ()) if s is not None]
        if states and not isinstance(states[0], self._input_state_class):
            raise MPSTypeError(f"{owner}: sourceStates[0]={type(states[0]).__name__} must be an "
                               f"{self._input_state_class.__name__} from the forward kernel")
        source = images[1]
        if states:
            self._configure(states[0])
        return MPSImageDescriptor(channelFormat=source.featureChannelFormat, width=source.width,
                                  height=source.height, featureChannels=self._dfo + self.inputFeatureChannels,
                                  numberOfImages=source.numberOfImages)

    # -- encode
    def _encode_kw(self, *, commandBuffer, sourceGradient, sourceImage, gradientState,
                   destinationGradient=None):
        out = self._encode_gradient(commandBuffer, [sourceGradient], [sourceImage], [gradientState],
                                    None if destinationGradient is None else [destinationGradient],
                                    self._owner())
        return None if destinationGradient is not None else out[0]

    def encodeBatch(self, *, commandBuffer, sourceGradients, sourceImages, gradientStates,
                    destinationGradients=None):
        """``encodeBatch(commandBuffer:sourceGradients:sourceImages:gradientStates:[destinationGradients:])``."""
        out = self._encode_gradient(commandBuffer, *_batch_lists(self._owner("encodeBatch"), sourceGradients,
                                                                 sourceImages, gradientStates, destinationGradients),
                                    self._owner("encodeBatch"))
        return None if destinationGradients is not None else out

    def _encode_gradient(self, cb, gradients, sources, states, destinations, owner):
        saved = (self._kernel_offset, self._primary_offset, self._secondary_offset, self._secondary_edge)
        try:
            return self._encode_gradient_checked(cb, gradients, sources, states, destinations, owner)
        except Exception:  # a refused encode leaves the offsets as they were
            self._kernel_offset, self._primary_offset, self._secondary_offset, self._secondary_edge = saved
            raise

    def _encode_gradient_checked(self, cb, gradients, sources, states, destinations, owner):
        self._check_cb(cb, owner)
        if not isinstance(cb, MTLCommandBuffer):
            raise MPSTypeError(f"{owner}: commandBuffer={cb!r} must be an MTLCommandBuffer")
        lengths = {len(gradients), len(sources), len(states)} | ({len(destinations)} if destinations else set())
        if len(lengths) != 1:
            raise MPSValueError(f"{owner}: sourceGradients, sourceImages, gradientStates (and "
                                "destinationGradients) must have the same length")
        if destinations is None:  # the state-driven form: the state sets the offsets
            if not states or not isinstance(states[0], self._input_state_class):
                raise MPSTypeError(f"{owner}: gradientState={type(states[0]).__name__} must be an "
                                   f"{self._input_state_class.__name__} from the forward kernel")
            self._configure(states[0])
        pending = []
        for i, (e, src, state) in enumerate(zip(gradients, sources, states)):
            pending.append(self._check_one(cb, e, src, state, owner, f"[{i}]" if len(sources) > 1 else ""))
        allocated = []
        if destinations is None:
            destinations = []
            for problem, e, src, state in pending:
                desc = MPSImageDescriptor(channelFormat=src.featureChannelFormat, width=src.width,
                                          height=src.height, featureChannels=self._dfo + problem.in_channels,
                                          numberOfImages=src.numberOfImages)
                image = self._allocator.image(cb, imageDescriptor=desc, kernel=self)
                destinations.append(image)
                allocated.append(image)
        try:
            for (problem, e, src, state), dst in zip(pending, destinations):
                self._check_destination(dst, src, problem, cb, owner)
        except Exception:
            for image in allocated:
                if isinstance(image, MPSTemporaryImage) and image.readCount > 0:
                    image._read_count = 0
            raise
        option = self._gradient_option
        cb._begin_encode(owner)
        try:
            jobs, seen_states = [], set()
            for (problem, e, src, state), dst in zip(pending, destinations):
                accumulate = id(state) in seen_states  # one state per batch: sum over the batch
                seen_states.add(id(state))
                weights = biases = None
                if option & MPSCNNConvolutionGradientOption.gradientWithWeightsAndBias:
                    weights, biases = (buffer.as_float32(0, buffer.length // 4, owner)
                                       for buffer in (state.gradientForWeights, state.gradientForBiases))
                data = dst if option & MPSCNNConvolutionGradientOption.gradientWithData else None
                data_problem, weights_problem = self._placed(problem, e, state)
                if data_problem == weights_problem:
                    jobs.append(GradientJob(data_problem, e, self._sfo, src, data, weights, biases, accumulate))
                    continue
                if data is not None:
                    jobs.append(GradientJob(data_problem, e, self._sfo, src, data, None, None, False))
                if weights is not None:
                    jobs.append(GradientJob(weights_problem, e, self._sfo, src, None, weights, biases, accumulate))
            self._encoder.encode_gradient(self, cb, jobs, owner)
            for state in {id(s): s for s in states}.values():
                state._consume_read()
        finally:
            cb._end_encode()
        return destinations

    def _placed(self, problem: ConvProblem, e: MPSImage, state) -> tuple[ConvProblem, ConvProblem]:
        """The data and weight gradients' forward problems with the offsets as set: the state's
        problem where they are what the state configures. With ``primaryOffset`` set, the whole
        incoming gradient is the data gradient's output (zero outside its data, as MPS asks)."""
        (dy, dx), (wy, wx) = self._shifts(state)
        p = self._primary_offset
        out_size = (e.height, e.width) if (p.x, p.y) != (0, 0) else problem.out_size
        ty, tx = problem.tap0
        return (replace(problem, tap0=(ty + dy, tx + dx), out_size=out_size),
                replace(problem, tap0=(ty + wy, tx + wx)))

    def _check_one(self, cb, e, src, state, owner, index):
        _check_images(self, cb, owner, ((e, "sourceGradient" + index), (src, "sourceImage" + index)))
        if not isinstance(state, self._input_state_class):
            raise MPSTypeError(f"{owner}: gradientState{index}={type(state).__name__} must be an "
                               f"{self._input_state_class.__name__} from the forward kernel")
        state._check_for_encode(cb, owner, "gradientState" + index)
        fwd = state._producer
        if (fwd.kernelWidth, fwd.kernelHeight, fwd.inputFeatureChannels, fwd.outputFeatureChannels,
                fwd._desc._kernel_groups()) != (self.kernelWidth, self.kernelHeight, self.inputFeatureChannels,
                                                 self.outputFeatureChannels, self._desc._kernel_groups()):
            raise MPSValueError(f"{owner}: gradientState{index} comes from a convolution of another shape; "
                                "make the gradient kernel from the forward kernel's data source")
        forward = getattr(state, "_problem", None)
        if forward is None:
            raise MPSValueError(f"{owner}: gradientState{index} was not filled by a forward encode yet")
        p = self._primary_offset
        # with primaryOffset set, E may be larger than the clip region (zero outside its data)
        _check_against_forward(owner, index, e, src, forward, forward.out_channels, self._sfo,
                               at_least=(p.x, p.y) != (0, 0))
        problem = replace(forward, neuron=NeuronSpec(), dst_channel0=self._dfo)
        return problem, e, src, state

    def _check_destination(self, dst, src, problem, cb, owner):
        if not isinstance(dst, MPSImage):
            raise MPSTypeError(f"{owner}: destinationGradient={dst!r} must be an MPSImage")
        dst._check_for_encode(cb, owner, "destinationGradient")
        if (dst.height, dst.width) != problem.src_size or dst.numberOfImages < problem.src_image0 + problem.n_images:
            raise MPSValueError(f"{owner}: destinationGradient is {dst.width}x{dst.height}; it needs the forward "
                                f"source's size {problem.src_size[1]}x{problem.src_size[0]}")
        if dst.featureChannels < self._dfo + problem.in_channels:
            raise MPSValueError(f"{owner}: destinationGradient has {dst.featureChannels} feature channels; "
                                f"destinationFeatureChannelOffset={self._dfo} + {problem.in_channels} needed")
        if dst._root is src._root:
            raise MPSValueError(f"{owner}: destinationGradient shares storage with sourceImage")


def _batch_lists(owner: str, gradients, sources, states, destinations) -> tuple:
    """A gradient batch's four arrays as lists (``destinations`` may be None)."""
    return (as_list(gradients, owner, "sourceGradients"), as_list(sources, owner, "sourceImages"),
            as_list(states, owner, "gradientStates"), as_list(destinations, owner, "destinationGradients", True))


def _check_images(kernel, cb, owner: str, images) -> None:
    """Each ``(image, role)`` is an MPSImage on the kernel's device that this command buffer may read."""
    for image, role in images:
        if not isinstance(image, MPSImage):
            raise MPSTypeError(f"{owner}: {role}={image!r} must be an MPSImage")
        if image.device is not kernel._device:
            raise MPSDeviceError(f"{owner}: {role} is on {image.device.torch_device}; the kernel is on "
                                 f"{kernel._device.torch_device}")
        image._check_for_encode(cb, owner, role)


def _check_against_forward(owner: str, index: str, e, src, forward: ConvProblem, channels: int, sfo: int,
                           at_least: bool = False) -> None:
    """The incoming gradient has the forward clip region's size (``at_least``: no less) and
    ``channels`` from ``sfo``; the source is the forward source's size."""
    he, we = forward.out_size
    if (e.height < he or e.width < we if at_least else (e.height, e.width) != (he, we)) \
            or e.numberOfImages < forward.n_images:
        need = "at least " if at_least else ""
        raise MPSValueError(f"{owner}: sourceGradient{index} is {e.width}x{e.height} x{e.numberOfImages}; "
                            f"it must be {need}the forward clip region's {we}x{he} x{forward.n_images}")
    if e.featureChannels < sfo + channels:
        raise MPSValueError(f"{owner}: sourceGradient{index} has {e.featureChannels} feature channels; "
                            f"{channels} are needed from sourceFeatureChannelOffset={sfo}")
    if (src.height, src.width) != forward.src_size or src.numberOfImages < forward.src_image0 + forward.n_images:
        raise MPSValueError(f"{owner}: sourceImage{index} is {src.width}x{src.height}; the forward source "
                            f"was {forward.src_size[1]}x{forward.src_size[0]}")


def encode_data_source_update(commandBuffer, gradientState, forward, gradient) -> None:
    """What a graph executor does after a gradient pass (our addition).

    The data source's GPU form ``update(commandBuffer, gradientState, sourceState)`` is called now,
    with ``sourceState`` the weights the kernels use; a returned weights state becomes the weights of
    ``forward`` and ``gradient`` (in order, on this command buffer). Otherwise its CPU form
    ``update(gradientState, sourceState) -> bool`` runs when the command buffer completes, and on
    True both kernels reload from the data source; on False nothing is reloaded and the failure is
    reported as a warning (our choice).

    Like every reload here, the GPU form's state is read when the reload is encoded: commit the
    gradient pass before calling this when the callback reads the gradients on the CPU.
    """
    owner = "encode_data_source_update"
    check_open_buffer(commandBuffer, owner)
    if not isinstance(forward, _WeightedKernel) or isinstance(forward, MPSCNNConvolutionGradient):
        raise MPSTypeError(f"{owner}: forward={forward!r} must be the forward convolution (an MPSCNNConvolution, "
                           "MPSCNNFullyConnected or MPSCNNConvolutionTranspose)")
    if not isinstance(gradient, MPSCNNConvolutionGradient):
        raise MPSTypeError(f"{owner}: gradient={gradient!r} must be the forward kernel's gradient kernel")
    if not isinstance(gradientState, MPSCNNConvolutionGradientState):
        raise MPSTypeError(f"{owner}: gradientState={gradientState!r} must be the forward encode's "
                           "MPSCNNConvolutionGradientState")
    ds = forward.dataSource
    update = getattr(ds, "update", None)
    if not callable(update):
        raise MPSTypeError(f"{owner}: the data source {type(ds).__name__} implements no update(...)")
    if gradientState._producer is not forward:
        raise MPSValueError(f"{owner}: gradientState was made by another convolution")
    arity = len([p for p in inspect.signature(update).parameters.values()
                 if p.default is inspect.Parameter.empty and p.kind != p.VAR_KEYWORD])
    if arity == 3:  # GPU form
        source_state = forward.exportWeightsAndBiases(commandBuffer, resultStateCanBeTemporary=True)
        new_state = update(commandBuffer, gradientState, source_state)
        if new_state is not None:
            if new_state.isTemporary and new_state.readCount > 0:
                new_state.readCount = new_state.readCount + 1  # read by both kernels
            forward.reloadWeightsAndBiases(commandBuffer, state=new_state)
            gradient.reloadWeightsAndBiases(commandBuffer, state=new_state)
        return
    if gradientState.isTemporary:
        raise MPSValueError(f"{owner}: the CPU form of update reads gradientState after the command buffer "
                            "completes; make it with resultState, not temporaryResultState")
    source_state = forward.exportWeightsAndBiases(commandBuffer, resultStateCanBeTemporary=False)

    def after(_):
        if update(gradientState, source_state):
            forward.reloadWeightsAndBiasesFromDataSource()
            gradient.reloadWeightsAndBiasesFromDataSource()
        else:
            warnings.warn(f"mpsconv: {type(ds).__name__}.update returned False; the weights were not reloaded")

    commandBuffer.addCompletedHandler(after)


class MPSCNNFullyConnectedGradient(MPSCNNConvolutionGradient):
    """``MPSCNNFullyConnectedGradient``: back-propagation through an ``MPSCNNFullyConnected`` (its
    forward geometry, recorded in the state, is the whole source)."""


class MPSCNNConvolutionTransposeGradient(MPSCNNConvolutionGradient):
    """``MPSCNNConvolutionTransposeGradient``: back-propagation through an
    ``MPSCNNConvolutionTranspose``: the VJPs of its zero-inserted convolution with respect
    to the source, the weights and the biases. Made from the transpose's data source."""

    _input_state_class = MPSCNNConvolutionTransposeGradientState
    _data_types = (MPSDataType.float32,)

    def _check_descriptor(self, descriptor) -> None:
        if type(descriptor) is not MPSCNNConvolutionDescriptor:
            raise MPSTypeError(f"{type(self).__name__}: takes a plain MPSCNNConvolutionDescriptor")

    def _placed(self, problem: ConvProblem, e: MPSImage, state) -> tuple[ConvProblem, ConvProblem]:
        """Only the state's placement: a transpose's window over its zero-inserted source has no
        other gradient here."""
        if self._shifts(state) != ((0, 0), (0, 0)) or tuple(self._primary_offset[:2]) != (0, 0):
            (ky, kx), (qy, qx) = self._configured(state)
            raise MPSValueError(
                f"{type(self).__name__}: kernelOffsetX/Y={self.kernelOffsetX}/{self.kernelOffsetY}, primaryOffset="
                f"{tuple(self._primary_offset)}, secondaryOffset={tuple(self._secondary_offset)}; the gradient of a "
                f"transposed convolution is computed at its state's placement only (kernelOffsetX/Y={kx}/{ky}, "
                f"primaryOffset=(0, 0, 0), secondaryOffset=({qx}, {qy}, ...)): use the encode that returns the "
                "gradient, or destinationImageDescriptor(sourceImages:sourceStates:) first")
        return problem, problem


# --------------------------------------------------------------------------------------------
# MPSCNNNeuronGradient


@keywords("device", "neuronDescriptor", "coder")
class MPSCNNNeuronGradient(NeuronKernel):
    """``MPSCNNNeuronGradient``: back-propagation through an ``MPSCNNNeuron``.

    ``MPSCNNNeuronGradient(device=, neuronDescriptor=)`` (the forward neuron's activation),
    ``MPSCNNNeuronGradient(coder=, device=)``. ``encode(commandBuffer=, sourceGradient=E,
    sourceImage=S, gradientState=state[, destinationGradient=])`` and ``encodeBatch(commandBuffer=,
    sourceGradients=, sourceImages=, gradientStates=[, destinationGradients=])``: ``state`` is the
    ``MPSNNGradientState`` the forward neuron's encode filled; ``E`` has its clip region's size.
    ``dL/dS`` has the forward source's size: ``E·f'(S̃)`` on the pixel each clip pixel read (added
    up where the clamp edge read an edge pixel more than once), 0 elsewhere, written at
    ``destinationFeatureChannelOffset``; ``E`` is read from ``sourceFeatureChannelOffset``.
    ``f'`` comes from the one formula table, from the right at kinks (docs/semantics.md, "Neurons").
    """

    def _result_state_class(self):
        return None

    isBackwards = property(lambda self: True)

    def _encode_kw(self, *, commandBuffer, sourceGradient, sourceImage, gradientState, destinationGradient=None):
        out = self._encode_neuron_gradient(commandBuffer, [sourceGradient], [sourceImage], [gradientState],
                                           None if destinationGradient is None else [destinationGradient],
                                           self._owner())
        return None if destinationGradient is not None else out[0]

    def encodeBatch(self, *, commandBuffer, sourceGradients, sourceImages, gradientStates, destinationGradients=None):
        """``encodeBatch(commandBuffer:sourceGradients:sourceImages:gradientStates:[destinationGradients:])``."""
        out = self._encode_neuron_gradient(commandBuffer, *_batch_lists(
            self._owner("encodeBatch"), sourceGradients, sourceImages, gradientStates, destinationGradients),
            self._owner("encodeBatch"))
        return None if destinationGradients is not None else out

    def destinationImageDescriptor(self, *, sourceImages, sourceStates=None) -> MPSImageDescriptor:
        """``destinationImageDescriptor(sourceImages:sourceStates:)``: ``sourceImages`` are ``[E, S]``;
        the forward source's size and format, ``destinationFeatureChannelOffset`` + its channels."""
        owner = f"{type(self).__name__}.destinationImageDescriptor"
        images = as_list(sourceImages, owner, "sourceImages")
        if len(images) != 2 or not all(isinstance(image, MPSImage) for image in images):
            raise MPSTypeError(f"{owner}: sourceImages must be [sourceGradient, sourceImage], two MPSImages")
        source, states = images[1], [s for s in (as_list(sourceStates, owner, "sourceStates", allow_none=True) or ()) if s is not None]
        problem = getattr(states[0], "_problem", None) if states else None
        channels = problem.in_channels if problem is not None else source.featureChannels - self._sfo
        return MPSImageDescriptor(channelFormat=source.featureChannelFormat, width=source.width,
                                  height=source.height, featureChannels=self._dfo + channels,
                                  numberOfImages=source.numberOfImages)

    def _encode_neuron_gradient(self, cb, gradients, sources, states, destinations, owner):
        self._check_cb(cb, owner)
        for name, value in (("sourceFeatureChannelOffset", self._sfo), ("destinationFeatureChannelOffset", self._dfo)):
            if value % 4:
                raise MPSValueError(f"{owner}: {name}={value} must be a multiple of 4")
        lengths = {len(gradients), len(sources), len(states)} | ({len(destinations)} if destinations else set())
        if len(lengths) != 1:
            raise MPSValueError(f"{owner}: sourceGradients, sourceImages, gradientStates (and "
                                "destinationGradients) must have the same length")
        cb._check_open(owner)
        batch = len(sources) > 1
        pending = [self._check_one(cb, e, src, state, owner, f"[{i}]" if batch else "")
                   for i, (e, src, state) in enumerate(zip(gradients, sources, states))]
        allocated = []
        if destinations is None:
            destinations = []
            for forward, e, src in pending:
                desc = MPSImageDescriptor(channelFormat=src.featureChannelFormat, width=src.width, height=src.height,
                                          featureChannels=self._dfo + forward.in_channels,
                                          numberOfImages=src.numberOfImages)
                image = self._allocator.image(cb, imageDescriptor=desc, kernel=self)
                destinations.append(image)
                allocated.append(image)
        try:
            jobs = [NeuronGradientJob(self._check_destination(dst, e, src, forward, cb, owner, f"[{i}]" if batch else ""),
                                      e, self._sfo, src, dst)
                    for i, ((forward, e, src), dst) in enumerate(zip(pending, destinations))]
        except Exception:
            for image in allocated:
                if isinstance(image, MPSTemporaryImage) and image.readCount > 0:
                    image._read_count = 0
            raise
        cb._begin_encode(owner)
        try:
            self._encoder.encode_neuron_gradient(self, cb, jobs, owner)
            for state in {id(s): s for s in states}.values():
                state._consume_read()
        finally:
            cb._end_encode()
        return destinations

    def _check_one(self, cb, e, src, state, owner, index):
        _check_images(self, cb, owner, ((e, "sourceGradient" + index), (src, "sourceImage" + index)))
        if not isinstance(state, MPSNNGradientState) or not isinstance(state._producer, MPSCNNNeuron):
            raise MPSTypeError(f"{owner}: gradientState{index}={type(state).__name__} must be the "
                               "MPSNNGradientState of an MPSCNNNeuron's forward encode")
        state._check_for_encode(cb, owner, "gradientState" + index)
        forward_neuron = state._producer
        if forward_neuron._spec != self._spec or not _same_values(forward_neuron._prelu, self._prelu):
            raise MPSValueError(f"{owner}: gradientState{index} comes from a {forward_neuron._descriptor!r}; this "
                                f"gradient is of {self._descriptor!r}: make it from the forward neuron's descriptor")
        forward = state._problem
        if forward is None:
            raise MPSValueError(f"{owner}: gradientState{index} was not filled by a forward encode yet")
        _check_against_forward(owner, index, e, src, forward, forward.in_channels, self._sfo)
        return forward, e, src

    def _check_destination(self, dst, e, src, forward, cb, owner, index) -> ConvProblem:
        """The gradient's problem: the forward one writing ``dst``'s format at this kernel's channel offset."""
        role = "destinationGradient" + index
        _check_images(self, cb, owner, ((dst, role),))
        if (dst.height, dst.width) != forward.src_size or dst.numberOfImages < forward.src_image0 + forward.n_images:
            raise MPSValueError(f"{owner}: {role} is {dst.width}x{dst.height} x{dst.numberOfImages}; it needs the "
                                f"forward source's size {forward.src_size[1]}x{forward.src_size[0]} "
                                f"x{forward.src_image0 + forward.n_images}")
        if dst.featureChannels < self._dfo + forward.in_channels:
            raise MPSValueError(f"{owner}: {role} has {dst.featureChannels} feature channels; "
                                f"destinationFeatureChannelOffset={self._dfo} + {forward.in_channels} needed")
        for other, name in ((src, "sourceImage"), (e, "sourceGradient")):
            if dst._root is other._root:
                raise MPSValueError(f"{owner}: {role} shares storage with {name}{index}")
        return replace(forward, dst_format=int(dst.featureChannelFormat), dst_channel0=self._dfo)


def _same_values(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
