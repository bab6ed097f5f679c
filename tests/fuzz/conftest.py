"""The opt-in fuzz job (issue 7): the CI fuzz tests with many more examples.

    python -m pytest tests/fuzz -q                      # 20,000 examples per test
    MPSCONV_FUZZ_EXAMPLES=100000 python -m pytest tests/fuzz -q

pytest's default run leaves this folder out (``norecursedirs`` in pyproject.toml); name it to run it.
"""
import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

settings.register_profile("fuzz", max_examples=int(os.environ.get("MPSCONV_FUZZ_EXAMPLES", "20000")), deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile("fuzz")


def pytest_terminal_summary(terminalreporter):
    import hostile

    if hostile.SURFACE_OUTCOMES:
        counts = ", ".join(f"{n} {what}" for what, n in hostile.SURFACE_OUTCOMES.most_common())
        terminalreporter.write_line(f"surface fuzz scenarios: {counts}")
