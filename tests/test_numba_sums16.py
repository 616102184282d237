"""The Numba backend's 16-bit statistics (numba_sums.py: float32 partials of <= 256
values merged in float64, corrected two-pass, float64 fallback per chunk for overflow,
underflow and NaN/Inf, per range when the shift is too far from the mean) and the
kernels' F16C store (no signalling-NaN fix-up), against the float64 reference with the
bounds of ``_cases.py``."""
from __future__ import annotations

import _cases as K
import numpy as np
import pytest

import normkit
from normkit.backends import numba_backend as nb
from normkit.backends import numba_convert as conv
from normkit.backends import numpy_ref as ref

HALF = ["float16", "bfloat16"]
# around the 32-value float32 body, the 256-value chunks, and the odd sizes
LENGTHS = (1, 3, 17, 31, 32, 33, 255, 256, 257, 1023)


def _par(par):
    old, nb._S.par_min = nb._S.par_min, (1 if par else 1 << 62)
    return old


def _check_rows(x, rms, what):
    """rows_forward of 16-bit x (serial and parallel) against the float64 reference."""
    K_ = x.shape[1]
    w, b = (K.make(K_, np.float32, "normal", seed=s) for s in (5, 6))
    want = np.empty(x.shape)
    rmean, rrstd = ref.rows_forward(x, w, b, 1e-5, rms, want)
    for par in (False, True):
        old = _par(par)
        try:
            out = np.empty_like(x)
            mean, rstd = nb.rows_forward(x, w, b, 1e-5, rms, out)
        finally:
            nb._S.par_min = old
        if not rms:
            K.assert_within(mean, rmean, K.bound_mean(x, 1), f"{what} mean")
        K.assert_within(rstd, rrstd, K.bound_rstd(x, 1, 1e-5, rms=rms), f"{what} rstd")
        bound = K.bound_normalized(x, 1, 1e-5, w, b, x.dtype, rms=rms)
        K.assert_within(out, want, bound, f"{what} out")


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", HALF)
def test_rows_forward_odd_lengths_normal_and_offset(dtype, n, rms):
    for kind in ("normal", "offset"):
        x = K.make((5, n), dtype, kind, seed=n)
        _check_rows(x, rms, f"{dtype} n={n} {kind}")


@pytest.mark.parametrize("n", LENGTHS + (5000, 70001))
@pytest.mark.parametrize("dtype", HALF)
def test_plane_moments_odd_lengths(dtype, n):
    """Whole rows and rows split into pieces (parallel: nc > 1 on the long ones)."""
    x = K.make((4, n), dtype, "offset", seed=n + 1)
    rm, rq = ref.plane_moments(x)
    for par in (False, True):
        old = _par(par)
        try:
            m, q = nb.plane_moments(x)
        finally:
            nb._S.par_min = old
        K.assert_within(m, rm, K.bound_mean(x, 1), f"mean n={n}")
        K.assert_within(q, rq, K.bound_m2(x, 1), f"M2 n={n}")


def test_bfloat16_float32_overflow_and_underflow_fall_back_to_float64():
    """Squares of 1e30 overflow float32 and those of 1e-25 underflow it: those chunks
    are summed in float64, so the statistics stay finite and accurate (eps = 0)."""
    bf16 = K.np_dtype("bfloat16")
    base = K.make((3, 1023), np.float64, "normal", seed=9)
    for scale in (1e30, 1e-25, 3e38 / 8):
        x = (base * scale).astype(bf16)
        for rms in (False, True):
            w = np.ones(1023, np.float32)
            want = np.empty(x.shape)
            rmean, rrstd = ref.rows_forward(x, w, w * 0, 0.0, rms, want)
            out = np.empty_like(x)
            mean, rstd = nb.rows_forward(x, w, w * 0, 0.0, rms, out)
            assert np.isfinite(rstd).all() and np.isfinite(mean).all(), scale
            K.assert_within(rstd, rrstd, K.bound_rstd(x, 1, 0.0, rms=rms), f"rstd {scale}")
            if not rms:
                K.assert_within(mean, rmean, K.bound_mean(x, 1), f"mean {scale}")
        m, q = nb.plane_moments(x)
        rm, rq = ref.plane_moments(x)
        assert np.isfinite(q).all(), scale
        K.assert_within(q, rq, K.bound_m2(x, 1), f"M2 {scale}")


@pytest.mark.parametrize("dtype", HALF)
def test_constant_nan_inf_rows(dtype):
    """A constant row has M2 = 0 exactly; NaN gives NaN and Inf non-finite statistics
    in its own row only (the float64 fallback keeps them)."""
    dt = K.np_dtype(dtype)
    x = K.make((5, 1023), dt, "normal", seed=3)
    x[0] = 1000.0
    x[1, 700] = np.nan
    x[2, 5] = np.inf
    x[3, 1020] = -np.inf          # in the float64 tail (< 32 values at the end)
    m, q = nb.plane_moments(x)
    assert q[0] == 0.0 and m[0] == 1000.0
    assert np.isnan(q[1]) and np.isnan(m[1])
    assert not np.isfinite(q[2]) and not np.isfinite(q[3])
    assert np.isfinite(q[4]) and np.isfinite(m[4])
    out = np.empty_like(x)
    w = np.ones(1023, np.float32)
    mean, rstd = nb.rows_forward(x, w, w * 0, 1e-5, False, out)
    assert mean[0] == 1000.0 and np.isfinite(rstd[0]) and (out[0] == 0).all()
    assert np.isnan(out[1]).all() and np.isfinite(out[4]).all()


@pytest.mark.parametrize("layout", ["strided", "negative", "readonly", "fortran"])
@pytest.mark.parametrize("dtype", HALF)
def test_layer_norm_and_group_norm_layouts(dtype, layout):
    """The public functions on 16-bit data in non-contiguous, negative-stride and
    read-only layouts equal the contiguous result bit for bit (same kernel values)."""
    x = K.make((4, 3, 257), dtype, "offset", seed=11)
    y = K.in_layout(x, layout)
    for fn in (lambda a: normkit.layer_norm(a, (257,), backend="numba"),
               lambda a: normkit.group_norm(a, 3, backend="numba"),
               lambda a: normkit.rms_norm(a, (257,), backend="numba")):
        K.assert_same(fn(y), fn(x))
    np.testing.assert_array_equal(y.astype(np.float32), x.astype(np.float32))


def test_kernel_f16c_store_equals_numpy_for_arithmetic_results():
    """The kernels' float16 store (``_st``: no signalling-NaN fix-up with F16C) narrows
    every result of arithmetic as NumPy: all 2**19 float16 ties and neighbours and every
    1021st float32 pattern (NaNs come out of the multiply quiet, as in NumPy)."""
    u = np.uint32
    ties = ((np.arange(1 << 19, dtype=u)[:, None] << u(13))
            | np.array([0, 1, 0xFFF, 0x1000, 0x1001], u))
    stride = np.arange(0, 1 << 32, 1021, dtype=np.uint64).astype(u)
    f = np.concatenate([ties.ravel(), stride]).view(np.float32)
    one = np.float32(1.0)
    got = np.empty(f.size, np.int16)
    conv.narrow_product(f, one, got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = (f * one).astype(np.float16).view(np.int16)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [hex(v) for v in f.view(np.uint32)[bad[:5]]]


def test_bound_constants_match_the_kernels():
    """tests/_cases.py's 16-bit bound assumes float32 sums of at most NUMBA_CHUNK16 values
    in any order: the kernel must not sum longer runs in float32."""
    from normkit.backends import numba_sums
    assert numba_sums._CHUNK16 <= K.NUMBA_CHUNK16
