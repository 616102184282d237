"""BatchNorm inference (eval) on ResNet shapes, NCHW and NHWC, batch 1 / 8 / 32, plus
float64, float16 and (N, C).

Cases: ``normkit/_bench_cases.py`` (category ``batchnorm``); mechanics: ``conftest.py``.
"""
import pytest

from cases import params


@pytest.mark.parametrize(("case", "impl"), params("batchnorm"))
def test_batchnorm(run_case, case, impl):
    run_case(case, impl)
