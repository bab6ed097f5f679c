"""How should a CPU replay hand its images back from ONNX Runtime, at a given thread count?

A replay into whole images (``mpsconv/backends/onnx.py``) makes every image the command buffer
writes an output of one ONNX Runtime session, in the images' NHWC layout. Today each leaves through
a 4-D ``Transpose``, which ONNX Runtime folds into ``ReorderOutput(channels_last=1)``: one pass, on
one thread (``ort_nhwc_reorder.py``). The alternative is a ``Reshape`` to ``[N, C, H*W]`` and a 3-D
``Transpose``, which ONNX Runtime cannot fold: its parallel NCHW reorder, then its parallel
transpose (two passes). This times, on the library's networks (``mpsconv.networks``: convolution and
activation per layer, the same graph the engine builds for them), sessions that write

- ``nhwc4``: every image, through the 4-D transpose (the engine today),
- ``nhwc3``: every image, through the reshape and the 3-D transpose,
- ``nchw+copy``: every image NCHW (ONNX Runtime's parallel reorder, no transpose), then moved into
  its NHWC array by PyTorch's parallel strided copy, outside the session (two passes),
- ``output``: only the network's output, NHWC (the floor: what temporary images leave),

bound to preallocated NHWC arrays as the engine binds them, in alternating rounds. On 2 cores
(2026-12-07, 2-core AMD EPYC) ``nhwc3`` loses everywhere: MobileNetV2 at batch 1 5.34 ms against
3.31 (``output`` 1.74), ResNet-50 at batch 8 144 against 134 (116), and ``nchw+copy`` loses by more
(MobileNetV2 at batch 1: 13.6 against 5.4 in a later, slower run). With 16 threads (the 16-core Xeon
host of the GPU machines) ``nhwc3`` wins on ResNet-50 (12.7 against 15.0 ms at batch 1, 76 against
110 at batch 8) and loses on MobileNetV2 (9.0 against 7.7, 52 against 50); ``nchw+copy`` loses
everywhere (``benchmarks/RESULTS.md``).

    python -m benchmarks.experiments.ort_output_layout [--threads N] [--batches 1,8] [--networks ...]
"""
import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from benchmarks.networks import onnx_layers
from mpsconv.networks import NETWORKS, random_weights, shapes

VARIANTS = ("nhwc4", "nhwc3", "nchw+copy", "output")


def session(net, weights, batch: int, variant: str, threads: int):
    """A function that runs the session once, and the NHWC arrays it fills."""
    size = shapes(net)
    nodes, inits = onnx_layers(net, weights)
    nodes.insert(0, helper.make_node("Transpose", ["in"], [net.input], perm=[0, 3, 1, 2]))
    images = [net.output] if variant == "output" else [name for name in size if name != net.input]
    outputs, arrays, bound = [], {}, {}
    for name in images:
        h, w, c = size[name]
        arrays[name] = np.zeros((batch, h, w, c), np.float32)
        if variant == "nchw+copy":
            bound[name] = np.zeros((batch, c, h, w), np.float32)
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(bound[name].shape)))
            continue
        bound[f"{name}_nhwc"] = arrays[name]
        if variant == "nhwc3":
            inits.append(numpy_helper.from_array(np.array([batch, c, h * w], np.int64), f"{name}_rows"))
            nodes.append(helper.make_node("Reshape", [name, f"{name}_rows"], [f"{name}_r"]))
            nodes.append(helper.make_node("Transpose", [f"{name}_r"], [f"{name}_nhwc"], perm=[0, 2, 1]))
            shape = [batch, h * w, c]
        else:
            nodes.append(helper.make_node("Transpose", [name], [f"{name}_nhwc"], perm=[0, 2, 3, 1]))
            shape = [batch, h, w, c]
        outputs.append(helper.make_tensor_value_info(f"{name}_nhwc", TensorProto.FLOAT, shape))
    h, w, c = net.size
    graph = helper.make_graph(nodes, net.name, [helper.make_tensor_value_info("in", TensorProto.FLOAT,
                                                                              [batch, h, w, c])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")  # as the engine's session
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, h, w, c)).astype(np.float32)
    binding = s.io_binding()
    binding.bind_input("in", "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
    for name, array in bound.items():
        shape = [batch, array.shape[1] * array.shape[2], array.shape[3]] if variant == "nhwc3" else list(array.shape)
        binding.bind_output(name, "cpu", 0, np.float32, shape, array.ctypes.data)
    moves = [(torch.from_numpy(arrays[name]), torch.from_numpy(bound[name]).permute(0, 2, 3, 1))
             for name in arrays if variant == "nchw+copy"]

    def run(keep=(x, bound)):  # the session reads and writes these arrays through bare pointers
        s.run_with_iobinding(binding)
        for nhwc, nchw in moves:
            nhwc.copy_(nchw)
    return run, arrays


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--networks", default="mobilenetv2,resnet50,inception")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads of {os.cpu_count()} cores")
    for name in args.networks.split(","):
        net = NETWORKS[name]()
        weights = random_weights(net)
        for batch in (int(b) for b in args.batches.split(",")):
            runs = {v: session(net, weights, batch, v, args.threads) for v in VARIANTS}
            for run, _ in runs.values():
                run()
            four = runs["nhwc4"][1]
            for v in ("nhwc3", "nchw+copy"):
                assert all(np.array_equal(four[k], runs[v][1][k]) for k in four), f"nhwc4 and {v} disagree"
            times = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for v, (run, _) in runs.items():
                    end, count, start = time.perf_counter() + 0.3, 0, time.perf_counter()
                    while time.perf_counter() < end:
                        run()
                        count += 1
                    times[v].append((time.perf_counter() - start) / count * 1e3)
            cells = "  ".join(f"{v} {statistics.median(t):8.3f} ms ({min(t):.3f}..{max(t):.3f})" for v, t in times.items())
            print(f"{net.name:<18} b{batch:<3} {cells}", flush=True)


if __name__ == "__main__":
    main()
