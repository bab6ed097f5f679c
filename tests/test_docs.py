"""The README snippet, the quickstart and the docstring examples run as written."""
from __future__ import annotations

import doctest
import os
import re
import runpy

import pytest

import mpsconv
from mpsconv import convolution, descriptor
from mpsconv.core import geometry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_quickstart_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "(1, 24, 24, 2)" in capsys.readouterr().out


def test_quickstart_example_runs(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("sobel: 24x24 image") and "ReLU keeps it >= 0" in out


@pytest.mark.parametrize("module", [convolution, descriptor, geometry], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_public_names_are_exported():
    assert "MPSCNNConvolution" in mpsconv.__all__ and "MTLCreateSystemDefaultDevice" in mpsconv.__all__
    assert all(hasattr(mpsconv, name) for name in mpsconv.__all__)


def test_porting_table_names_exist():
    """docs/porting.md: at least 25 Swift lines with their Python, and every name the Python column
    uses (classes, functions, enum cases, properties and methods) exists in mpsconv."""
    text = open(os.path.join(ROOT, "docs", "porting.md")).read()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 25
    device = mpsconv.MTLCreateSystemDefaultDevice()
    cb = device.makeCommandQueue().makeCommandBuffer()
    owners = [mpsconv, device, device.makeCommandQueue(), cb, mpsconv.MPSCNNConvolution, mpsconv.MPSImage,
              mpsconv.MPSCNNConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=1,
                                                  outputFeatureChannels=1),
              mpsconv.MPSCNNConvolutionGradient, mpsconv.MPSCNNConvolutionDataSource, mpsconv.MPSNNPaddingMethod,
              mpsconv.MPSImageEdgeMode, mpsconv.MPSDataLayout, mpsconv.MPSCNNNeuronType, mpsconv.MPSDataType,
              mpsconv.MPSImageFeatureChannelFormat, mpsconv.MPSNNNeuronDescriptor, mpsconv.NSKeyedArchiver,
              mpsconv.NSKeyedUnarchiver, mpsconv.MPSCommandBuffer, mpsconv.MPSOffset(),
              mpsconv.MPSCNNConvolutionGradientState]
    for row in rows:
        python = row.split(" | ")[2]
        for code in re.findall(r"`([^`]+)`", python):
            if code.endswith(".py"):
                continue
            for name in re.findall(r"\b(MPS\w+|MTL\w+|NS\w+|weights_\w+|from_torch|to_torch|torch_output_size|"
                                   r"encode_data_source_update)\b", code):
                assert hasattr(mpsconv, name), (name, row)
            for name in re.findall(r"(?<!self)\.([A-Za-z_]\w*)", code):
                assert any(hasattr(owner, name) for owner in owners), (name, row)


def test_the_package_carries_its_license_types_docs_and_examples():
    """What a source distribution and a wheel hold: the SPDX license and its text, the type marker,
    the docs and examples (``MANIFEST.in``)."""
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert re.search(r'^license = "Apache-2\.0"$', pyproject, re.M) and 'license-files = ["LICENSE"]' in pyproject
    assert re.search(r'mpsconv = \["py\.typed"\]', pyproject) and os.path.exists(os.path.join(ROOT, "mpsconv", "py.typed"))
    assert open(os.path.join(ROOT, "LICENSE")).read().lstrip().startswith("Apache License")
    manifest = open(os.path.join(ROOT, "MANIFEST.in")).read().split("\n")
    assert "graft docs" in manifest and "graft examples" in manifest


def test_initializers_show_their_keywords():
    """help() and inspect.signature show the keywords of every overload, not **kwargs."""
    import inspect

    shown = {}
    for name in mpsconv.__all__:
        cls = getattr(mpsconv, name)
        if inspect.isclass(cls) and cls.__module__.startswith("mpsconv") and not issubclass(cls, Exception):
            shown[name] = inspect.signature(cls)
    loose = [name for name, sig in shown.items() if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                                                          for p in sig.parameters.values())]
    assert loose == []
    assert list(shown["MPSCNNConvolution"].parameters)[:2] == ["device", "weights"]
    assert "coder" in shown["MPSCNNConvolutionTranspose"].parameters
    assert list(shown["MPSCNNNeuronReLUN"].parameters) == ["device", "a", "b"]


DOCS = ["README.md", "docs/porting.md", "docs/reliability.md", "docs/semantics.md", "docs/architecture.md"]


@pytest.mark.parametrize("path", DOCS)
def test_docs_cite_only_what_users_have(path):
    """No reference to files outside the repository (the design notes, the specification) or to
    issue numbers; every relative link resolves."""
    text = open(os.path.join(ROOT, path)).read()
    assert not re.search(r"shared/|DESIGN\.md|\bspec\b|§|\bissue \d", text), path
    for target in re.findall(r"\]\(([^)#:]+)\)", text):
        assert os.path.exists(os.path.join(ROOT, os.path.dirname(path), target)), f"{path} links {target}"


def test_the_library_cites_only_what_users_have():
    """Docstrings and messages point at docs/semantics.md, not at a specification users do not have."""
    cited = []
    for folder, _, files in os.walk(os.path.join(ROOT, "mpsconv")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                cited += [f"{name}: {m}" for m in re.findall(r".{0,30}(?:§|\bspec\b|\bissue \d|shared/spec).{0,20}", text)]
    assert cited == []
