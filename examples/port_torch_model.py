"""Porting a PyTorch model's convolution layers to mpsconv with the layout helpers, and comparing.

The model: conv 3x3 (stride 2, fused ReLU) -> depthwise 3x3 (ReLU) -> 1x1 -> transposed conv
(stride 2) -> flatten -> Linear. ``from_torch`` turns each layer into its MPS kernel with the
offset that reproduces PyTorch's padding; ``torch_output_size`` sizes each destination.
"""
import numpy as np
import torch
import torch.nn as nn

from mpsconv import (
    MPSCNNNeuronType, MPSImage, MPSImageDescriptor, MPSImageFeatureChannelFormat, MPSNNNeuronDescriptor,
    MTLCreateSystemDefaultDevice, from_torch, torch_output_size,
)


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 8, 1),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),
        nn.Flatten(), nn.Linear(4 * 16 * 16, 10),
    ).eval()


def main():
    net = model()
    device = MTLCreateSystemDefaultDevice()
    relu = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.0)
    x = torch.randn(2, 3, 16, 16)
    layers = list(net)
    c, h, w = 3, 16, 16
    image = MPSImage.from_numpy(x.permute(0, 2, 3, 1).numpy(), device=device)
    cb = device.makeCommandQueue().makeCommandBuffer()
    i = 0
    while i < len(layers):
        layer = layers[i]
        fused = relu if i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU) else None
        if isinstance(layer, nn.Flatten):
            i += 1
            continue
        if isinstance(layer, nn.Linear):
            kernel = from_torch(layer, device, input_shape=(c, h, w))
            c, h, w = layer.out_features, 1, 1
        else:
            kernel = from_torch(layer, device, neuron=fused)
            t = isinstance(layer, nn.ConvTranspose2d)
            h, w = (torch_output_size(n, layer.kernel_size[a], layer.stride[a], layer.padding[a], layer.dilation[a],
                                      transposed=t) for a, n in enumerate((h, w)))
            c = layer.out_channels
        out = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
            channelFormat=MPSImageFeatureChannelFormat.float32, width=w, height=h, featureChannels=c,
            numberOfImages=x.shape[0]))
        kernel.encode(commandBuffer=cb, sourceImage=image, destinationImage=out)
        image = out
        i += 2 if fused is not None else 1
    cb.commit()
    cb.waitUntilCompleted()
    ours = image.numpy()[:, 0, 0, :]
    with torch.no_grad():
        theirs = net(x).numpy()
    err = float(np.abs(ours - theirs).max())
    print(f"ported {sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) for m in layers)} layers; "
          f"outputs {ours.shape}; max |mpsconv - PyTorch| = {err:.2e}")
    assert err < 1e-4, err


if __name__ == "__main__":
    main()
