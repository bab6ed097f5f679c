"""Can cuDNN itself fuse the MPS operation? cuDNN's graph API (the ``nvidia-cudnn-frontend`` package,
not a dependency of mpsconv: ``pip install nvidia-cudnn-frontend==1.20.0``) builds convolution + bias +
ReLU as one graph. Timed here, per shape of ``mpsconv.bench.SHAPES``, against bare ``F.conv2d``:

- ``slice``: the fused graph writing into channels ``[K, 2K)`` of a ``2K``-channel NHWC image (the
  MPS operation: output strides ``(P·Q·2K, 1, Q·2K, 2K)``);
- ``packed``: the same graph writing a packed ``K``-channel image (no slice);
- ``bare_fe``: the convolution alone through the graph API.

Every graph's execution plans are all built and timed; the fastest is kept. All times:
``triton.testing.do_bench`` medians (ms).

    python -m benchmarks.experiments.cudnn_fusion fp16,bf16 [JSON]
"""
import json
import math
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import cudnn

from benchmarks.gpu import bench  # noqa: E402  (this directory's benchmark: do_bench's median, 25 warm-up runs, 200 ms)
from mpsconv.bench import SHAPES  # noqa: E402

DTYPES = {"fp16": (torch.float16, cudnn.data_type.HALF), "bf16": (torch.bfloat16, cudnn.data_type.BFLOAT16),
          "tf32": (torch.float32, cudnn.data_type.FLOAT), "fp32": (torch.float32, cudnn.data_type.FLOAT)}


def build(handle, shape, cdt, dname, out_strides, fused):
    """The cuDNN graph of one shape: convolution (+ bias + ReLU where ``fused``), NHWC operands, the
    output at ``out_strides``; every execution plan built."""
    _, n, c, h, w, k, r, s, st, pad, dil, g = shape
    p, q = out_size(shape)
    graph = cudnn.pygraph(io_data_type=cdt, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    cg = c // g
    x = graph.tensor(name="X", dim=[n, c, h, w], stride=[c * h * w, 1, c * w, c], data_type=cdt)
    wt = graph.tensor(name="W", dim=[k, cg, r, s], stride=[r * s * cg, 1, s * cg, cg], data_type=cdt)
    b = graph.tensor(name="B", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=cdt)
    y = graph.conv_fprop(image=x, weight=wt, padding=[pad, pad], stride=[st, st], dilation=[dil, dil],
                         compute_data_type=cudnn.data_type.FLOAT)
    if fused:
        y = graph.relu(input=graph.bias(input=y, bias=b))
    y.set_output(True).set_data_type(cdt).set_dim([n, k, p, q]).set_stride(out_strides)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    if dname == "fp32":
        graph.deselect_numeric_notes([cudnn.numerical_note.TENSOR_CORE])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    return graph, (x, wt, b, y)


def out_size(shape):
    _, n, c, h, w, k, r, s, st, pad, dil, g = shape
    return (h + 2 * pad - dil * (r - 1) - 1) // st + 1, (w + 2 * pad - dil * (s - 1) - 1) // st + 1


def fastest(handle, graph, pack):
    """``(ms, name, runner)`` of the graph's fastest plan; plans that fail to run are skipped."""
    count = graph.get_execution_plan_count()
    ws = torch.empty(max(1, *(graph.get_workspace_size_plan_at_index(i) for i in range(count))),
                     device="cuda", dtype=torch.uint8)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    timed = []
    for i in range(count):
        def run(i=i):
            graph.execute_plan_at_index(pack, ws, i, handle=handle)
        try:
            run()
            torch.cuda.synchronize()
        except Exception:  # a plan that did not build
            continue
        timed.append((do_bench(run, warmup=2, rep=10, return_mode="median"), graph.get_plan_name_at_index(i), run))
    return min(timed, key=lambda t: t[0]), f"{len(timed)}/{count}"


def row(handle, shape, dname):
    name, n, c, h, w, k, r, s, st, pad, dil, g = shape
    dtype, cdt = DTYPES[dname]
    p, q = out_size(shape)
    x = torch.randn(n, c, h, w, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(k, c // g, r, s, device="cuda") / math.sqrt(r * s * c / g)).to(dtype).contiguous(
        memory_format=torch.channels_last)
    b = torch.randn(k, device="cuda").to(dtype)
    out = torch.zeros(n, 2 * k, p, q, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    res = dict(shape=name, dtype=dname)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=dname == "tf32"):
        def eager():
            out[:, k:] = F.relu_(F.conv2d(x, wt, b, st, pad, dil, g))

        def bare():
            return F.conv2d(x, wt, None, st, pad, dil, g)
        eager()
        want = {True: out[:, k:].float().clone(), False: bare().float()}
        res["bare"] = bench(bare)
        res["eager"] = bench(eager)
    for label, strides, fused in (("slice", [p * q * 2 * k, 1, q * 2 * k, 2 * k], True),
                                  ("packed", [p * q * k, 1, q * k, k], True),
                                  ("bare_fe", [p * q * k, 1, q * k, k], False)):
        dst = out[:, k:] if label == "slice" else torch.empty_like(out[:, k:], memory_format=torch.channels_last)
        try:
            graph, (gx, gw, gb, gy) = build(handle, shape, cdt, dname, strides, fused)
            pack = {gx: x, gw: wt, gy: dst, **({gb: b} if fused else {})}
            (_, plan, run), plans = fastest(handle, graph, pack)
        except Exception as exc:  # cuDNN supports no plan for this graph
            res[label + "_exc"] = str(exc)[:200]
            continue
        dst.zero_()
        run()
        res[label + "_err"] = ((dst.float() - want[fused]).norm() / want[fused].norm()).item()
        res[label] = bench(run)
        res[label + "_plan"], res[label + "_nplans"] = plan, plans
    return res


def main():
    handle = cudnn.create_handle()
    print("cudnn", cudnn.backend_version(), "torch's cudnn", torch.backends.cudnn.version(), flush=True)
    rows = []
    for dname in sys.argv[1].split(","):
        for shape in SHAPES:
            res = row(handle, shape, dname)
            rows.append(res)
            cells = " ".join(f"{key} {res[key]:.4f}" if key in res else f"{key} -" for key in
                             ("bare", "eager", "slice", "packed", "bare_fe"))
            ratio = res["bare"] / res["slice"] if "slice" in res else float("nan")
            print(f"{res['shape']:12s} {dname} {cells} | slice x bare {ratio:.2f} err {res.get('slice_err')} "
                  f"{res.get('slice_plan')}", flush=True)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
