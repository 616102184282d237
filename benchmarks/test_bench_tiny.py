"""Tiny inputs: per-call overhead (validation, dispatch, thread start-up).

Cases: ``normkit/_bench_cases.py`` (category ``tiny``); mechanics: ``conftest.py``.
"""
import pytest

from cases import params


@pytest.mark.parametrize(("case", "impl"), params("tiny"))
def test_tiny(run_case, case, impl):
    run_case(case, impl)
