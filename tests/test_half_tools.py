"""Folding, recalibration and diagnostics with 16-bit data (issue 13): statistics and
reports in float64 from the exactly widened 16-bit values, results rounded once."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from _cases import np_dtype

import normkit as nk
from normkit.backends.numpy_ref import narrow

HALF = ["float16", "bfloat16"]
# small batches on purpose: the stability warnings are not what is tested here
pytestmark = pytest.mark.filterwarnings(
    "ignore::normkit.diagnostics.UnstableBatchStatisticsWarning")


def batches(dtype, seed=0, count=3):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((8, 6, 5)) * 3 + 2).astype(np_dtype(dtype))
            for _ in range(count)]


@pytest.mark.parametrize("params", ["same", "float32"])
@pytest.mark.parametrize("dtype", HALF)
def test_recalibrate_16_bit_batches(dtype, params):
    """The running statistics are the float64 mean / unbiased variance of all the
    (exactly widened) batches, rounded once to the buffers' dtype: bit for bit."""
    pdt = np_dtype(dtype) if params == "same" else np.dtype(np.float32)
    bn = nk.BatchNorm(6, dtype=pdt)
    xs = batches(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nk.diagnostics.UnstableBatchStatisticsWarning)
        nk.recalibrate(bn, xs)
    allx = np.concatenate([x.astype(np.float64) for x in xs]).transpose(1, 0, 2)
    allx = allx.reshape(6, -1)
    mean, var = allx.mean(1), allx.var(1, ddof=1)
    for name, want in (("running_mean", mean), ("running_var", var)):
        got = bn.state_dict()[name]
        assert got.dtype == pdt, name
        # the exact statistics agree with the merged ones to ~1e-15 relative, far
        # inside half a 16-bit ulp unless a value sits on a rounding tie: allow 1 ulp
        want16 = narrow(want, pdt).astype(np.float64)
        ulp = np.spacing(np.abs(want16).astype(np.float32)) if pdt == np.float32 else \
            np.abs(want16) * float(np.finfo(np.float16).eps if pdt == np.float16
                                   else 2.0 ** -7)
        assert np.all(np.abs(got.astype(np.float64) - want16) <= ulp), name


@pytest.mark.parametrize("dtype", HALF)
def test_fold_batch_norm_16_bit(dtype):
    """16-bit weight and BatchNorm: computed in float64 from the exact values, one
    rounding to the weight's dtype, so equal to the float64 fold narrowed once."""
    dt = np_dtype(dtype)
    rng = np.random.default_rng(1)
    bn = nk.BatchNorm(6, dtype=dt)
    bn.load_state_dict({"weight": (1 + rng.random(6)).astype(dt),
                        "bias": rng.standard_normal(6).astype(dt),
                        "running_mean": rng.standard_normal(6).astype(dt),
                        "running_var": (0.5 + rng.random(6)).astype(dt),
                        "num_batches_tracked": np.array(1)})
    bn.eval()
    # a conv (out=6, in=4, k=3) followed by the BatchNorm: its output channels, axis 0
    w = rng.standard_normal((6, 4, 3)).astype(dt)
    b = rng.standard_normal(6).astype(dt)
    new_w, new_b = nk.fold_batch_norm(w, b, bn, axis=0)
    assert new_w.dtype == dt and new_b.dtype == dt
    sd = {k: v.astype(np.float64) for k, v in bn.state_dict().items()}
    scale = sd["weight"] / np.sqrt(sd["running_var"] + bn.eps)
    want_w = w.astype(np.float64) * scale[:, None, None]
    want_b = (b.astype(np.float64) - sd["running_mean"]) * scale + sd["bias"]
    np.testing.assert_array_equal(new_w.astype(np.float64),
                                  narrow(want_w, dt).astype(np.float64))
    # the bias goes through b*scale + (beta - mean*scale): a few float64 roundings
    # (~1e-16 relative) can only move a 16-bit result off an exact tie: 1 ulp at most
    got_b, want_b16 = new_b.astype(np.float64), narrow(want_b, dt).astype(np.float64)
    ulp = np.abs(want_b16) * float(np.finfo(np.float16).eps if dtype == "float16"
                                   else 2.0 ** -7)
    assert np.all(np.abs(got_b - want_b16) <= ulp)


@pytest.mark.parametrize("params", ["same", "float32"])
@pytest.mark.parametrize("dtype", HALF)
def test_check_running_stats_16_bit(dtype, params):
    """check_running_stats on a 16-bit-data layer: a float64 report equal to the one
    of the same layer fed the widened float64 data."""
    pdt = np_dtype(dtype) if params == "same" else np.dtype(np.float32)
    xs = batches(dtype, seed=2)
    bn = nk.BatchNorm(6, dtype=pdt).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nk.diagnostics.UnstableBatchStatisticsWarning)
        nk.recalibrate(bn, xs)
    rep16 = nk.diagnostics.check_running_stats(bn, xs[0])
    rep64 = nk.diagnostics.check_running_stats(bn, xs[0].astype(np.float64))
    compared = 0
    for f, a in vars(rep16).items():
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            assert a.dtype == np.float64, f
            np.testing.assert_array_equal(a, getattr(rep64, f), err_msg=f)
            compared += 1
    assert compared >= 2, vars(rep16)
