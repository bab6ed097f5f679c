"""The mpsconv command and the examples (issue 6), run as a user runs them: as subprocesses."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def mpsconv(*args, cwd=None, env=None):
    """``python -m mpsconv ARGS`` on the CPU; returns (exit status, stdout, stderr)."""
    full_env = dict(os.environ, MPSCONV_DEVICE="cpu", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "mpsconv", *args], cwd=cwd, env=full_env, capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


def test_demo_trains_saves_reloads_and_draws(tmp_path):
    rc, out, err = mpsconv("demo", "--epochs", "1", "--out", str(tmp_path / "run"), "--seed", "3")
    assert rc == 0, err
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+)%", out).group(1))
    assert accuracy > 80.0, out  # one epoch
    assert "reloaded network predicts identically" in out
    assert "epoch 1/1: loss" in err and "\r" not in err  # no bar redrawn in place when not on a terminal
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["digits-conv1.mpsconv", "digits-conv2.mpsconv", "digits-fc.mpsconv", "digits.png"]
    assert png_size(tmp_path / "run" / "digits.png") == (1200, 450)


def test_demo_defaults_reach_95_percent(tmp_path):
    rc, out, err = mpsconv("demo", cwd=tmp_path)
    assert rc == 0, err
    assert float(re.search(r"held-out accuracy: ([\d.]+)%", out).group(1)) >= 95.0, out
    assert (tmp_path / "mpsconv-demo" / "digits.png").exists()


def test_info_lists_devices_backends_and_cache(tmp_path):
    rc, out, err = mpsconv("info", env={"MPSCONV_CACHE_DIR": str(tmp_path / "c")})
    assert rc == 0, err
    assert out.startswith("mpsconv 0.1.0")
    assert re.search(r"\* cpu +CPU .* backends: reference, torch(, triton)?$", out, re.M), out
    assert f"cache: {tmp_path / 'c'} (not created yet" in out


def test_verify_passes_every_kernel():
    rc, out, err = mpsconv("verify")
    assert rc == 0, err + out
    rows = [line for line in out.splitlines()[2:-1]]
    assert len(rows) >= 25 and all(("pass" in line or "n/a" in line) and "FAIL" not in line
                                   and 0 <= float(line.split()[-1]) <= 1 for line in rows), out
    assert "transpose gradient" in out and "binary xnor" in out and out.rstrip().endswith("all kernels pass")


def test_verify_fails_loudly(monkeypatch, capsys):
    """A backend that gets one value wrong makes verify print FAIL and return non-zero."""
    from mpsconv import MTLCreateSystemDefaultDevice, cli, verify as verify_module

    real = verify_module.mismatches
    calls = []

    def wrong_once(actual, expected, fmt):
        calls.append(1)
        bad = real(actual, expected, fmt)
        if len(calls) == 1:
            bad = bad.copy()
            bad.flat[0] = True
        return bad

    monkeypatch.setattr(verify_module, "mismatches", wrong_once)
    assert cli.main(["verify", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL(1)" in out and "FAILURES above" in out
    assert MTLCreateSystemDefaultDevice() is not None


def test_bench_writes_json_and_plot(tmp_path):
    rc, out, err = mpsconv("bench", "--quick", "--shapes", "b1_3x3_56,tconv_s2_28", "--json", str(tmp_path / "b.json"),
                           "--plot", str(tmp_path / "b.png"))
    assert rc == 0, err
    data = json.loads((tmp_path / "b.json").read_text())
    assert [row["shape"] for row in data["rows"]] == ["b1_3x3_56"] and data["family"][0]["kind"] == "transpose"
    assert np.isfinite(data["geomean"]) and "geometric mean ratio" in out
    width, height = png_size(tmp_path / "b.png")
    assert width >= 600 and height == 450


def test_bench_writes_its_files_by_default(tmp_path):
    rc, out, err = mpsconv("bench", "--quick", "--shapes", "r50_3x3_7", cwd=tmp_path)
    assert rc == 0, err
    assert json.loads((tmp_path / "mpsconv-bench.json").read_text())["rows"][0]["shape"] == "r50_3x3_7"
    assert png_size(tmp_path / "mpsconv-bench.png")[1] == 450


def test_bench_runs_whole_networks_against_eager(tmp_path):
    rc, out, err = mpsconv("bench", "--quick", "--networks", "inception", "--json", str(tmp_path / "n.json"))
    assert rc == 0, err
    row = json.loads((tmp_path / "n.json").read_text())["networks"][0]
    assert row["network"] == "inception_28" and row["rel_err"] < 1e-4
    assert set(row["times_ms"]) == {"ours", "ours_replay", "ours_temporary_replay", "eager"}
    assert "inception_28" in out and "eager/best" in out


def test_network_memory_counts_every_image_ours_allocates():
    """`networks.py --memory` takes our images off our peak: exactly the storage our run allocates for
    them, the input image (three channels in four lanes) included; with temporary images, the input
    image on top of the images alive at once, which is all eager is given."""
    import torch

    from benchmarks.networks import image_bytes, live_images
    from mpsconv import MTLCreateSystemDefaultDevice
    from mpsconv.networks import NETWORKS, Ours, random_weights

    net = NETWORKS["mobilenetv2"]()
    ours = Ours(net, random_weights(net), 1, MTLCreateSystemDefaultDevice())
    ours.load(torch.from_numpy(np.random.default_rng(3).standard_normal((1, *net.size)).astype(np.float32)))
    ours()
    allocated = sum(image.torch().untyped_storage().nbytes() for image in ours.images.values())
    assert image_bytes(net, 1, torch.float32, "ours") == allocated
    own_input = ours.images[net.input].torch().untyped_storage().nbytes()
    assert own_input == 224 * 224 * 4 * 4
    assert image_bytes(net, 1, torch.float32, "ours_temporary") == live_images(net, 1, 4, {net.input}) + own_input
    assert image_bytes(net, 1, torch.float32, "eager") == live_images(net, 1, 4, {net.input})


def test_a_network_output_is_checked_against_eager_or_the_float32_network():
    """float32: within TOLERANCE of eager. bfloat16, where both round every layer: no further from
    the float32 network than 1.5x eager's own error (or TOLERANCE, whichever is larger)."""
    import torch

    from mpsconv.networks import NETWORKS, TOLERANCE, Eager, checked, random_weights

    net, cpu = NETWORKS["inception"](), torch.device("cpu")
    weights = random_weights(net)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 28, 28, 192)).astype(np.float32)).permute(0, 3, 1, 2)
    exact = Eager(net, weights, cpu)(x)
    assert checked("inception", 1, net, weights, exact * (1 + 1e-6), exact, x)["rel_err"] < 2e-6
    with pytest.raises(ValueError, match="ours and eager differ by 1.00e-03"):
        checked("inception", 1, net, weights, exact * (1 + 1e-3), exact, x)
    x16 = x.to(torch.bfloat16)
    eager = Eager(net, weights, cpu, torch.bfloat16)(x16)
    errors = checked("inception", 1, net, weights, eager.clone(), eager, x16)
    own = errors["rel_err_eager_fp32"]
    assert 0 < own < TOLERANCE[torch.bfloat16] and errors["rel_err_ours_fp32"] == own
    scale = 2 * TOLERANCE[torch.bfloat16] / own  # ours that far from float32: beyond both bounds
    with pytest.raises(ValueError, match="from the float32 network"):
        checked("inception", 1, net, weights, exact + scale * (eager.float() - exact), eager, x16)


@pytest.mark.parametrize("args, message", [
    (["demo", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["demo", "--epochs", "0"], "--epochs 0; give at least 1"),
    (["demo", "--device", "cuda:7"], "device 'cuda:7' is not usable"),
    (["verify", "--device", "tpu"], "device 'tpu' is not cpu, cuda or cuda:N"),
    (["bench", "--shapes", "nope"], "no shape named nope"),
    (["bench", "--networks", "vgg"], "no network named vgg"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], ""),
])
def test_errors_are_one_line_with_status_2(args, message):
    rc, out, err = mpsconv(*args)
    assert rc == 2
    assert "Traceback" not in err
    if message:
        assert len(err.strip().splitlines()) == 1 and message in err, err


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, out, err = mpsconv("demo", "--epochs", "1", "--out", str(blocker / "sub"))
    assert rc == 2 and "Traceback" not in err and err.startswith("error: cannot write to"), err


@pytest.mark.parametrize("flag", ["--help", "info --help", "demo --help", "bench --help", "verify --help"])
def test_help_everywhere(flag):
    rc, out, err = mpsconv(*flag.split())
    assert rc == 0 and out.startswith("usage: mpsconv"), (out, err)


@pytest.mark.parametrize("script, expected", [
    ("quickstart.py", None),
    ("inception.py", r"max \|mpsconv - PyTorch\| = ([\d.e+-]+)"),
    ("port_torch_model.py", r"max \|mpsconv - PyTorch\| = ([\d.e+-]+)"),
])
def test_examples_run(script, expected):
    p = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, MPSCONV_DEVICE="cpu"))
    assert p.returncode == 0, p.stderr
    if expected:
        assert float(re.search(expected, p.stdout).group(1)) < 1e-4, p.stdout


def test_version():
    rc, out, _ = mpsconv("--version")
    assert rc == 0 and out.strip() == "mpsconv 0.1.0"


def test_demo_without_its_extra_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from mpsconv import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert cli.main(["demo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "pip install 'mpsconv[demo]'" in err and "Traceback" not in err


def test_a_closed_pipe_is_not_an_error(monkeypatch):
    """``mpsconv info | head -1``: the reader leaves early, the next write raises BrokenPipeError; the
    command ends quietly with status 0."""
    from mpsconv import cli

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            raise OSError("not a real stream")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["info"]) == 0
