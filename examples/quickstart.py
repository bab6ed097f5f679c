"""Quickstart: a 3x3 edge-detecting convolution with a fused ReLU, the way MPS code writes it.

Swift                                                   Python (mpsconv)
let device = MTLCreateSystemDefaultDevice()!            device = MTLCreateSystemDefaultDevice()
let desc = MPSCNNConvolutionDescriptor(kernelWidth: 3,  desc = MPSCNNConvolutionDescriptor(kernelWidth=3,
    kernelHeight: 3, inputFeatureChannels: 1,               kernelHeight=3, inputFeatureChannels=1,
    outputFeatureChannels: 2)                               outputFeatureChannels=2)
let conv = MPSCNNConvolution(device: device,            conv = MPSCNNConvolution(device=device,
                             weights: dataSource)                                weights=data_source)
conv.encode(commandBuffer: cb, sourceImage: src,        conv.encode(commandBuffer=cb, sourceImage=src,
            destinationImage: dst)                                  destinationImage=dst)
"""
import numpy as np

from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionDataSource, MPSCNNConvolutionDescriptor, MPSCNNNeuronType, MPSDataType,
    MPSImage, MPSImageDescriptor, MPSImageFeatureChannelFormat, MPSNNNeuronDescriptor, MTLCreateSystemDefaultDevice,
)


class SobelWeights(MPSCNNConvolutionDataSource):
    """Two 3x3 filters (horizontal and vertical edges), OHWI: [output][row][column][input]."""

    def __init__(self, descriptor):
        self._descriptor = descriptor
        sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
        self._weights = np.stack([sobel, sobel.T])[..., None]  # [2][3][3][1]

    def dataType(self):
        return MPSDataType.float32

    def descriptor(self):
        return self._descriptor

    def weights(self):
        return self._weights

    def biasTerms(self):
        return None

    def label(self):
        return "sobel"


def picture(size=24):
    """A grayscale image: a bright disc with a soft shadow on a gradient background."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    disc = ((x - 0.45) ** 2 + (y - 0.5) ** 2 < 0.09).astype(np.float32)
    return (0.2 + 0.3 * x + 0.5 * disc)[..., None]  # (H, W, 1)


def main():
    device = MTLCreateSystemDefaultDevice()
    queue = device.makeCommandQueue()

    desc = MPSCNNConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=1, outputFeatureChannels=2)
    desc.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.0)
    conv = MPSCNNConvolution(device=device, weights=SobelWeights(desc))

    image = picture()
    src = MPSImage.from_numpy(image, device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=src.width, height=src.height, featureChannels=2))

    cb = queue.makeCommandBuffer()
    conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)  # records the work
    cb.commit()                                                            # runs it
    cb.waitUntilCompleted()

    edges = dst.numpy()[0]  # (H, W, 2): rising edges left-to-right and top-to-bottom, ReLU'd
    print(f"{conv.label}: {src.width}x{src.height} image on {device.name}; offset {tuple(conv.offset)}")
    print(f"output range {edges.min():.3f} ... {edges.max():.3f} (ReLU keeps it >= 0)")
    shades = " .:-=+*#%@"
    strength = np.hypot(edges[..., 0], edges[..., 1])
    for row in strength / strength.max():
        print("".join(shades[min(int(v * len(shades)), len(shades) - 1)] * 2 for v in row))


if __name__ == "__main__":
    main()
