"""mpsconv: Apple's Metal Performance Shaders convolution family for Python, on CUDA GPUs and any CPU.

Public names keep Apple's Swift spellings (``MPSCNNConvolution``, ``kernelWidth``,
``encode(commandBuffer=, sourceImage=, destinationImage=)``); our own additions read as Python
(``MPSImage.from_numpy``, ``image.numpy()``, ``mpsconv.save``).
"""
from .binary import MPSCNNBinaryConvolution, MPSCNNBinaryFullyConnected
from .coding import NSCoder, NSKeyedArchiver, NSKeyedUnarchiver, load, save
from .config import use_backend, use_memory_limit
from .convolution import MPSCNNConvolution, MPSCNNFullyConnected
from .datasource import MPSCNNConvolutionDataSource
from .descriptor import (
    MPSCNNBinaryConvolutionFlags, MPSCNNBinaryConvolutionType, MPSCNNConvolutionDescriptor,
    MPSCNNConvolutionFlags, MPSCNNConvolutionGradientOption, MPSCNNConvolutionWeightsLayout,
    MPSCNNDepthWiseConvolutionDescriptor, MPSCNNSubPixelConvolutionDescriptor, MPSCNNWeightsQuantizationType,
    MPSNNConvolutionAccumulatorPrecisionOption,
)
from .errors import (
    MPSArchiveError, MPSCommandBufferError, MPSConvError, MPSDeviceError, MPSMemoryError, MPSTypeError, MPSValueError,
)
from .core.activations import MPSCNNNeuronType
from .core.formats import MPSImageFeatureChannelFormat, MTLPixelFormat
from .core.geometry import MPSNNPaddingMethod
from .image import (
    MPSDataLayout, MPSImage, MPSImageAllocator, MPSImageBatch, MPSImageBatchIncrementReadCount,
    MPSImageBatchIterate, MPSImageBatchResourceSize, MPSImageBatchSynchronize, MPSImageDescriptor,
    MPSImageReadWriteParams, MPSPurgeableState, MPSTemporaryImage,
)
from .kernel import (
    MPSCNNKernel, MPSImageEdgeMode, MPSKernel, MPSKernelOptions, MPSNNDefaultPadding, MPSNNPadding, MPSOrigin,
    MPSRegion, MPSSize,
)
from .metal import (
    MPSCommandBuffer, MPSDeviceOptions, MPSGetPreferredDevice, MPSHintTemporaryMemoryHighWaterMark, MPSSetHeapCacheDuration,
    MPSSupportsMTLDevice, MTLBuffer, MTLCommandBuffer, MTLCommandBufferError, MTLCommandBufferErrorDomain,
    MTLCommandBufferStatus, MTLCommandQueue, MTLComputeCommandEncoder, MTLCopyAllDevices, MTLCPUCacheMode,
    MTLCreateSystemDefaultDevice, MTLDevice, MTLResourceOptions, MTLStorageMode, MTLTexture, MTLTextureDescriptor,
    MTLTextureType, MTLTextureUsage, NSError,
)
from .neuron import (
    MPSCNNNeuron, MPSCNNNeuronAbsolute, MPSCNNNeuronELU, MPSCNNNeuronExponential, MPSCNNNeuronHardSigmoid,
    MPSCNNNeuronLinear, MPSCNNNeuronLogarithm, MPSCNNNeuronPower, MPSCNNNeuronPReLU, MPSCNNNeuronReLU,
    MPSCNNNeuronReLUN, MPSCNNNeuronSigmoid, MPSCNNNeuronSoftPlus, MPSCNNNeuronSoftSign, MPSCNNNeuronTanH,
    MPSNNNeuronDescriptor,
)
from .gradient import (
    MPSCNNConvolutionGradient, MPSCNNConvolutionTransposeGradient, MPSCNNFullyConnectedGradient, MPSCNNNeuronGradient,
    encode_data_source_update,
)
from .layout import (
    MPSCNNConvolutionWeights, TorchLayers, from_torch, to_torch, torch_output_size, weights_from_hwio,
    weights_from_oihw, weights_to_hwio, weights_to_oihw,
)
from .convolution_state import (
    MPSCNNConvolutionGradientState, MPSCNNConvolutionTransposeGradientState, MPSCNNConvolutionWeightsAndBiasesState,
)
from .state import (
    MPSImageSizeEncodingState, MPSNNGradientState, MPSState, MPSStateBatchIncrementReadCount, MPSStateResourceType,
)
from .transpose import MPSCNNConvolutionTranspose
from .types import (
    MPSDataType, MPSOffset, MPSRectNoClip, MTLOrigin, MTLRegion, MTLRegionMake2D, MTLRegionMake3D, MTLSize,
    NSIntegerMin, NSUIntegerMax,
)

from ._version import __version__

__all__ = [name for name in dir() if not name.startswith("_") and name not in {
    "core", "encoder", "coding", "config", "convolution", "datasource", "descriptor", "errors", "geometry", "image", "kernel",
    "metal", "memory", "neuron", "types", "backends", "transpose", "binary", "state", "convolution_state", "gradient",
    "layout", "cli"}]
