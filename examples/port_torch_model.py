"""Porting a small PyTorch model to mpsconv with ``from_torch``, and comparing.

The model, a MobileNet-style stem and block and a decoder: conv 3x3 stride 2 + BatchNorm + ReLU6 ->
depthwise 3x3 + BatchNorm + ReLU -> 1x1 + BatchNorm -> 2x2 'same' (padded at the bottom and right,
as PyTorch pads an even kernel) + LeakyReLU -> 3x3 with replicate padding + Hardsigmoid ->
transposed conv (stride 2) -> flatten -> Linear.

``from_torch`` turns the ``nn.Sequential`` into a list of MPS kernels: each batch norm folded into
the convolution before it (``setBatchNormalizationParametersForInference…``), each activation fused
(``fusedNeuronDescriptor``), each padding an ``offset`` (and replicate the clamp edge mode).
``layers.encode`` runs them into one command buffer, the images between them temporary.
"""
import numpy as np
import torch
import torch.nn as nn

from mpsconv import MPSImage, MTLCreateSystemDefaultDevice, from_torch


def model():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 2, padding="same"), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate"), nn.Hardsigmoid(),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),
        nn.Flatten(), nn.Linear(4 * 16 * 16, 10),
    )
    net.train()  # a few batches give the batch norms running statistics to fold
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(8, 3, 16, 16))
    return net.eval()


def main():
    net = model()
    device = MTLCreateSystemDefaultDevice()
    layers = from_torch(net, device, input_shape=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    image = MPSImage.from_numpy(x.permute(0, 2, 3, 1).numpy(), device=device)
    cb = device.makeCommandQueue().makeCommandBuffer()
    out = layers.encode(commandBuffer=cb, sourceImage=image)
    cb.commit()
    cb.waitUntilCompleted()
    ours = out.numpy()[:, 0, 0, :]
    with torch.no_grad():
        theirs = net(x).numpy()
    err = float(np.abs(ours - theirs).max())
    print(f"ported {len(net)} modules into {len(layers)} kernels; outputs {ours.shape}; "
          f"max |mpsconv - PyTorch| = {err:.2e}")
    assert err < 1e-4, err


if __name__ == "__main__":
    main()
