"""tests/test_api_fuzz.py's drawn calls at the fuzz job's example count."""
from hypothesis import given, strategies as st

from test_api_fuzz import test_drawn_calls_raise_library_errors_and_a_refusal_changes_nothing as drawn

test_api_at_scale = given(data=st.data())(drawn.hypothesis.inner_test)
