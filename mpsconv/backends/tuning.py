"""Autotuned dispatch on CUDA: time each eligible (backend, launch configuration) once per problem
signature, keep the fastest in ``<cache dir>/autotune-v2.json``.

The signature holds what decides speed (sizes, window, channels, groups, formats, neuron, the GPU
and the library versions), not where the window sits. Timing runs on scratch images of the
problem's shape with random contents and random weights: the caller's images are never touched
before ``commit``. A cache file that cannot be read or parsed is ignored and rewritten; one that
cannot be written leaves the choices in memory for this process.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings

import numpy as np
import torch

from .. import config
from .._version import __version__
from ..core.formats import STORAGE_DTYPE, MPSImageFeatureChannelFormat as F
from ..core.weights import KeptWeights, round_for_source, round_weights
from ..types import MPSDataType

#: The version changes when a variant name comes to mean another kernel (v2: the depthwise tiles), so
#: that old choices are timed again rather than reused.
FILE_NAME = "autotune-v2.json"
_lock = threading.Lock()
_memory: dict[str, dict[str, str]] = {}  # cache path -> choices, loaded once per path


def signature(problem, device) -> str:
    p = problem
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "-"
    fields = (device.name, torch.__version__, triton_version, __version__, p.n_images, p.src_size, p.grid, p.kernel,
              p.stride, p.dilation, p.in_channels, p.out_channels, p.groups, int(p.edge), int(p.neuron.type),
              p.src_format, p.dst_format, p.subpixel, p.upsample, p.reduced_precision, p.float32_weights)
    return "|".join(map(str, fields))


def _path():
    return config.cache_dir() / FILE_NAME


def load(path) -> dict[str, str]:
    """The choices stored at ``path``; ``{}`` when it is missing or not a JSON object of strings."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return {}
    return data


def _store(path, choices: dict[str, str]) -> None:
    """Write atomically (a reader never sees half a file); an unwritable directory only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(choices, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"mpsconv: cannot write the autotune cache {path}: {exc}; choices stay in memory")


def _choices(path) -> dict[str, str]:
    key = str(path)
    if key not in _memory:
        _memory[key] = load(path)
    return _memory[key]


def _options(backends_, problem) -> list[tuple]:
    out = []
    for backend in backends_:
        variants = getattr(backend, "variants", None)
        for variant in (variants(problem) if variants else [None]):
            out.append((backend, variant))
    return out


def _encode(backend, variant) -> str:
    return backend.name if variant is None else f"{backend.name}:{variant}"


def choose(problem, device, eligible: list) -> tuple:
    """``(backend, variant)``: the cached choice for ``problem``'s signature, else the fastest of
    ``eligible`` measured now (and stored)."""
    options = _options(eligible, problem)
    if len(options) == 1:
        return options[0]
    if not options:
        raise ValueError("tuning.choose: no eligible backend")
    by_name = {_encode(b, v): (b, v) for b, v in options}
    # the candidates are part of the key: a choice made among a forced backend's configurations
    # says nothing about which backend wins
    path = _path()
    key = signature(problem, device) + "|" + ",".join(sorted({b.name for b, _ in options}))
    with _lock:
        choices = _choices(path)
        hit = by_name.get(choices.get(key, ""))
        if hit is not None:
            return hit
        try:
            best = measure(problem, device, options)
        except torch.OutOfMemoryError:  # no room for scratch images: run untimed, tune another time
            torch.cuda.empty_cache()
            return options[0]
        choices[key] = _encode(*best)
        fresh = load(path)  # keep what other processes stored meanwhile
        fresh.update(choices)
        choices.update(fresh)
        _store(path, choices)
    return best


def _scratch(problem, device, generator):
    """Random source and destination storages big enough for ``problem`` (window at the origin)."""
    p, dev = problem, device.torch_device
    (h, w), (oh, ow) = p.src_size, p.out_size
    cs = -(-(p.src_channel0 + p.in_channels) // 4) * 4
    cd = -(-(p.dst_channel0 + p.dst_channels) // 4) * 4
    src = torch.randn(p.src_image0 + p.n_images, h, w, cs, generator=generator).to(
        device=dev, dtype=STORAGE_DTYPE[F(p.src_format)])
    dst = torch.empty(p.dst_image0 + p.n_images, p.out_origin[0] + oh, p.out_origin[1] + ow, cd,
                      dtype=STORAGE_DTYPE[F(p.dst_format)], device=dev)
    return src, dst


def measure(problem, device, options, reps: int = 10, finalists: int = 3, rounds: int = 5) -> tuple:
    """Time every option on scratch data and return the fastest ``(backend, variant)``.

    Two clocks per option: streamed (``reps`` runs launched back to back between two CUDA events:
    what a plain ``commit`` gets, host time per launch included where it is the longer) and
    graphed (the same runs captured as one CUDA graph: GPU time alone, what a replay gets). The
    ``finalists`` fastest by streamed time are timed again in alternating ``rounds`` (so that drift
    hits them alike); the winner is the lowest median streamed time, and among finalists within 10%
    of it (host time makes ties on small problems) the lowest graphed time. Options that fail to
    compile or run are skipped. Only the finalists so far keep their bound encodes and prepared
    weights, so that tuning holds the memory of a few options, not of all."""
    p = problem
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    ig = p.in_channels // p.groups
    # Weights of the precision the kernel gives them (MPS's float16 unless they stay float32; bfloat16
    # for bfloat16 sources), so that every candidate takes the product type it will take for real.
    kernel_type = MPSDataType.float32 if p.float32_weights else MPSDataType.float16
    weights = KeptWeights(round_for_source(round_weights(rng.standard_normal((p.out_channels, *p.kernel, ig)) * 0.1,
                                                         kernel_type), p.src_format))
    bias = rng.standard_normal(p.out_channels).astype(np.float32)
    prelu = rng.random(p.out_channels).astype(np.float32)
    src, dst = _scratch(problem, device, g)
    final = []  # the `finalists` fastest so far: a slower option's bound encode (its scratch) goes at once
    for backend, variant in options:
        try:
            plan = backend.plan(p, device, variant) if variant else backend.plan(p, device)
            prepared = backend.prepare(weights, bias, prelu, device)
            bound = backend.bind(plan, src, dst)
            for _ in range(3):
                backend.run(bound, prepared)
            torch.cuda.synchronize(device.torch_device)
            final.append([_streamed(backend, bound, prepared, reps), backend, variant, bound, prepared])
        except Exception:  # e.g. a tile that needs more shared memory than the GPU has: not a candidate
            torch.cuda.synchronize(device.torch_device)
        final.sort(key=lambda r: r[0])
        del final[finalists:]
        bound = prepared = None  # freed now, not when the next option's have been made
    if not final:
        return options[-1]
    streamed, graphed = [[] for _ in final], [[] for _ in final]
    graphs = [_capture(backend, bound, prepared, reps, device) for _, backend, _, bound, prepared in final]
    for _ in range(rounds):
        for i, (_, backend, _, bound, prepared) in enumerate(final):
            streamed[i].append(_streamed(backend, bound, prepared, reps))
            if graphs[i] is not None:
                graphed[i].append(_replayed(graphs[i], reps))
    s_med = [float(np.median(t)) for t in streamed]
    g_med = [float(np.median(t)) if t else s for t, s in zip(graphed, s_med)]
    near = [i for i in range(len(final)) if s_med[i] <= 1.1 * min(s_med)]
    best = min(near, key=lambda i: g_med[i])
    return final[best][1], final[best][2]


def _streamed(backend, bound, prepared, reps) -> float:
    """Milliseconds per run of ``reps`` runs launched back to back between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        backend.run(bound, prepared)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _capture(backend, bound, prepared, reps, device):
    """``reps`` runs captured as one CUDA graph, or None where the path cannot be captured."""
    try:
        stream = torch.cuda.Stream(device.torch_device)
        stream.wait_stream(torch.cuda.current_stream(device.torch_device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                backend.run(bound, prepared)
        return graph
    except Exception:
        torch.cuda.synchronize(device.torch_device)
        return None


def _replayed(graph, reps) -> float:
    """Milliseconds of GPU time per run in a replay of ``graph``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
