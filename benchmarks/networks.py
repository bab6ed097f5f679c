"""Whole networks against PyTorch's best, on the CPU and on CUDA (``mpsconv.networks`` defines them).

Each network (MobileNetV2's 52 convolutions at 224x224, the ResNet-50 body's 48 from 56x56x64, an
Inception block writing four channel slices of one image) runs as one command buffer of MPS
encodes into whole images, against, on the same NHWC data and weights:

- eager: PyTorch channels-last ``conv2d`` with bias, the activation in place, ``torch.cat``;
- compile: ``torch.compile`` of that (``--compile-mode``; compiling takes a while, not timed);
- ort (CPU): ONNX Runtime's CPU execution provider on the same graph (Conv, Relu / Clip, Concat),
  ``pip install onnx onnxruntime``;
- graph (CUDA): eager captured as a CUDA graph and replayed;
- bare (CUDA): the convolutions alone (``conv2d``, no bias, no activation, cuDNN benchmark mode).

Weights: float32 as PyTorch has them; a float16 network's kernels take MPS's default float16
kernel weights (``kernelWeightsDataType``), as ported MPS code has them, and eager's float16 copy
holds the same values.

Ours: ``plain`` (encode every layer, commit, wait), ``replay`` (the command buffer recorded once
with ``make_replayable``, replayed) and ``tmp_replay`` (the same with ``MPSTemporaryImage``s between
the input and the output, as MPS code written for speed has them; peer name ``temporary``). On the
CPU a replay runs as one ONNX Runtime session where that is faster (``mpsconv/backends/onnx.py``). Every network's output is checked against eager's first.
Medians over alternating rounds with their min..max; the thread count is pinned (``--threads``).
``--per-layer`` times every layer alone (encode + commit + wait of one layer into its own image)
against eager's same layer. ``--memory`` adds each one's memory beyond the weights and the images
(``footprint``): the CUDA allocator's peak, or on the CPU the resident set's high-water mark of a
fresh process.

    python benchmarks/networks.py [--device cpu|cuda] [--networks mobilenetv2,resnet50,inception]
        [--batches 1,8] [--dtypes fp32] [--peers eager,compile,ort] [--threads N] [--rounds 5]
        [--budget 2.0] [--per-layer] [--memory] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mpsconv  # noqa: E402
from mpsconv import MTLCreateSystemDefaultDevice  # noqa: E402
from mpsconv.metal import device_from_name  # noqa: E402
from mpsconv.core.formats import ImageLayout  # noqa: E402
from mpsconv.networks import (  # noqa: E402
    FORMATS, NETWORKS, Eager, Ours, busy, checked, random_weights, shapes, spread_warning, synchronizer, timing,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def onnx_layers(net, weights) -> tuple[list, list]:
    """``(nodes, initializers)`` of ``net``'s layers as an ONNX graph (Conv + Clip/Relu, NCHW float32):
    they read the value named ``net.input`` and leave each image as the value of its name."""
    from onnx import helper, numpy_helper

    nodes, inits, concat = [], [], {}
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    for layer in net.layers:
        w, b = weights[layer.name]
        inits += [numpy_helper.from_array(w, f"{layer.name}_w"), numpy_helper.from_array(b, f"{layer.name}_b")]
        pad = layer.k // 2
        out = f"{layer.name}_conv" if layer.neuron else f"{layer.name}_out"
        nodes.append(helper.make_node("Conv", [layer.src, f"{layer.name}_w", f"{layer.name}_b"], [out],
                                      kernel_shape=[layer.k] * 2, strides=[layer.stride] * 2, pads=[pad] * 4,
                                      group=layer.groups))
        if layer.neuron == "relu":
            nodes.append(helper.make_node("Relu", [out], [f"{layer.name}_out"]))
        elif layer.neuron == "relu6":
            nodes.append(helper.make_node("Clip", [out, "zero", "six"], [f"{layer.name}_out"]))
        concat.setdefault(layer.dst, []).append((layer.offset, f"{layer.name}_out"))
    for name, parts in concat.items():
        nodes.append(helper.make_node("Concat", [p for _, p in sorted(parts)], [name], axis=1) if len(parts) > 1
                     else helper.make_node("Identity", [parts[0][1]], [name]))
    return nodes, inits


def onnx_session(net, weights, threads: int):
    """An ONNX Runtime session running ``net`` (NCHW float32), or None where onnx / onnxruntime are
    missing."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    nodes, inits = onnx_layers(net, weights)
    size = shapes(net)
    h, w, c = net.size
    oh, ow, oc = size[net.output]
    graph = helper.make_graph(nodes, net.name, [helper.make_tensor_value_info(net.input, TensorProto.FLOAT,
                                                                                ["n", c, h, w])],
                              [helper.make_tensor_value_info(net.output, TensorProto.FLOAT, ["n", oc, oh, ow])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # not the notes on the constants its Clip fusion leaves unused
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bare_convolutions(net, eager: Eager):
    """The network's convolutions alone (no bias, no activation), chained as the network chains them."""
    def run(x):
        tensors = {net.input: x}
        for layer in net.layers:
            src = tensors.get(layer.src)
            if src is None:  # an Inception output read later: never in these networks
                raise ValueError(f"{layer.src} is concatenated")
            w, _ = eager.params[layer.name]
            y = F.conv2d(src, w, None, layer.stride, layer.k // 2, 1, layer.groups)
            tensors.setdefault(layer.dst, y)
        return tensors[net.output]
    return run


def cuda_graph(fn, x):
    """``fn(x)`` captured as a CUDA graph (after warm-up on a side stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return graph.replay


def run_network(name, batch, dtype, args, device, tdev) -> dict:
    net = NETWORKS[name]()
    weights = random_weights(net)
    rng = np.random.default_rng(1)
    x_nhwc = torch.from_numpy(rng.standard_normal((batch, *net.size)).astype(np.float32)).to(tdev, dtype)
    x = x_nhwc.permute(0, 3, 1, 2)  # NCHW channels-last view
    ours, eager = Ours(net, weights, batch, device, dtype), Eager(net, weights, tdev, dtype)
    ours.load(x_nhwc)
    with torch.no_grad():
        want = eager(x)
        ours()
        try:
            errors = checked(name, batch, net, weights, ours.output().permute(0, 3, 1, 2), want, x)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    peers = args.peers.split(",")
    contenders = {"ours": ours, "ours_replay": ours.replay}
    if "temporary" in peers:  # the images between input and output as MPSTemporaryImages, replayed
        temp = Ours(net, weights, batch, device, dtype, temporary=True)
        temp.load(x_nhwc)
        contenders["ours_tmp_replay"] = temp.replay
    with torch.no_grad():
        if "eager" in peers:
            contenders["eager"] = lambda: eager(x)
        if "compile" in peers:
            compiled = torch.compile(eager.__call__, mode=args.compile_mode)
            compiled(x)
            contenders["compile"] = lambda: compiled(x)
        if "ort" in peers and tdev.type == "cpu" and dtype == torch.float32:
            session = onnx_session(net, weights, torch.get_num_threads())
            if session is not None:
                feed = {net.input: x.contiguous().numpy()}
                got_ort = session.run(None, feed)[0]
                ort_err = float(np.abs(got_ort - want.numpy()).max() / np.abs(want.numpy()).max())
                assert ort_err < 1e-4, f"ONNX Runtime and eager differ by {ort_err:.2e}"
                contenders["ort"] = lambda: session.run(None, feed)
            else:
                print("  (onnx / onnxruntime not installed: no ORT column)")
        if tdev.type == "cuda":
            if "graph" in peers:
                contenders["eager_graph"] = cuda_graph(eager, x)
            if "bare" in peers:
                torch.backends.cudnn.benchmark = True
                contenders["bare"] = lambda f=bare_convolutions(net, eager): f(x)
        times = timing(contenders, args.rounds, args.budget, synchronizer(tdev))
    scratch = memory_row(name, batch, dtype, args, device) if args.memory else None
    row = dict(network=net.name, batch=batch, dtype=str(dtype).replace("torch.", ""), layers=len(net.layers),
               **errors, times_ms={k: [v * 1e3 for v in t] for k, t in times.items()}, scratch_bytes=scratch)
    warning = spread_warning(times)
    if warning:
        row["warning"] = warning
    if args.per_layer:
        row["per_layer"] = per_layer(net, ours, eager, x, args, tdev)
    return row


def per_layer(net, ours: Ours, eager: Eager, x, args, tdev) -> list:
    """Every layer alone: ours (one encode, commit, wait into its own image) against eager's layer on a
    tensor of the same shape."""
    out = []
    size = shapes(net)
    for i, layer in enumerate(net.layers):
        h, w, c = size[layer.src]
        src = torch.randn(x.shape[0], c, h, w, device=tdev, dtype=x.dtype).contiguous(
            memory_format=torch.channels_last)
        times = timing({"ours": ours.layer(i), "eager": eager.layer_alone(i, src)}, args.rounds,
                       args.budget / 4, synchronizer(tdev))
        ratio = times["eager"][0] / times["ours"][0]
        out.append(dict(layer=layer.name, ours_us=times["ours"][0] * 1e6, eager_us=times["eager"][0] * 1e6,
                        ratio=ratio))
        print(f"    {layer.name:<14} {layer.cin:>5}->{layer.cout:<5} k{layer.k} s{layer.stride} "
              f"ours {times['ours'][0] * 1e6:9.1f} us  eager {times['eager'][0] * 1e6:9.1f} us  x{ratio:5.2f}",
              flush=True)
    return out


MEMORY_CONTENDERS = ("ours", "ours_temporary", "eager")


def footprint(name: str, batch: int, dtype, who: str, device) -> int | None:
    """The memory ``who`` (one of ``MEMORY_CONTENDERS``) needs beyond the network's weights and images:
    made from the caller's float32 arrays (kernels or parameters, images, plans) and run twice, its
    peak above what was in use before, less one copy of the weights (in ``dtype``: eager's parameters,
    our data sources) and the images (those alive at once while it runs, as MPS temporary images
    live; ours plain keeps them all; ours also its own input image: ``image_bytes``). On CUDA the
    caching allocator's peak; on the CPU the resident set's high-water mark, reset through
    ``/proc/self/clear_refs`` (Linux; None elsewhere), so run it in a fresh process
    (``--footprint``): a process that has freed memory before reuses it without its resident set
    growing."""
    tdev = device.torch_device
    net = NETWORKS[name]()
    weights = random_weights(net)
    rng = np.random.default_rng(1)
    x_nhwc = torch.from_numpy(rng.standard_normal((batch, *net.size)).astype(np.float32)).to(tdev, dtype)
    itemsize = x_nhwc.element_size()
    weight_bytes = sum(w.size + b.size for w, b in weights.values()) * itemsize
    images = image_bytes(net, batch, dtype, who)
    if tdev.type == "cuda":
        torch.cuda.synchronize(tdev)
        base = torch.cuda.memory_allocated(tdev)
        torch.cuda.reset_peak_memory_stats(tdev)
    else:
        try:
            base = _proc_status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return None
    with torch.no_grad():
        if who == "eager":
            eager = Eager(net, weights, tdev, dtype)
            x = x_nhwc.permute(0, 3, 1, 2)
            run = lambda: eager(x)  # noqa: E731
        else:
            run = Ours(net, weights, batch, device, dtype, temporary=who == "ours_temporary")
            run.load(x_nhwc)
        run()
        run()
    if tdev.type == "cuda":
        torch.cuda.synchronize(tdev)
        peak = torch.cuda.max_memory_allocated(tdev)
    else:
        peak = _proc_status("VmHWM")
    return peak - base - weight_bytes - images


def image_bytes(net, batch: int, dtype, who: str) -> int:
    """The bytes of images that ``footprint`` does not count against ``who``: eager's images alive at
    once, less its input (the caller's tensor); ours plain, every image; ours with temporary images,
    those alive at once and the input. Ours as stored (``ImageLayout``, channels in lanes of four):
    eager's input is the tensor made before the count, ours an image of its own that the data is
    copied into."""
    size = shapes(net)
    stored = lambda name: ImageLayout(batch, *size[name], FORMATS[dtype]).storage_bytes  # noqa: E731
    if who == "ours":
        return sum(map(stored, size))
    live = live_images(net, batch, dtype.itemsize, {net.input})
    return live + (stored(net.input) if who == "ours_temporary" else 0)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def live_images(net, batch: int, itemsize: int, kept: set) -> int:
    """The most bytes of images alive at once while the network runs, counting only the images not
    in ``kept`` (those allocated before the run): an image lives from the layer that first writes it
    to the last layer that reads it (the output to the end), as MPS temporary images do."""
    size = shapes(net)
    first, last = {}, {}
    for i, layer in enumerate(net.layers):
        first.setdefault(layer.dst, i)
        last[layer.src] = i
    last[net.output] = len(net.layers)
    peak = 0
    for i in range(len(net.layers)):
        alive = [name for name, start in first.items() if name not in kept and start <= i <= last.get(name, start)]
        peak = max(peak, sum(batch * math.prod(size[name]) * itemsize for name in alive))
    return peak


def memory_row(name: str, batch: int, dtype, args, device) -> dict:
    """``footprint`` of each of ``MEMORY_CONTENDERS`` in bytes: on CUDA in this process, on the CPU
    each in a fresh one."""
    if device.torch_device.type == "cuda":
        return {who: footprint(name, batch, dtype, who, device) for who in MEMORY_CONTENDERS}
    out = {}
    for who in MEMORY_CONTENDERS:
        cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--footprint",
               f"{name},{batch},{DTYPE_NAMES[dtype]},{who}"] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"footprint of {who}, {name} batch {batch}, failed:\n{done.stderr}")
        out[who] = json.loads(done.stdout)
    return out


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: MTLCreateSystemDefaultDevice())")
    ap.add_argument("--networks", default="mobilenetv2,resnet50,inception")
    ap.add_argument("--batches", default=None, help="default: 1,8 on the CPU, 1,32 on CUDA")
    ap.add_argument("--dtypes", default=None, help="default: fp32 on the CPU, fp16,bf16 on CUDA")
    ap.add_argument("--peers", default=None, help="default: eager,compile,ort (CPU); eager,graph,compile,bare (CUDA)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune, reduce-overhead)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per network and batch")
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--memory", action="store_true",
                    help="also each one's memory beyond its weights and images (CPU: a fresh process each)")
    ap.add_argument("--footprint", default=None, help=argparse.SUPPRESS)  # NETWORK,BATCH,DTYPE,WHO: print it
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = device_from_name(args.device) if args.device else MTLCreateSystemDefaultDevice()
    tdev = device.torch_device
    cuda = tdev.type == "cuda"
    if args.threads:  # pinned for both: ours would otherwise give up threads to cores it sees busy
        torch.set_num_threads(args.threads)
        os.environ["MPSCONV_NUM_THREADS"] = str(args.threads)
    if args.footprint:
        name, batch, dtype, who = args.footprint.split(",")
        print(json.dumps(footprint(name, int(batch), DTYPES[dtype], who, device)))
        return []
    batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1,8")).split(",")]
    dtypes = [DTYPES[d] for d in (args.dtypes or ("fp16,bf16" if cuda else "fp32")).split(",")]
    args.peers = args.peers or ("temporary,eager,graph,compile,bare" if cuda else "temporary,eager,compile,ort")
    load = busy()
    header = dict(device=device.name, torch=torch.__version__, mpsconv=mpsconv.__version__, commit=commit(),
                  threads=torch.get_num_threads(), cores=os.cpu_count(), platform=platform.platform(),
                  load_beyond_us=load, command=" ".join(["python benchmarks/networks.py", *sys.argv[1:]]))
    print(f"mpsconv {mpsconv.__version__} ({header['commit']}), torch {torch.__version__}, {device.name}, "
          f"{torch.get_num_threads()} threads of {os.cpu_count()} cores"
          + (f", load beyond this process {load:.0%} of the cores" if load is not None else ""))
    rows = []
    for name in args.networks.split(","):
        for dtype in dtypes:
            for batch in batches:
                row = run_network(name, batch, dtype, args, device, tdev)
                rows.append(row)
                if args.json:  # after every row, so a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(dict(header, rows=rows), f, indent=1)
                t = row["times_ms"]
                cells = "  ".join(f"{k} {v[0]:.3f} ({v[1]:.3f}..{v[2]:.3f})" for k, v in t.items())
                print(f"{row['network']:<18} b{batch:<3} {row['dtype']:<8} ms: {cells}", flush=True)
                for mine in (k for k in t if k.startswith("ours")):
                    ratios = "  ".join(f"x{k} {v[0] / t[mine][0]:.2f}" for k, v in t.items() if not k.startswith("ours"))
                    print(f"{'':<32} {mine[5:] or 'plain':<11} {ratios}", flush=True)
                print(f"{'':<32} rel err {row['rel_err']:.1e} (to fp32: ours {row['rel_err_ours_fp32']:.1e}, "
                      f"eager {row['rel_err_eager_fp32']:.1e})"
                      + (f"  WARNING: {row['warning']}" if "warning" in row else ""), flush=True)
                if row["scratch_bytes"]:
                    print(f"{'':<32} memory beyond weights and images, MiB: " + "  ".join(
                        f"{k} {'?' if v is None else f'{v / 2**20:.1f}'}" for k, v in row["scratch_bytes"].items()),
                        flush=True)
    return rows


if __name__ == "__main__":
    main()
