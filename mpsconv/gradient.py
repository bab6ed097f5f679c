"""``MPSCNNConvolutionGradientState``: what a forward convolution records for its gradient pass
(spec ``convolution.md`` §8.4, §12). The gradient kernels that fill its buffers are issue 4's."""
from __future__ import annotations

from .descriptor import MPSCNNConvolutionWeightsLayout
from .state import MPSNNGradientState


class MPSCNNConvolutionGradientState(MPSNNGradientState):
    """``MPSCNNConvolutionGradientState``: the forward convolution's geometry and the buffers its
    weight and bias gradients go into.

    Made by ``MPSCNNConvolution.resultState`` / ``temporaryResultState`` (or the state-returning
    encodes), filled by the forward encode that takes it. ``sourceWidth`` / ``sourceHeight`` are the
    forward source's size (``MPSImageSizeEncodingState``), which sizes a paired transpose.
    """

    def _init_gradient_state(self, convolution, source) -> None:
        d = convolution._desc
        weights = d.outputFeatureChannels * d.kernelHeight * d.kernelWidth * (d.inputFeatureChannels // d._kernel_groups())
        self._sizes = [4 * weights, 4 * d.outputFeatureChannels]
        self._resources = [None, None]
        self._convolution = convolution
        self._source_size = (source.width, source.height)
        self._recorded = convolution._state_snapshot()  # the properties the encode must still have

    convolution = property(lambda self: self._convolution)
    sourceWidth = property(lambda self: self._source_size[0])
    sourceHeight = property(lambda self: self._source_size[1])
    gradientForWeightsLayout = property(lambda self: MPSCNNConvolutionWeightsLayout.OHWI)

    @property
    def gradientForWeights(self):
        """float32 ``[O][kH][kW][I/G]`` buffer (depthwise ``[O][kH][kW]``)."""
        return self.resource(at=0)

    @property
    def gradientForBiases(self):
        """float32 ``[O]`` buffer."""
        return self.resource(at=1)

    def _filled_by(self, source) -> None:
        """The forward encode recorded into this state (spec §8.4): the source size it read."""
        self._source_size = (source.width, source.height)

    @property
    def forward_offset(self):
        """The forward kernel's ``offset`` when the state was made (our addition)."""
        return self._recorded[0]
