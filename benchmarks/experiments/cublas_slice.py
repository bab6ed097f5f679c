"""Can cuBLAS do a 1x1 layer's MPS operation? A 1x1, stride-1 convolution of an NHWC image is one GEMM,
``[N·H·W, C] x [C, K]``, and cuBLAS takes an output with a row stride: the result can land in channels
``[K, 2K)`` of a ``2K``-channel image directly. Timed against bare ``F.conv2d`` and the eager operation:

- ``mm_slice``: ``torch.mm`` into the slice (no bias, no ReLU);
- ``addmm_slice``: ``torch.addmm`` with the bias into the slice;
- ``act_slice`` / ``act_packed``: ``torch._addmm_activation`` (cuBLASLt's bias + ReLU epilogue) into
  the slice / into a packed ``K``-channel image;
- ``addmm_relu_slice``: ``addmm`` into the slice, then ``relu_`` there.

Reduced-precision reductions are off, as the MPS numerics need. ``do_bench`` medians, ms; ``err``: the
relative L2 error against eager PyTorch where the variant computes the whole operation.

    python -m benchmarks.experiments.cublas_slice
"""
import math

import torch
import torch.nn.functional as F

from benchmarks.gpu import bench  # this directory's benchmark: do_bench's median, 25 warm-up runs, 200 ms

SHAPES = [("r50_1x1_56", 32, 64, 56, 56, 256), ("r50_1x1_14x", 32, 256, 14, 14, 1024),
          ("mbv2_pw_28", 32, 32, 28, 28, 192), ("b1_1x1_56", 1, 64, 56, 56, 256)]


def row(name, n, c, h, w, k, dtype):
    x = torch.randn(n, c, h, w, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(k, c, 1, 1, device="cuda") / math.sqrt(c)).to(dtype).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(k, device="cuda").to(dtype)
    out = torch.zeros(n, 2 * k, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)

    def eager():
        out[:, k:] = F.relu_(F.conv2d(x, wt, bias))
    eager()
    want = out[:, k:].permute(0, 2, 3, 1).float().clone()
    a = x.permute(0, 2, 3, 1).reshape(-1, c)  # [N·H·W, C]: a view of the channels-last source
    b = wt.reshape(k, c).t()
    into = out.as_strided((n * h * w, k), (2 * k, 1), out.storage_offset() + k)  # the slice, row stride 2K
    packed = torch.empty(n * h * w, k, device="cuda", dtype=dtype)
    res = dict(shape=name, dtype=str(dtype).split(".")[-1], bare=bench(lambda: F.conv2d(x, wt)), eager=bench(eager))
    variants = (("mm_slice", lambda: torch.mm(a, b, out=into), None),
                ("addmm_slice", lambda: torch.addmm(bias, a, b, out=into), None),
                ("act_slice", lambda: torch._addmm_activation(bias, a, b, out=into), out),
                ("act_packed", lambda: torch._addmm_activation(bias, a, b, out=packed), packed),
                ("addmm_relu_slice", lambda: torch.addmm(bias, a, b, out=into).relu_(), out))
    for label, fn, result in variants:
        out.zero_()
        fn()
        if result is not None:
            got = (packed.view(n, h, w, k) if result is packed else out[:, k:].permute(0, 2, 3, 1)).float()
            res[label + "_err"] = ((got - want).norm() / want.norm()).item()
        res[label] = bench(fn)
    return res


def _token(key, value):
    """One printed field: names (shape, dtype) bare, times to 0.1 µs, errors in scientific notation."""
    if not isinstance(value, float):
        return str(value)
    return f"{key} {value:.1e}" if key.endswith("_err") else f"{key} {value:.4f}"


def main():
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    for shape in SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            res = row(*shape, dtype)
            print(" ".join(_token(key, value) for key, value in res.items()), flush=True)


if __name__ == "__main__":
    main()
