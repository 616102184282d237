"""LayerNorm and RMSNorm on transformer shapes (batch x seq x 768 / 1024 / 4096).

Cases: ``normkit/_bench_cases.py`` (category ``rows``); mechanics: ``conftest.py``.
"""
import pytest

from cases import params


@pytest.mark.parametrize(("case", "impl"), params("rows"))
def test_rows(run_case, case, impl):
    run_case(case, impl)
