"""The benchmarks (run from the repository root: ``python benchmarks/networks.py``, or
``python -m benchmarks.experiments.<name>`` for the experiments, which import ``benchmarks.gpu``)."""
