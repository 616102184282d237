"""Real models: every BatchNorm layer of ResNet-50 back to back (batch 1 and 8), and
the 25 LayerNorms of one BERT-base encoder pass (batch 8, seq 128).

Cases: ``normkit/_bench_cases.py`` (category ``model``); mechanics: ``conftest.py``.
"""
import pytest

from cases import params


@pytest.mark.parametrize(("case", "impl"), params("model"))
def test_model(run_case, case, impl):
    run_case(case, impl)
