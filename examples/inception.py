"""An Inception-style block: four branches write into one image through
``destinationFeatureChannelOffset`` (MPS's concatenation, no copy), checked against PyTorch.

    branch        kernel                      channels of the block's output
    1x1           MPSCNNConvolution 1x1       0..7
    3x3           MPSCNNConvolution 3x3       8..23
    5x5           MPSCNNConvolution 5x5       24..31
    pool proj     MPSCNNConvolution 3x3 (an averaging 3x3 filter folded with a 1x1 projection) 32..39

Every branch fuses a ReLU; the four encodes share one command buffer.
"""
import numpy as np
import torch
import torch.nn.functional as F

from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionDescriptor, MPSCNNConvolutionWeights, MPSCNNNeuronType, MPSImage,
    MPSImageDescriptor, MPSImageFeatureChannelFormat, MPSNNNeuronDescriptor, MTLCreateSystemDefaultDevice,
    weights_from_oihw,
)

CIN, H, W = 16, 14, 14
BRANCHES = [(1, 8), (3, 16), (5, 8), (3, 8)]  # (kernel, output channels)


def main():
    rng = np.random.default_rng(0)
    device = MTLCreateSystemDefaultDevice()
    x = rng.standard_normal((1, H, W, CIN)).astype(np.float32)
    src = MPSImage.from_numpy(x, device=device)
    total = sum(c for _, c in BRANCHES)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=W, height=H, featureChannels=total))
    relu = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.0)
    cb = device.makeCommandQueue().makeCommandBuffer()
    reference, offset = [], 0
    for i, (k, cout) in enumerate(BRANCHES):
        w = rng.standard_normal((cout, CIN, k, k)).astype(np.float32) / np.sqrt(CIN * k * k)  # PyTorch OIHW
        if i == 3:  # avg-pool 3x3 (count_include_pad) then 1x1 projection = one 3x3 convolution
            w = np.repeat(w[:, :, :1, :1], 3, 2).repeat(3, 3) / 9.0
        b = rng.standard_normal(cout).astype(np.float32) * 0.1
        d = MPSCNNConvolutionDescriptor(kernelWidth=k, kernelHeight=k, inputFeatureChannels=CIN,
                                        outputFeatureChannels=cout)
        d.fusedNeuronDescriptor = relu
        conv = MPSCNNConvolution(device=device, weights=MPSCNNConvolutionWeights(d, weights_from_oihw(w), b))
        conv.destinationFeatureChannelOffset = offset  # this branch's slice of the block's output
        conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        offset += cout
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).double()
        reference.append(F.relu(F.conv2d(xt, torch.from_numpy(w).double(), torch.from_numpy(b).double(),
                                         padding=k // 2)))
    cb.commit()
    cb.waitUntilCompleted()
    want = torch.cat(reference, 1).permute(0, 2, 3, 1).numpy()
    err = float(np.abs(dst.numpy() - want).max())
    print(f"inception block: {len(BRANCHES)} branches into one {W}x{H}x{total} image; "
          f"max |mpsconv - PyTorch| = {err:.2e}")
    assert err < 1e-4, err


if __name__ == "__main__":
    main()
