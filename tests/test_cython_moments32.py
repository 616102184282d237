"""The float32-lane statistics of 16-bit data in the Cython kernels (nk_moments32 in
``normkit/backends/nk_half.h``), at every SIMD build this CPU runs.

A block of at most CHUNK = 2048 values is summed as d = x - k in float32 lanes that add
at most 16 values each (groups of 4 * 16 * NK_FW values: 256 baseline, 512 AVX2,
1024 AVX-512), k the float32 mean of the block's first <= 16 values; a block whose sums fail
the check n (mean - k)^2 <= M2 or are not finite is recomputed by the double kernel.
So the lengths run around every group size, vector width and CHUNK, and the data kinds
trip the fallback (an outlier among the first values, NaN/Inf anywhere) or sit at its
edge (constants, mean 1e4 with std 1).

Finite results are checked against the float64 reference with the 16-bit bounds of
``_cases`` (the derivation is next to ``half_stat_roundoff``). Rows with NaN/Inf are
checked against the same data widened to float32, whose kernel is the double kernel
the fallback runs: NaN where it gives NaN, the same Inf.
"""
import numpy as np
import pytest

import _cases as K
from normkit.backends import numpy_ref
import test_kernels as TK
from test_cython_half_paths import LEVELS, _module

LENGTHS = (1, 3, 15, 16, 17, 63, 64, 65, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025,
           2047, 2048, 2049, 4100)
KINDS = ("normal", "offset", "mean1e4", "constant", "outlier_first", "outlier_late",
         "nan_block", "nan_tail", "inf_block", "inf_both")


def _rows(kind, n, dtype, seed):
    """3 rows of n values of ``dtype``, widened to float64 (exact)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, n))
    if kind == "offset":
        x = x + K.offset_center(dtype)
    elif kind == "mean1e4":                  # float16 spacing at 1e4 is 8, bfloat16's 64
        x = x + 1e4
    elif kind == "constant":
        x = np.full((3, n), 0.3)
    elif kind == "outlier_first":            # k far from the mean: the fallback
        x[:, 0] = 1e4
    elif kind == "outlier_late":
        x[:, n // 2] = -3e4
    elif kind == "nan_block":                # inside the vector groups
        x[1, min(n - 1, 600)] = np.nan
        x[2, n // 3] = np.nan
    elif kind == "nan_tail":
        x[1:, n - 1] = np.nan
    elif kind == "inf_block":
        x[1, n // 2] = np.inf
        x[2, n - 1] = -np.inf
    elif kind == "inf_both":                 # +Inf and -Inf: s1 is NaN
        x[1:, n // 2] = np.inf
        x[1:, n - 1] = -np.inf
    return np.asarray(x.astype(K.np_dtype(dtype)))


def _finite_bounds(x, dtype, f):
    """f(rows) on the rows with their specials zeroed (the bound of the finite rows)."""
    x64 = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return f(x64.astype(K.np_dtype(dtype)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_plane_moments_16bit(level, dtype, kind):
    be = _module(level)
    for n in LENGTHS:
        x = _rows(kind, n, dtype, seed=n)
        mean, m2 = be.plane_moments(x)
        what = f"{level} {dtype} {kind} n={n}"
        if np.isfinite(x.astype(np.float64)).all():
            want_mean, want_m2 = numpy_ref.plane_moments(x)
            K.assert_within(mean, want_mean, K.bound_mean(x, 1), f"{what} mean")
            K.assert_within(m2, want_m2, K.bound_m2(x, 1), f"{what} m2")
        else:      # the double kernel's answer on the same values
            want_mean, want_m2 = be.plane_moments(x.astype(np.float32))
            b_mean = _finite_bounds(x, dtype, lambda r: K.bound_mean(r, 1))
            b_m2 = _finite_bounds(x, dtype, lambda r: K.bound_m2(r, 1))
            K.assert_within(mean, want_mean, b_mean, f"{what} mean")
            K.assert_within(m2, want_m2, b_m2, f"{what} m2")
            assert np.isnan(m2[1:]).all(), f"{what}: M2 of a row with NaN/Inf is {m2[1:]}"
        if kind == "constant":
            assert (m2 == 0).all() and (mean == np.float64(x[0, 0])).all(), what


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_rows_forward_stats_16bit(level, dtype, kind):
    """LayerNorm (centered moments) and RMSNorm (sum(x^2), no cancellation check)
    statistics of 16-bit rows."""
    be = _module(level)
    eps = 1e-5
    for n in LENGTHS:
        x = _rows(kind, n, dtype, seed=n + 1)
        w, b = np.ones(n, np.float32), np.zeros(n, np.float32)
        for rms in (False, True):
            mean, rstd = be.rows_forward(x, w, b, eps, rms, np.empty_like(x))
            what = f"{level} {dtype} {kind} n={n} rms={rms}"
            if np.isfinite(x.astype(np.float64)).all():
                want_mean, want_rstd = numpy_ref.rows_forward(x, w, b, eps, rms,
                                                              np.empty_like(x))
            else:
                want_mean, want_rstd = be.rows_forward(x.astype(np.float32), w, b, eps, rms,
                                                       np.empty(x.shape, np.float32))
            b_mean = 0.0 if rms else _finite_bounds(x, dtype, lambda r: K.bound_mean(r, 1))
            b_rstd = _finite_bounds(x, dtype, lambda r: K.bound_rstd(r, 1, eps, rms))
            K.assert_within(mean, want_mean, b_mean, f"{what} mean")
            K.assert_within(rstd, want_rstd, b_rstd, f"{what} rstd")


@pytest.mark.parametrize("level", LEVELS)
def test_bfloat16_extremes(level):
    """bfloat16 values whose float32 squares overflow (|x| > 1.8e19: the fallback, so
    the double kernel's finite answer) or underflow (|x| < 1e-19: subnormal squares,
    within n 2^-149 of M2)."""
    be = _module(level)
    bf = K.np_dtype("bfloat16")
    rng = np.random.default_rng(5)
    for scale in (1e30, 1e-25, 1e-40):
        for n in (17, 513, 2049):
            x = (rng.standard_normal((2, n)) * scale).astype(bf)
            mean, m2 = be.plane_moments(x)
            want_mean, want_m2 = numpy_ref.plane_moments(x)
            assert np.isfinite(m2).all(), f"{level} scale {scale} n={n}: M2 {m2}"
            K.assert_within(mean, want_mean, K.bound_mean(x, 1), f"{level} {scale} {n} mean")
            K.assert_within(m2, want_m2, K.bound_m2(x, 1), f"{level} {scale} {n} m2")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_fallback_is_the_double_kernel(level, dtype):
    """A block failing the check, or with NaN/Inf, is the double kernel's answer bit for
    bit: the same as for the values widened to float32 (whose kernel is that double
    kernel with the same k = first value), for one block (n <= CHUNK). Failing blocks:
    the first 16 values at 50, the rest N(0, 0.01^2), so k = 50 and
    n (mean - k)^2 ~ 2500 n > M2 ~ 2500 * 16."""
    be = _module(level)
    for n in (33, 64, 513, 2047, 2048):
        x = _rows("normal", n, dtype, seed=n).astype(np.float64) * 0.01
        x[:, :16] = 50.0
        x[1, n // 2] = np.nan
        x[2, n - 1] = np.inf
        x = x.astype(K.np_dtype(dtype))
        got = be.plane_moments(x)
        want = be.plane_moments(x.astype(np.float32))
        for g, w, name in zip(got, want, ("mean", "m2")):
            K.assert_same(g, w, f"{level} {dtype} n={n} {name}")


STAT_KERNELS = ("plane_moments", "rows_forward", "channels_first_group_forward",
                "channels_first_batch_forward",
                "channels_last_moments", "channels_first_grad_sums", "channels_last_grad_sums",
                "rows_backward")


@pytest.mark.parametrize("n", (255, 257, 1023, 1024, 1025, 2049, 4100))
@pytest.mark.parametrize(("name", "variant", "kind"),
                         [p for p in TK._table() if p.values[0] in STAT_KERNELS])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_statistics_kernels_around_groups(level, dtype, name, variant, kind, n):
    """The kernels whose statistics or gradient sums run in float32 lanes, with planes
    and rows around the group sizes and CHUNK (test_kernels' cases and bounds)."""
    be = _module(level)
    call = TK.KERNEL_CASES[name][0]((2, 3, n), K.np_dtype(dtype), kind, variant, seed=n)
    TK._run(be, name, call, f"{level} {name}[{variant}, {kind}, n={n}]")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_grad_sums_specials(level, dtype):
    """NaN/Inf in dy or x of a plane (inside the vector groups and in the tail): the
    float32-lane gradient sums leave those planes to the double kernel, so they give
    what the values widened to float32 give (NaN for NaN, the same Inf); the planes
    without specials stay within bound_sum."""
    be = _module(level)
    dt = K.np_dtype(dtype)
    for n in (17, 1025, 2049):
        rng = np.random.default_rng(n)
        x = rng.standard_normal((2, 4, n)).astype(dt)
        dy = rng.standard_normal((2, 4, n)).astype(dt)
        x[0, 1, n // 2] = np.nan
        dy[1, 2, n - 1] = np.inf
        x[1, 3, 0] = -np.inf
        shift = rng.standard_normal((1, 4)).astype(np.float32)
        got = be.channels_first_grad_sums(dy, x, shift)
        want = be.channels_first_grad_sums(dy.astype(np.float32), x.astype(np.float32), shift)
        dy64 = dy.astype(np.float64)
        xc = x.astype(np.float64) - shift.astype(np.float64)[:, :, None]
        with np.errstate(invalid="ignore"):
            terms = (np.nan_to_num(np.abs(dy64)).sum(axis=2),
                     np.nan_to_num(np.abs(dy64 * xc), posinf=0.0).sum(axis=2))
        for g, w, t, what in zip(got, want, terms, ("sum dy", "sum dy (x - m)")):
            K.assert_within(g, w, K.bound_sum(t, n, dt), f"{level} {dtype} n={n} {what}")
