"""What do the CPU replay engine's threads cost by spinning after a replay, and by not spinning?

A replay on the CPU runs as one ONNX Runtime session (``mpsconv/backends/onnx.py``). By default its
threads stop spinning when the replay returns (``session.force_spinning_stop``); with
``MPSCONV_REPLAY_SPIN=1`` they keep spinning, as ONNX Runtime's own sessions do. For each setting,
in fresh processes that alternate, this times a network with temporary images replayed back to back,
and then the same replay followed each time by a PyTorch 3x3 convolution (64 channels, 56x56, the
kind of work a program does next), against that convolution alone.

    python -m benchmarks.experiments.replay_spin [--network mobilenetv2] [--batch 1] [--rounds 2]

Measured 2026-12-08 at a1f0c05, 2-core AMD EPYC, 2 threads, MobileNetV2 at batch 1, two rounds
(ms): back to back 4.65 and 5.29 stopping, 4.17 and 4.52 spinning; each replay followed by the
convolution: replay 9.05 and 8.55, convolution 1.55 and 1.27 stopping; replay 6.26 and 7.25,
convolution 3.76 and 5.81 spinning; the convolution alone 0.76-1.05.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch


def measure(network: str, batch: int) -> str:
    from mpsconv import MTLCreateSystemDefaultDevice
    from mpsconv.networks import NETWORKS, Ours, random_weights

    torch.set_num_threads(2 if os.cpu_count() >= 2 else 1)
    net = NETWORKS[network]()
    ours = Ours(net, random_weights(net), batch, MTLCreateSystemDefaultDevice(), torch.float32, temporary=True)
    ours.load(torch.randn(batch, *net.size))
    ours.replay()
    for _ in range(20):
        ours.replay()
    loops = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(20):
            ours.replay()
        loops.append((time.perf_counter() - start) / 20)
    x = torch.randn(batch, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3)
    replay, after = [], []
    for _ in range(60):
        start = time.perf_counter()
        ours.replay()
        middle = time.perf_counter()
        torch.nn.functional.conv2d(x, w, None, 1, 1)
        after.append(time.perf_counter() - middle)
        replay.append(middle - start)
    alone = []
    for _ in range(30):
        start = time.perf_counter()
        torch.nn.functional.conv2d(x, w, None, 1, 1)
        alone.append(time.perf_counter() - start)
    ms = lambda v: f"{statistics.median(v) * 1e3:.3f}"  # noqa: E731
    return (f"back to back {ms(loops)}  followed by the convolution: replay {ms(replay)}, convolution "
            f"{ms(after)} (alone {ms(alone)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="mobilenetv2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one setting, in this process
    args = parser.parse_args()
    if args.measure:
        print(measure(args.network, args.batch))
        return
    print(f"{args.network} batch {args.batch}, ms")
    for _ in range(args.rounds):
        for spin in ("0", "1"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.experiments.replay_spin", "--measure",
                                   "--network", args.network, "--batch", str(args.batch)],
                                  env=dict(os.environ, MPSCONV_REPLAY_SPIN=spin), capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr)
            print(f"  {'spinning' if spin == '1' else 'stopping'}: {done.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
