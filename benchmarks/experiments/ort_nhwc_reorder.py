"""Does ONNX Runtime's layout change into NHWC use its thread pool?

The CPU replay engine (``mpsconv/backends/onnx.py``) hands a command buffer to one ONNX Runtime
session. Every image the buffer writes that outlives it leaves the session through a transpose to
the images' NHWC storage, which ONNX Runtime folds into its ``ReorderOutput`` node with
``channels_last=1``. This times that node alone (after a ``ReorderInput``) against the same node
writing NCHW, at 1 and at each given thread count, on an image of MobileNetV2's size at batch 8.
If the NHWC time does not fall with threads while the NCHW one does, images written by a replay
cost one core's memory bandwidth each, whatever the thread count.

    python -m benchmarks.experiments.ort_nhwc_reorder [THREADS ...]   (default: 1 and all cores)

Measured 2026-12-07, ONNX Runtime 1.32.0, 2-core AMD EPYC (38.5 MB image; the two nodes together,
medians of 20): NCHW 4.30 ms with 1 thread, 1.96 ms with 2; NHWC 5.85 and 5.31 ms.
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

N, H, W, C = 8, 112, 112, 96


def session(channels_last: int, threads: int):
    shape = [N, H, W, C] if channels_last else [N, C, H, W]
    nodes = [helper.make_node("ReorderInput", ["x"], ["blocked"], domain="com.microsoft.nchwc"),
             helper.make_node("ReorderOutput", ["blocked"], ["y"], domain="com.microsoft.nchwc", channels=C,
                              channels_last=channels_last)]
    graph = helper.make_graph(nodes, "reorder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, C, H, W])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft.nchwc", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the two nodes as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main():
    counts = [int(t) for t in sys.argv[1:]] or sorted({1, os.cpu_count() or 1})
    x = np.random.default_rng(0).standard_normal((N, C, H, W)).astype(np.float32)
    print(f"ONNX Runtime {ort.__version__}, {os.cpu_count()} cores, image {x.nbytes / 1e6:.1f} MB")
    for threads in counts:
        for channels_last in (0, 1):
            s = session(channels_last, threads)
            y = s.run(None, {"x": x})[0]
            assert np.array_equal(y, x.transpose(0, 2, 3, 1) if channels_last else x)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                s.run(None, {"x": x})
                times.append(time.perf_counter() - start)
            print(f"{threads:3d} threads  {'NHWC' if channels_last else 'NCHW'}  {np.median(times) * 1e3:7.2f} ms "
                  f"({min(times) * 1e3:.2f}..{max(times) * 1e3:.2f})")


if __name__ == "__main__":
    main()
