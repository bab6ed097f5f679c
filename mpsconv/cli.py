"""The ``mpsconv`` command (console script and ``python -m mpsconv``; our addition).

    mpsconv info                    version, devices, backends usable on each, cache location
    mpsconv demo [--epochs N ...]   train a digits CNN built from mpsconv kernels
    mpsconv bench [--quick ...]     the benchmark table against PyTorch eager; JSON and PNG
                                    (./mpsconv-bench.json and .png unless --json / --plot say)
    mpsconv verify [--device D]     every kernel against the reference backend; non-zero on failure

Errors (bad option, unwritable output, no such device) are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy
import torch

from . import backends, config
from ._version import __version__
from .errors import MPSDeviceError
from .metal import MTLCopyAllDevices, MTLCreateSystemDefaultDevice, device_from_name

USAGE_ERROR = 2


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, status 2, no usage dump
        raise CommandError(f"{self.prog}: {message}")


def _device(name):
    try:
        return MTLCreateSystemDefaultDevice() if name is None else device_from_name(name)
    except MPSDeviceError as e:
        raise CommandError(str(e)) from None


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".mpsconv-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CommandError(f"cannot write to {str(path)!r}: {e.strerror or e}") from None
    return path


def _writable_file(path: str | None) -> str | None:
    if path is not None:
        _writable_dir(Path(path).resolve().parent)
    return path


def cmd_info(args) -> int:
    print(f"mpsconv {__version__} (Python {sys.version.split()[0]}, numpy {numpy.__version__}, "
          f"torch {torch.__version__})")
    default = MTLCreateSystemDefaultDevice()
    print("devices:")
    for device in MTLCopyAllDevices():
        usable = backends.usable(device)
        mark = "*" if device is default else " "
        print(f" {mark} {str(device.torch_device):<8} {device.name:<32} backends: {', '.join(usable)}")
    print("   (* = MTLCreateSystemDefaultDevice(); MPSCONV_DEVICE and MPSCONV_BACKEND override)")
    path = config.cache_dir()
    print(f"cache: {path} ({'exists' if path.exists() else 'not created yet'}; set MPSCONV_CACHE_DIR to move it)")
    return 0


def cmd_demo(args) -> int:
    missing = [name for module, name in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise CommandError(f"mpsconv demo needs {' and '.join(missing)} (the demo extra): "
                           "pip install 'mpsconv[demo]'")
    from .demo import run

    if args.epochs < 1:
        raise CommandError(f"mpsconv demo: --epochs {args.epochs}; give at least 1")
    device = _device(args.device)
    out = _writable_dir(Path(args.out))
    run(device, epochs=args.epochs, out=out, seed=args.seed, stream=sys.stderr)
    return 0


def cmd_bench(args, extra) -> int:
    from .bench import main as bench_main

    device = _device(args.device)
    rest = list(extra)
    for flag, default in (("--json", "mpsconv-bench.json"), ("--plot", "mpsconv-bench.png")):
        if flag not in rest and "--help" not in rest and "-h" not in rest:
            rest += [flag, default]
        if flag in rest[:-1]:
            _writable_file(rest[rest.index(flag) + 1])
    try:
        bench_main(rest, device=device)
    except SystemExit as e:  # argparse inside the benchmark, or an unknown shape
        if e.code not in (0, None):
            raise CommandError(str(e.code) if isinstance(e.code, str) else "mpsconv bench: bad arguments") from None
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    device = _device(args.device)
    print(f"mpsconv verify on {device.name} ({device.torch_device}), each backend against the reference:")
    ok = verify(device, seed=args.seed)
    print("all kernels pass" if ok else "FAILURES above")
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="mpsconv", description="Apple's MPS convolution family for Python: tools.")
    top.add_argument("--version", action="version", version=f"mpsconv {__version__}")
    sub = top.add_subparsers(dest="command", metavar="{info,demo,bench,verify}", parser_class=_Parser)
    sub.add_parser("info", help="version, devices, backends usable on each, cache location")
    demo = sub.add_parser("demo", help="train a digits CNN built from mpsconv kernels",
                          description="Train a small CNN on scikit-learn's handwritten digits with mpsconv kernels "
                                      "and their gradient kernels; print held-out accuracy; save, reload and check "
                                      "the kernels; write a PNG.")
    demo.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: MTLCreateSystemDefaultDevice())")
    demo.add_argument("--epochs", type=int, default=8, help="passes over the training set (default 8)")
    demo.add_argument("--out", default="mpsconv-demo", help="folder for the archives and the PNG (default ./mpsconv-demo)")
    demo.add_argument("--seed", type=int, default=0, help="data split and initialization seed (default 0)")
    bench = sub.add_parser("bench", help="the benchmark table against PyTorch eager (JSON, PNG)", add_help=False,
                           description="Runs mpsconv/bench.py; every option after --device is the benchmark's own "
                                       "(see mpsconv bench --help). Writes ./mpsconv-bench.json and "
                                       "./mpsconv-bench.png unless --json / --plot say otherwise.")
    bench.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    verify = sub.add_parser("verify", help="every kernel against the reference backend",
                            description="Run every kernel of the family with each fast backend and compare with the "
                                        "reference backend on random data; exit status 1 on any failure.")
    verify.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    verify.add_argument("--seed", type=int, default=0)
    return top


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = parser()
    try:
        if argv[:1] == ["bench"]:
            args, extra = top.parse_known_args(argv)
            return cmd_bench(args, extra)
        args = top.parse_args(argv)
        if args.command is None:
            top.print_help()
            return USAGE_ERROR
        return {"info": cmd_info, "demo": cmd_demo, "verify": cmd_verify}[args.command](args)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mpsconv info | head`: the reader has gone; nothing more to say
        try:  # and nothing at exit either, when Python flushes what is left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
