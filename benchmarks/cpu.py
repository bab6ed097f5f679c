"""The CPU benchmark; the code lives in ``mpsconv/bench.py`` so that ``mpsconv bench`` runs it too.

    python benchmarks/cpu.py [--quick] [--batch N] [--dtype fp32|fp16] [--json PATH] [--plot PATH]
"""
from mpsconv.bench import main

if __name__ == "__main__":
    main()
