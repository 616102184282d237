"""Every norm, on every backend, against torch.nn.functional and autograd.

The grid: dtype (float32/float64/float16) x channel axis (1, -1) x ndim 2..5 x affine
on/off x memory layout (contiguous, strided, negative strides, Fortran, read-only),
with odd sizes 1, 3, 17 and 1023 in the shapes. Each case checks the forward output,
the in-place running-statistics update (BatchNorm, InstanceNorm), and grad_x,
grad_weight, grad_bias against autograd. Skipped when torch is not installed.
"""
import numpy as np
import pytest

import normkit as nk

import _cases as K

torch = pytest.importorskip("torch")
TF = torch.nn.functional
torch.set_num_threads(1)

BACKENDS = K.BACKENDS
DTYPES = K.api_dtypes()       # float32, float64, float16 (+ bfloat16, skipped until issue 13)
LAYOUTS = K.LAYOUTS
C = 6   # channels: divisible by the 3 groups of GroupNorm
# channels-first shapes per ndim, with the odd sizes 1, 3, 17 and 1023 among them
SHAPES = {2: (17, C), 3: (3, C, 1023), 4: (2, C, 17, 3), 5: (1, C, 3, 1, 3)}


def _tols(dtype, n, count, mean, rstd, x, dy, w, b, y):
    """Bounds (``_cases``) for this case's forward output / running statistics, dx, and
    dweight / dbias: n values per statistic, ``count`` values per channel parameter,
    conditioning from the statistics, scales from the data (|xhat| <= (|x| + |mean|)
    rstd)."""
    cond = K.conditioning(mean, rstd)
    amax = lambda a: 0.0 if a is None else float(np.max(np.abs(np.asarray(a, np.float64))))  # noqa: E731
    r, wmax = amax(rstd), max(1.0, amax(w))
    xhat = (amax(x) + amax(mean)) * r
    y_scale = max(1.0, wmax, amax(b), amax(y))
    g_scale = r * amax(dy) * wmax * (1 + xhat * xhat)
    p_scale = count * amax(dy) * max(1.0, xhat)
    return (K.tol_normalized(dtype, n, cond, y_scale), K.tol_grad(dtype, n, cond, g_scale),
            K.tol_grad(dtype, count, cond, p_scale))


def _t(a, dtype=None):
    """A float64 (or given dtype) torch tensor; float16 cases compare with float32 torch.

    Always C-contiguous: torch 2.13's instance_norm backward returns wrong gradients
    for a grad_output with permuted strides when a spatial size is 1 (shape
    (1, 6, 3, 1, 3): off by ~5 against finite differences, which normkit matches).
    """
    return torch.tensor(np.ascontiguousarray(a, dtype=dtype or np.float64))


def _close(actual, expected, tol, what):
    tol = (tol["rtol"], tol["atol"])
    actual = np.asarray(actual, dtype=np.float64)
    expected = expected.detach().numpy().astype(np.float64) if hasattr(expected, "detach") \
        else np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol[0], atol=tol[1], err_msg=what)


def _case(norm, dtype, axis, ndim, rng):
    shape = SHAPES[ndim]
    x = (rng.standard_normal(shape) * 1.5 + 0.3)
    dy = rng.standard_normal(shape)
    w = rng.standard_normal(C) + 1.0
    b = rng.standard_normal(C)
    return x, dy, w, b


def _to_user(a, axis):
    """Channels-first reference data as the user passes it for ``axis``."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if axis == -1 else a


def _from_user(a, axis):
    return np.moveaxis(a, -1, 1) if axis == -1 else a


CHANNEL_NORMS = ["batch_norm", "instance_norm", "group_norm"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", CHANNEL_NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_norms(backend, norm, dtype, axis, ndim, affine, layout):
    if norm == "instance_norm" and ndim == 2:
        pytest.skip("instance norm needs spatial axes (torch raises too; tested in bad input)")
    rng = np.random.default_rng(hash((norm, ndim, axis)) % 2**32)
    x64, dy64, w64, b64 = _case(norm, dtype, axis, ndim, rng)
    x = K.in_layout(_to_user(x64.astype(dtype), axis), layout)
    dy = _to_user(dy64.astype(dtype), axis)
    w = w64.astype(dtype) if affine else None
    b = b64.astype(dtype) if affine else None
    tdt = np.float64 if dtype == "float64" else np.float32
    # torch sees the values normkit sees (after the cast to dtype)
    tx = _t(x64.astype(dtype), tdt).requires_grad_()
    tw = _t(w, tdt).requires_grad_() if affine else None
    tb = _t(b, tdt).requires_grad_() if affine else None
    x_before = np.array(x, copy=True)
    tols = lambda n, y, mean, rstd: _tols(dtype, n, x.size // C, mean, rstd, x, dy, w, b, y)  # noqa: E731

    if norm == "batch_norm":
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        trm, trv = _t(np.zeros(C), tdt), _t(np.ones(C), tdt)
        y, mean, rstd = nk.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis=axis,
                                      backend=backend, return_stats=True)
        tol, gtol, ptol = tols(x.size // C, y, mean, rstd)
        ty = TF.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
        _close(rm, trm, tol, "running_mean")
        _close(rv, trv, tol, "running_var")
        gx, gw, gb = nk.batch_norm_backward(dy, x, mean, rstd, w, training=True, axis=axis,
                                            backend=backend)
        # eval mode with the updated running statistics
        ye = nk.batch_norm(x, rm, rv, w, b, False, axis=axis, backend=backend)
        tye = TF.batch_norm(_t(x64.astype(dtype), tdt), trm.to(tx.dtype), trv.to(tx.dtype),
                            None if w is None else _t(w, tdt), None if b is None else _t(b, tdt),
                            False)
        _close(_from_user(ye, axis), tye, tol, "eval output")
    elif norm == "instance_norm":
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        trm, trv = _t(np.zeros(C), tdt), _t(np.ones(C), tdt)
        y, mean, rstd = nk.instance_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis=axis,
                                         backend=backend, return_stats=True)
        tol, gtol, ptol = tols(x.size // (x.shape[0] * C), y, mean, rstd)
        ty = TF.instance_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
        _close(rm, trm, tol, "running_mean")
        _close(rv, trv, tol, "running_var")
        gx, gw, gb = nk.instance_norm_backward(dy, x, mean, rstd, w, axis=axis,
                                               backend=backend)
    else:
        y, mean, rstd = nk.group_norm(x, 3, w, b, 1e-5, axis=axis, backend=backend,
                                      return_stats=True)
        tol, gtol, ptol = tols(x.size // (x.shape[0] * 3), y, mean, rstd)
        ty = TF.group_norm(tx, 3, tw, tb, 1e-5)
        gx, gw, gb = nk.group_norm_backward(dy, x, 3, mean, rstd, w, axis=axis,
                                            backend=backend)
    # the dtype kept (byte order included: a byte-swapped input gives a byte-swapped output)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert gx.dtype.type == x.dtype.type and gx.shape == x.shape
    np.testing.assert_array_equal(x, x_before)  # input untouched
    _close(_from_user(y, axis), ty, tol, "output")
    ty.backward(_t(_from_user(dy, axis), tdt))
    _close(_from_user(gx, axis), tx.grad, gtol, "grad_x")
    if affine:
        _close(gw, tw.grad, ptol, "grad_weight")
        _close(gb, tb.grad, ptol, "grad_bias")


ROW_SHAPES = {2: ((17, 1023), 1), 3: ((3, 17, 8), 2), 4: ((2, 3, 1, 17), 1),
              5: ((1, 2, 3, 4, 5), 3)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_norms(backend, norm, dtype, ndim, affine, layout):
    shape, k = ROW_SHAPES[ndim]
    ns = shape[-k:]
    rng = np.random.default_rng(ndim * 7 + k)
    x64 = rng.standard_normal(shape) * 2 - 0.5
    dy = rng.standard_normal(shape).astype(dtype)
    x = K.in_layout(x64.astype(dtype), layout)
    w = (rng.standard_normal(ns) + 1).astype(dtype) if affine else None
    b = rng.standard_normal(ns).astype(dtype) if affine else None
    tdt = np.float64 if dtype == "float64" else np.float32
    tx = _t(x64.astype(dtype), tdt).requires_grad_()
    tw = _t(w, tdt).requires_grad_() if affine else None
    tb = _t(b, tdt).requires_grad_() if affine else None
    n = int(np.prod(ns))
    if norm == "layer_norm":
        y, mean, rstd = nk.layer_norm(x, ns, w, b, 1e-5, backend=backend, return_stats=True)
        assert mean.shape == shape[:-k]
        ty = TF.layer_norm(tx, ns, tw, tb, 1e-5)
        gx, gw, gb = nk.layer_norm_backward(dy, x, ns, mean, rstd, w, backend=backend)
    else:
        y, mean, rstd = nk.rms_norm(x, ns, w, backend=backend, return_stats=True)
        assert mean is None
        ty = TF.rms_norm(tx, ns, tw, float(np.finfo(dtype).eps))
        gx, gw, gb = nk.rms_norm_backward(dy, x, ns, None, rstd, w, backend=backend)
    tol, gtol, ptol = _tols(dtype, n, x.size // n, mean, rstd, x, dy, w, b, y)
    assert rstd.shape == shape[:-k]
    assert y.dtype == x.dtype and y.shape == x.shape and gx.dtype.type == y.dtype.type
    _close(y, ty, tol, "output")
    ty.backward(_t(dy, tdt))
    _close(gx, tx.grad, gtol, "grad_x")
    if affine:
        _close(gw, tw.grad, ptol, "grad_weight")
        if norm == "layer_norm":
            _close(gb, tb.grad, ptol, "grad_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [1, -1])
def test_batch_norm_eval_backward(backend, axis):
    rng = np.random.default_rng(3)
    x64 = rng.standard_normal((4, C, 5, 3))
    dy64 = rng.standard_normal(x64.shape)
    rm, rv, w, b = rng.standard_normal(C), rng.random(C) + 0.5, rng.standard_normal(C), \
        rng.standard_normal(C)
    tx, tw, tb = (_t(a).requires_grad_() for a in (x64, w, b))
    ty = TF.batch_norm(tx, _t(rm), _t(rv), tw, tb, False)
    ty.backward(_t(dy64))
    x, dy = _to_user(x64, axis), _to_user(dy64, axis)
    y, mean, rstd = nk.batch_norm(x, rm, rv, w, b, False, axis=axis, backend=backend,
                                  return_stats=True)
    np.testing.assert_array_equal(mean, rm)            # eval: the running mean itself
    np.testing.assert_allclose(rstd, 1 / np.sqrt(rv + 1e-5), rtol=8 * K.U64)  # 3 roundings a side
    gx, gw, gb = nk.batch_norm_backward(dy, x, mean, rstd, w, training=False, axis=axis,
                                        backend=backend)
    # eval: no reduction in the output (n = 1); dweight / dbias sum x.size / C values
    tol, gtol, ptol = _tols("float64", 1, x.size // C, mean, rstd, x, dy, w, b, y)
    _close(_from_user(y, axis), ty, tol, "eval output")
    _close(_from_user(gx, axis), tx.grad, gtol, "grad_x")
    _close(gw, tw.grad, ptol, "grad_weight")
    _close(gb, tb.grad, ptol, "grad_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["batch_norm", "group_norm", "instance_norm", "layer_norm",
                                  "rms_norm"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_out_in_place(backend, norm, dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, C, 17)).astype(dtype)
    call = {
        "batch_norm": lambda a, **kw: nk.batch_norm(a, None, None, None, None, True, **kw),
        "group_norm": lambda a, **kw: nk.group_norm(a, 3, **kw),
        "instance_norm": lambda a, **kw: nk.instance_norm(a, **kw),
        "layer_norm": lambda a, **kw: nk.layer_norm(a, (17,), **kw),
        "rms_norm": lambda a, **kw: nk.rms_norm(a, (C, 17), **kw),
    }[norm]
    expected = call(x, backend=backend)
    out = np.empty_like(x)
    assert call(x, out=out, backend=backend) is out
    np.testing.assert_array_equal(out, expected)
    y = x.copy()
    assert call(y, out=y, backend=backend) is y
    np.testing.assert_array_equal(y, expected)   # the same kernels on the same values
    # a non-contiguous out and the channels-last axis with out= as well
    big = np.zeros((3, C, 34), dtype)
    assert call(x, out=big[..., ::2], backend=backend).base is big
    np.testing.assert_array_equal(big[..., ::2], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", [1, -1])
def test_fast_path_equals_general_path(backend, dtype, axis):
    """The short-validation fast path (plain call) and the general path (taken with
    return_stats=True) must give bit-identical results."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, C, 9) if axis == 1 else (4, 9, C)).astype(dtype)
    rm, rv, w, b = (rng.standard_normal(C).astype(dtype), (rng.random(C) + .5).astype(dtype),
                    rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype))
    np.testing.assert_array_equal(
        nk.batch_norm(x, rm, rv, w, b, axis=axis, backend=backend),
        nk.batch_norm(x, rm, rv, w, b, axis=axis, backend=backend, return_stats=True)[0])
    k = x.shape[-1]
    np.testing.assert_array_equal(
        nk.layer_norm(x, k, w if axis == -1 else None, b if axis == -1 else None,
                      backend=backend),
        nk.layer_norm(x, k, w if axis == -1 else None, b if axis == -1 else None,
                      backend=backend, return_stats=True)[0])
    np.testing.assert_array_equal(
        nk.rms_norm(x, k, backend=backend),
        nk.rms_norm(x, k, backend=backend, return_stats=True)[0])
