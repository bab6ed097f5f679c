"""tests/test_archive_fuzz.py's tests at the fuzz job's example count."""
from test_archive_fuzz import *  # noqa: F401,F403
