"""Training: BatchNorm forward (batch statistics + running-stat update), and forward +
backward of BN, LN, RMSNorm, GN and IN.

Cases: ``normkit/_bench_cases.py`` (category ``training``); mechanics: ``conftest.py``.
"""
import pytest

from cases import params


@pytest.mark.parametrize(("case", "impl"), params("training"))
def test_training(run_case, case, impl):
    run_case(case, impl)
