import os
import sys

import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors; the switch is read
# when kernels are defined, so it must be set before mpsconv imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--backend", default="torch", choices=("torch",),
                     help="fast backend compared against the reference in property tests")


@pytest.fixture(scope="session")
def fast_backend(request):
    return request.config.getoption("--backend")


@pytest.fixture
def onednn_everywhere(monkeypatch):
    """Route every eligible problem through the prepacked oneDNN path (normally only large weights)."""
    from mpsconv.backends import torch as torch_backend

    if not torch_backend.onednn_usable():
        pytest.skip("this PyTorch build has no usable oneDNN pointwise convolution; conv2d runs instead")
    monkeypatch.setattr(torch_backend, "ONEDNN_MIN_WEIGHTS", 0)


@pytest.fixture
def in_place_everywhere(monkeypatch):
    """Route every eligible CPU problem through oneDNN's convolution into the destination itself
    (normally only large outputs), and count the runs that take it: ``calls[0]``."""
    from mpsconv.backends import torch as torch_backend

    if not torch_backend.onednn_usable():
        pytest.skip("this PyTorch build has no usable oneDNN pointwise convolution; conv2d runs instead")
    monkeypatch.setattr(torch_backend, "IN_PLACE_MIN_BYTES", 0)
    calls, run = [0], torch_backend._in_place

    def counted(*args):
        calls[0] += 1
        run(*args)
    monkeypatch.setattr(torch_backend, "_in_place", counted)
    return calls
