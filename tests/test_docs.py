"""The README snippet, the quickstart and the docstring examples run as written."""
from __future__ import annotations

import doctest
import os
import re
import runpy

import pytest

import mpsconv
from mpsconv import convolution, descriptor, geometry

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
