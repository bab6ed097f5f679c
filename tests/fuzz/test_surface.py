"""tests/test_surface_fuzz.py's scenarios at the fuzz job's example count, with the outcomes
counted (how many scenarios were refused at which step, how many encoded and matched)."""
import collections

import pytest
from hypothesis import given

from test_surface_fuzz import run_scenario, scenarios

OUTCOMES = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_line(f"surface fuzz outcomes: {dict(OUTCOMES.most_common())}")


@given(scenarios())
def test_surface_at_scale(steps):
    OUTCOMES[run_scenario(steps)] += 1
