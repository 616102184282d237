"""Every backend's kernels against the NumPy reference, one kernel at a time.

This is the contract of normkit/backends/_spec.py made executable: shapes with odd
sizes, N' = 1 and N' = N parameters, read-only inputs, in-place output, hard data
(large mean, constants) and NaN/Inf propagation.
"""
import numpy as np
import pytest

import normkit
from normkit.backends import numpy_ref as ref
from normkit.backends import resolve

BACKENDS = normkit.available_backends()
DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}

# (N, C, S) triples: odd sizes, a single element, long planes, many channels
SHAPES3 = [(1, 1, 1), (1, 3, 17), (2, 3, 1), (3, 17, 5), (2, 5, 1023), (17, 1, 3),
           (1, 64, 130), (4, 1023, 3), (1, 2, 70000), (2, 7, 40000)]
SHAPES2 = [(1, 1), (1, 8), (3, 17), (17, 3), (5, 1023), (2, 4096), (513, 33), (1, 70000)]


def _data(shape, dtype, seed, kind="normal"):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        a = rng.standard_normal(shape) * 2.0 + 0.5
    elif kind == "offset":            # mean 1e4, std 1: catches E[x^2] - E[x]^2
        a = rng.standard_normal(shape) + 1e4
    elif kind == "constant":
        a = np.full(shape, 1234.0)
    a = a.astype(dtype)
    a.setflags(write=False)           # kernels must accept read-only inputs
    return a


def _params(n, c, dtype, seed):
    rng = np.random.default_rng(seed)
    return [np.ascontiguousarray(rng.standard_normal((n, c)).astype(dtype)) for _ in range(4)]


@pytest.fixture(params=BACKENDS)
def be(request):
    return resolve(request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "offset", "constant"])
@pytest.mark.parametrize("shape", SHAPES2)
def test_plane_moments(be, dtype, kind, shape):
    x = _data(shape, dtype, 1, kind)
    mean, m2 = be.plane_moments(x)
    rmean, rm2 = ref.plane_moments(x)
    assert mean.dtype == np.float64 and m2.dtype == np.float64
    assert mean.shape == (shape[0],) and m2.shape == (shape[0],)
    np.testing.assert_allclose(mean, rmean, rtol=1e-12, atol=1e-12)
    # m2 relative to the number of values: the variance must be right to ~1e-9
    np.testing.assert_allclose(m2 / shape[1], rm2 / shape[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "offset", "constant"])
@pytest.mark.parametrize("shape", SHAPES3)
def test_channels_last_moments(be, dtype, kind, shape):
    x = _data(shape, dtype, 2, kind)
    mean, m2 = be.channels_last_moments(x)
    rmean, rm2 = ref.channels_last_moments(x)
    assert mean.shape == (shape[0], shape[2]) and m2.dtype == np.float64
    np.testing.assert_allclose(mean, rmean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m2 / shape[1], rm2 / shape[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("kind", ["normal", "offset", "constant"])
@pytest.mark.parametrize("shape", SHAPES2)
def test_rows_forward(be, dtype, rms, kind, shape):
    x = _data(shape, dtype, 3, kind)
    w, b = _params(1, shape[1], dtype, 4)[:2]
    w, b = w[0], b[0]
    out = np.empty_like(x)
    mean, rstd = be.rows_forward(x, w, b, 1e-5, rms, out)
    rout = np.empty(shape, np.float64)
    rmean, rrstd = ref.rows_forward(x, w, b, 1e-5, rms, rout)
    np.testing.assert_allclose(mean, rmean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rstd, rrstd, rtol=1e-7)
    np.testing.assert_allclose(out, rout, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", SHAPES2)
def test_rows_backward(be, dtype, rms, shape):
    x = _data(shape, dtype, 5)
    dy = _data(shape, dtype, 6)
    w = _params(1, shape[1], dtype, 7)[0][0]
    mean, rstd = ref.rows_forward(x, w, w, 1e-5, rms, np.empty(shape))
    dx = np.empty_like(x)
    dw, db = be.rows_backward(dy, x, mean, rstd, w, rms, dx)
    rdx = np.empty(shape)
    rdw, rdb = ref.rows_backward(dy, x, mean, rstd, w, rms, rdx)
    scale = max(1.0, np.sqrt(shape[0]))
    np.testing.assert_allclose(dx, rdx, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-4 if dtype == np.float32 else 1e-10)
    np.testing.assert_allclose(dw, rdw, rtol=1e-9, atol=1e-9 * scale)
    np.testing.assert_allclose(db, rdb, rtol=1e-9, atol=1e-9 * scale)


def _layout(shape, last):
    n, c, s = shape
    return (n, s, c) if last else (n, c, s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last", [False, True], ids=["first", "last"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["N'=1", "N'=N"])
@pytest.mark.parametrize("shape", SHAPES3)
def test_affine(be, dtype, last, per_sample, shape):
    kshape = _layout(shape, last)
    x = _data(kshape, dtype, 8, "offset")
    shift, scale, offset, _ = _params(shape[0] if per_sample else 1, shape[1], dtype, 9)
    shift = np.ascontiguousarray(shift + dtype(1e4))
    fn = "channels_last_affine" if last else "channels_first_affine"
    out = np.empty_like(x)
    getattr(be, fn)(x, shift, scale, offset, out)
    rout = np.empty(kshape)
    getattr(ref, fn)(x, shift, scale, offset, rout)
    np.testing.assert_allclose(out, rout, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-3 if dtype == np.float32 else 1e-9)
    # in place: out is x
    y = x.copy()
    getattr(be, fn)(y, shift, scale, offset, y)
    np.testing.assert_array_equal(y, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last", [False, True], ids=["first", "last"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["N'=1", "N'=N"])
@pytest.mark.parametrize("shape", SHAPES3)
def test_grad_sums_and_apply(be, dtype, last, per_sample, shape):
    kshape = _layout(shape, last)
    x = _data(kshape, dtype, 10)
    dy = _data(kshape, dtype, 11)
    shift, c_dy, c_x, c_1 = _params(shape[0] if per_sample else 1, shape[1], dtype, 12)
    prefix = "channels_last_" if last else "channels_first_"
    s_dy, s_dyx = getattr(be, prefix + "grad_sums")(dy, x, shift)
    r_dy, r_dyx = getattr(ref, prefix + "grad_sums")(dy, x, shift)
    assert s_dy.shape == (shape[0], shape[1]) and s_dy.dtype == np.float64
    tol = 1e-9 * np.sqrt(shape[2]) * 10
    np.testing.assert_allclose(s_dy, r_dy, rtol=1e-9, atol=tol)
    np.testing.assert_allclose(s_dyx, r_dyx, rtol=1e-9, atol=tol)
    dx = np.empty_like(x)
    getattr(be, prefix + "grad_apply")(dy, x, shift, c_dy, c_x, c_1, dx)
    rdx = np.empty(kshape)
    getattr(ref, prefix + "grad_apply")(dy, x, shift, c_dy, c_x, c_1, rdx)
    np.testing.assert_allclose(dx, rdx, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_propagate(be, dtype):
    x = np.random.default_rng(0).standard_normal((4, 6, 50)).astype(dtype)
    x[1, 2, 7] = np.nan
    x[2, 3, 9] = np.inf
    mean, m2 = be.plane_moments(x.reshape(24, 50))
    assert np.isnan(m2[1 * 6 + 2]) and np.isnan(m2[2 * 6 + 3])
    assert np.isfinite(m2[0]) and np.isfinite(m2[23])
    mean, m2 = be.channels_last_moments(x)
    assert np.isnan(m2[1, 7]) and np.isnan(m2[2, 9]) and np.isfinite(m2[0]).all()
    out = np.empty((4, 300), dtype)
    _, rstd = be.rows_forward(x.reshape(4, 300), np.ones(300, dtype), np.zeros(300, dtype),
                              1e-5, False, out)
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
    assert np.isfinite(out[0]).all() and np.isfinite(out[3]).all()
