"""Momentum and running-variance conventions between torch, Keras, ONNX, Flax, MXNet."""
import numpy as np
import pytest

import normkit
from normkit import conventions as C

# momentum conversion is m -> 1 - m: per conversion one rounding of a value <= 1 (u64 =
# 2**-53 absolute); a round trip is two of them
MOMENTUM_ATOL = 2 * 2.0 ** -53


@pytest.mark.parametrize("other", ["keras", "tensorflow", "onnx", "flax", "mxnet"])
def test_momentum_round_trip(other):
    for m in (0.0, 0.01, 0.1, 0.5, 0.99, 1.0):
        there = C.convert_momentum(m, "torch", other)
        # one rounded subtraction 1 - m per direction, |1 - m| <= 1: error <= u64 each
        assert there == pytest.approx(1.0 - m, rel=0, abs=MOMENTUM_ATOL / 2)
        assert C.convert_momentum(there, other, "torch") == pytest.approx(
            m, rel=0, abs=MOMENTUM_ATOL)


def test_momentum_same_convention_is_identity():
    assert C.convert_momentum(0.3, "keras", "onnx") == 0.3
    assert C.convert_momentum(0.3, "torch", "normkit") == 0.3
    assert C.convert_momentum(None, "torch", "torch") is None
    assert normkit.convert_momentum(0.99, "Keras") == pytest.approx(
        0.01, rel=0, abs=MOMENTUM_ATOL)    # 1 - 0.99 rounded once, plus 0.99's own rounding


def test_momentum_means_the_same_update():
    """A Keras-style update with m equals a torch-style update with the converted m."""
    rng = np.random.default_rng(0)
    running, batch = rng.standard_normal(5), rng.standard_normal(5)
    keras_m = 0.99
    keras = keras_m * running + (1 - keras_m) * batch
    torch_m = C.convert_momentum(keras_m, "keras")
    torch_style = (1 - torch_m) * running + torch_m * batch
    # per side: 1 - m (1 rounding, relative), two products and a sum: <= 4 u64 of
    # |running| + |batch|; both sides: 8 u64
    bound = 8 * 2.0 ** -53 * (np.abs(running) + np.abs(batch))
    assert np.all(np.abs(keras - torch_style) <= bound)


def test_momentum_errors():
    with pytest.raises(ValueError, match="no equivalent"):
        C.convert_momentum(None, "torch", "keras")
    with pytest.raises(ValueError, match="unknown convention"):
        C.convert_momentum(0.1, "caffe2000")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        C.convert_momentum(1.5, "keras")
    with pytest.raises(TypeError):
        C.convert_momentum("0.1", "keras")


# n / (n - 1) and the two var reductions of n = 40 terms: 2 gamma_40 (u64) + 4 u64
VAR_RTOL = 2 * 43 * 2.0 ** -53 + 4 * 2.0 ** -53


def test_running_var_biased_unbiased():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 5))               # n = 40 values per channel
    n = x.size // x.shape[1]
    biased = x.var(axis=(0, 2))
    unbiased = x.var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(C.biased_to_unbiased_var(biased, n), unbiased, rtol=VAR_RTOL)
    np.testing.assert_allclose(C.unbiased_to_biased_var(unbiased, n), biased, rtol=VAR_RTOL)
    np.testing.assert_allclose(C.convert_running_var(biased, n, "keras"), unbiased,
                               rtol=VAR_RTOL)
    np.testing.assert_allclose(C.convert_running_var(unbiased, n, "torch", "onnx"), biased,
                               rtol=VAR_RTOL)
    same = C.convert_running_var(unbiased, n, "torch", "normkit")
    np.testing.assert_array_equal(same, unbiased)
    assert same is not unbiased
    assert isinstance(C.biased_to_unbiased_var(1.0, 2), float)
    with pytest.raises(ValueError, match="n "):
        C.biased_to_unbiased_var(biased, 1)


def test_exact_for_equal_batches_ema():
    """An EMA of biased variances converts exactly when every batch has the same n."""
    rng = np.random.default_rng(2)
    m_torch = 0.1
    m_keras = C.convert_momentum(m_torch, "torch", "keras")
    torch_rv, keras_rv = np.ones(4), np.ones(4)
    # start both from values that already correspond (1 unbiased <-> (n-1)/n biased)
    n = 6 * 7
    keras_rv = C.convert_running_var(torch_rv, n, "torch", "keras")
    for _ in range(5):
        x = rng.standard_normal((6, 4, 7)) * 3
        torch_rv = (1 - m_torch) * torch_rv + m_torch * x.var(axis=(0, 2), ddof=1)
        keras_rv = m_keras * keras_rv + (1 - m_keras) * x.var(axis=(0, 2))
    # 5 EMA steps of 3 roundings plus two 42-term reductions per step and one n/(n-1):
    # relative error <= 5 * (2 gamma_42 + 3 u) + 2 u, written out with u = 2**-53
    np.testing.assert_allclose(C.convert_running_var(keras_rv, n, "keras"), torch_rv,
                               rtol=(5 * (2 * 45 + 3) + 2) * 2.0 ** -53)
