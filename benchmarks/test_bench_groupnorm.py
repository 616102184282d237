"""GroupNorm (32 groups) and InstanceNorm, NCHW and NHWC.

Cases: ``normkit/_bench_cases.py`` (category ``groupnorm``); mechanics: ``conftest.py``.
"""
import pytest

from cases import params


@pytest.mark.parametrize(("case", "impl"), params("groupnorm"))
def test_groupnorm(run_case, case, impl):
    run_case(case, impl)
