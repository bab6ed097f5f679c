"""tests/test_surface_fuzz.py's scenarios at the fuzz job's example count, with the outcomes
counted (how many scenarios were refused at which step, how many encoded and matched); the counts
are printed at the end of the run (conftest.py)."""
from hypothesis import given

import hostile
from test_surface_fuzz import run_scenario, scenarios


@given(scenarios())
def test_surface_at_scale(steps):
    hostile.SURFACE_OUTCOMES[run_scenario(steps)] += 1
