"""tests/test_surface_fuzz.py's test at the fuzz job's example count."""
from test_surface_fuzz import *  # noqa: F401,F403
