"""Every norm, on every backend, against torch.nn.functional and autograd.

The grid: dtype (float32/float64/float16/bfloat16) x channel axis (1, -1) x ndim 2..5 x
affine on/off x memory layout (contiguous, strided, negative strides, Fortran,
read-only, byte-swapped), with odd sizes 1, 3, 17 and 1023 in the shapes. Each case
checks the forward output, the in-place running-statistics update (BatchNorm,
InstanceNorm), and grad_x, grad_weight, grad_bias against autograd. Skipped when torch
is not installed.

float32/float64 rows compare with torch in the same dtype, within the ``_cases``
bounds. 16-bit rows (data and parameters in float16 or bfloat16, as torch takes them)
compare with torch *in the same 16-bit dtype* against a float64 truth (torch in
float64 on the same 16-bit values): normkit's largest error must be at most
``TORCH_FACTOR`` times torch's largest error, for every result. The 16-bit rows of a
backend in ``_cases.PENDING_16BIT`` are strict xfail(TypeError).
"""
import zlib

import numpy as np
import pytest

import normkit as nk

import _cases as K

torch = pytest.importorskip("torch")
TF = torch.nn.functional
torch.set_num_threads(1)

BACKENDS = K.BACKENDS
GRID = K.backend_dtype_params(BACKENDS)   # (backend, dtype) incl. float16 and bfloat16
LAYOUTS = K.LAYOUTS
C = 6   # channels: divisible by the 3 groups of GroupNorm
# channels-first shapes per ndim, with the odd sizes 1, 3, 17 and 1023 among them
SHAPES = {2: (17, C), 3: (3, C, 1023), 4: (2, C, 17, 3), 5: (1, C, 3, 1, 3)}
# 16-bit rows: normkit's error vs float64 at most this times torch's in the same dtype.
# Both round a float32 computation once, so each is within ~1/2 ulp16 of the truth plus
# float32 terms; 2 leaves room for the maximum landing on different elements.
TORCH_FACTOR = 2.0
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}


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


def _t(a, dtype="float64"):
    """A torch tensor of ``dtype`` (a name) holding the values of ``a`` (exactly, when
    they are representable: the 16-bit data is made in its dtype first).

    Always C-contiguous: torch 2.13's instance_norm backward returns wrong gradients
    for a grad_output with permuted strides when a spatial size is 1 (shape
    (1, 6, 3, 1, 3): off by ~5 against finite differences, which normkit matches).
    """
    if a is None:
        return None
    return torch.tensor(np.ascontiguousarray(a, dtype=np.float64)).to(TORCH_DTYPES[dtype])


def _np(t):
    return t.detach().double().numpy() if hasattr(t, "detach") else np.asarray(t, np.float64)


def _close(actual, expected, tol, what):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), _np(expected),
                               rtol=tol["rtol"], atol=tol["atol"], err_msg=what)


def _no_worse_than_torch(actual, torch16, truth, what):
    """normkit's 16-bit result vs the float64 truth: NaN where torch has NaN, and the
    largest error at most TORCH_FACTOR times torch's own in the same dtype."""
    a, t, ref = np.asarray(actual, np.float64), _np(torch16), _np(truth)
    assert a.shape == ref.shape, what
    np.testing.assert_array_equal(np.isnan(a), np.isnan(t), err_msg=f"{what}: NaN")
    ours = float(np.max(np.abs(a - ref), initial=0.0))
    theirs = float(np.max(np.abs(t - ref), initial=0.0))
    assert ours <= TORCH_FACTOR * theirs, \
        f"{what}: error vs float64 {ours:.3g} > {TORCH_FACTOR} x torch's {theirs:.3g}"


def _seed(*key):
    """A seed fixed by the case's parameters (``hash`` of a str changes with every
    process: PYTHONHASHSEED), so a failing case fails again when rerun."""
    return zlib.crc32(repr(key).encode())


def _case(shape, rng):
    x = (rng.standard_normal(shape) * 1.5 + 0.3)
    dy = rng.standard_normal(shape)
    w = rng.standard_normal(shape[1]) + 1.0
    b = rng.standard_normal(shape[1])
    return x, dy, w, b


def _to_user(a, axis):
    """Channels-first reference data as the user passes it for ``axis``."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if axis == -1 else a


def _from_user(a, axis):
    return np.moveaxis(a, -1, 1) if axis == -1 else a


def _layout_ok(dtype, layout):
    if dtype == "bfloat16" and layout == "byteswapped":
        pytest.skip("bfloat16 has no byte-swapped NumPy dtype (ml_dtypes gives '>V2')")


CHANNEL_NORMS = ["batch_norm", "instance_norm", "group_norm"]


def _torch_channel(norm, x, dy, w, b, tdt, eval_stats=None):
    """torch's results for channels-first x (NumPy values) in torch dtype ``tdt``:
    dict of output, running statistics, eval output (BatchNorm; with ``eval_stats``
    (mean, var) when given, else with the running statistics just updated), gradients."""
    tx = _t(x, tdt).requires_grad_()
    tw = None if w is None else _t(w, tdt).requires_grad_()
    tb = None if b is None else _t(b, tdt).requires_grad_()
    r = {}
    if norm == "group_norm":
        ty = TF.group_norm(tx, 3, tw, tb, 1e-5)
    else:
        trm, trv = _t(np.zeros(x.shape[1]), tdt), _t(np.ones(x.shape[1]), tdt)
        fn = TF.batch_norm if norm == "batch_norm" else TF.instance_norm
        ty = fn(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
        r["running_mean"], r["running_var"] = trm, trv
        if norm == "batch_norm":
            r["eval output"] = _torch_eval(x, w, b, tdt, *((trm, trv) if eval_stats is None
                                                          else eval_stats))
    ty.backward(_t(dy, tdt))
    r["output"], r["grad_x"] = ty, tx.grad
    if w is not None:
        r["grad_weight"], r["grad_bias"] = tw.grad, tb.grad
    return r


def _torch_eval(x, w, b, tdt, mean, var):
    """torch's BatchNorm eval output in torch dtype ``tdt`` with running statistics
    (mean, var): tensors, or NumPy values put in ``tdt``."""
    mean, var = (s if torch.is_tensor(s) else _t(s, tdt) for s in (mean, var))
    return TF.batch_norm(_t(x, tdt), mean, var, _t(w, tdt), _t(b, tdt), False)


def _normkit_channel(norm, x, dy, w, b, dtype, axis, backend, eval_stats=None):
    """normkit's results, channels-first, under the names of ``_torch_channel``, and
    (mean, rstd) of the forward."""
    r = {}
    kw = dict(axis=axis, backend=backend)
    if norm == "group_norm":
        y, mean, rstd = nk.group_norm(x, 3, w, b, 1e-5, return_stats=True, **kw)
        gx, gw, gb = nk.group_norm_backward(dy, x, 3, mean, rstd, w, **kw)
    else:
        rm, rv = np.zeros(x.shape[axis], dtype), np.ones(x.shape[axis], dtype)
        fn = nk.batch_norm if norm == "batch_norm" else nk.instance_norm
        y, mean, rstd = fn(x, rm, rv, w, b, True, 0.1, 1e-5, return_stats=True, **kw)
        back = nk.batch_norm_backward if norm == "batch_norm" else nk.instance_norm_backward
        gx, gw, gb = back(dy, x, mean, rstd, w, **kw)
        r["running_mean"], r["running_var"] = rm, rv
        if norm == "batch_norm":     # eval mode, by default with the updated statistics
            erm, erv = (rm, rv) if eval_stats is None else \
                (np.asarray(s, dtype) for s in eval_stats)
            r["eval output"] = _from_user(nk.batch_norm(x, erm, erv, w, b, False, **kw), axis)
    r["output"], r["grad_x"] = _from_user(y, axis), _from_user(gx, axis)
    if w is not None:
        r["grad_weight"], r["grad_bias"] = gw, gb
    return r, (y, gx, mean, rstd)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("norm", CHANNEL_NORMS)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_channel_norms(backend, dtype, norm, axis, ndim, affine, layout):
    if norm == "instance_norm" and ndim == 2:
        pytest.skip("instance norm needs spatial axes (torch raises too; tested in bad input)")
    _layout_ok(dtype, layout)
    rng = np.random.default_rng(_seed(norm, ndim, axis))
    _check_channel(backend, dtype, norm, axis, affine, layout, *_case(SHAPES[ndim], rng))


# Shapes on which the one-kernel paths run (normkit._engine: training BatchNorm with
# >= 16 channels and planes of >= 256 values; GroupNorm / InstanceNorm backward with
# >= 16 (sample, group) blocks of planes of >= 16 values), channels-first.
ONE_KERNEL_SHAPES = [(6, 48, 16, 17), (3, 48, 257)]


@pytest.mark.parametrize("shape", ONE_KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("norm", CHANNEL_NORMS)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_channel_norms_one_kernel_paths(backend, dtype, norm, affine, shape):
    rng = np.random.default_rng(_seed(norm, shape))
    _check_channel(backend, dtype, norm, 1, affine, "contiguous", *_case(shape, rng))


def _check_channel(backend, dtype, norm, axis, affine, layout, x64, dy64, w64, b64):
    c = x64.shape[1]
    dt = K.np_dtype(dtype)
    # everyone sees the values normkit sees (after the cast to dtype)
    xq, dyq = x64.astype(dt), dy64.astype(dt)
    x = K.in_layout(_to_user(xq, axis), layout)
    dy = _to_user(dyq, axis)
    w = w64.astype(dt) if affine else None
    b = b64.astype(dt) if affine else None
    x_before = np.array(x, copy=True)
    # 16-bit: eval mode is checked on the same 16-bit running statistics for everyone
    # (the float64 ones rounded once). Each implementation's own updated statistics
    # differ by an ulp here and there (torch's bfloat16 update rounds twice), and an
    # ulp of running_var moves the eval output by up to ~1/2 ulp16: that would compare
    # the statistics again (they are checked on their own), not the eval kernel.
    eval_stats = None
    if K.is_half(dt):
        truth = _torch_channel(norm, xq, dyq, w, b, "float64")
        if norm == "batch_norm":
            eval_stats = tuple(_np(truth[k]).astype(dt) for k in ("running_mean", "running_var"))
            truth["eval output"] = _torch_eval(xq, w, b, "float64", *eval_stats)
    got, (y, gx, mean, rstd) = _normkit_channel(norm, x, dy, w, b, dt, axis, backend,
                                                eval_stats)
    # the dtype kept (byte order included: a byte-swapped input gives a byte-swapped output)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert gx.dtype.type == x.dtype.type and gx.shape == x.shape
    K.assert_same(x, x_before)  # input untouched
    if K.is_half(dt):
        theirs = _torch_channel(norm, xq, dyq, w, b, dtype, eval_stats)
        assert set(got) == set(truth)
        for what in got:
            _no_worse_than_torch(got[what], theirs[what], truth[what], what)
        return
    want = _torch_channel(norm, xq, dyq, w, b, dtype)
    per_stat = {"batch_norm": x.size // c, "instance_norm": x.size // (x.shape[0] * c),
                "group_norm": x.size // (x.shape[0] * 3)}[norm]
    tol, gtol, ptol = _tols(dtype, per_stat, x.size // c, mean, rstd, x, dy, w, b, y)
    for what in got:
        _close(got[what], want[what],
               {"grad_x": gtol, "grad_weight": ptol, "grad_bias": ptol}.get(what, tol), what)


ROW_SHAPES = {2: ((17, 1023), 1), 3: ((3, 17, 8), 2), 4: ((2, 3, 1, 17), 1),
              5: ((1, 2, 3, 4, 5), 3)}


def _torch_rows(norm, x, dy, ns, w, b, tdt, eps):
    """torch's layer_norm / rms_norm output and gradients in torch dtype ``tdt``."""
    tx = _t(x, tdt).requires_grad_()
    tw = None if w is None else _t(w, tdt).requires_grad_()
    tb = None if b is None else _t(b, tdt).requires_grad_()
    if norm == "layer_norm":
        ty = TF.layer_norm(tx, ns, tw, tb, 1e-5)
    else:
        ty = TF.rms_norm(tx, ns, tw, eps)
    ty.backward(_t(dy, tdt))
    r = {"output": ty, "grad_x": tx.grad}
    if w is not None:
        r["grad_weight"] = tw.grad
        if norm == "layer_norm":
            r["grad_bias"] = tb.grad
    return r


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_row_norms(backend, dtype, norm, ndim, affine, layout):
    _layout_ok(dtype, layout)
    shape, k = ROW_SHAPES[ndim]
    ns = shape[-k:]
    dt = K.np_dtype(dtype)
    rng = np.random.default_rng(ndim * 7 + k)
    x64 = rng.standard_normal(shape) * 2 - 0.5
    dy = rng.standard_normal(shape).astype(dt)
    xq = x64.astype(dt)
    x = K.in_layout(xq, layout)
    w = (rng.standard_normal(ns) + 1).astype(dt) if affine else None
    b = rng.standard_normal(ns).astype(dt) if affine else None
    n = int(np.prod(ns))
    if norm == "layer_norm":
        y, mean, rstd = nk.layer_norm(x, ns, w, b, 1e-5, backend=backend, return_stats=True)
        assert mean.shape == shape[:-k]
        gx, gw, gb = nk.layer_norm_backward(dy, x, ns, mean, rstd, w, backend=backend)
    else:
        y, mean, rstd = nk.rms_norm(x, ns, w, backend=backend, return_stats=True)
        assert mean is None
        gx, gw, gb = nk.rms_norm_backward(dy, x, ns, None, rstd, w, backend=backend)
    assert rstd.shape == shape[:-k]
    assert y.dtype == x.dtype and y.shape == x.shape and gx.dtype.type == y.dtype.type
    got = {"output": y, "grad_x": gx}
    if affine:
        got["grad_weight"] = gw
        if norm == "layer_norm":
            got["grad_bias"] = gb
    # rms_norm eps=None: the epsilon of the statistics' dtype, float32's for 16-bit data
    # (torch takes its opmath type's); torch's own default is used in its 16-bit run
    eps = float(np.finfo(K.param_dtype(dt)).eps)
    if K.is_half(dt):
        truth = _torch_rows(norm, xq, dy, ns, w, b, "float64", eps)
        theirs = _torch_rows(norm, xq, dy, ns, w, b, dtype, None)
        assert set(got) == set(truth)
        for what in got:
            _no_worse_than_torch(got[what], theirs[what], truth[what], what)
        return
    want = _torch_rows(norm, xq, dy, ns, w, b, dtype, eps)
    tol, gtol, ptol = _tols(dtype, n, x.size // n, mean, rstd, x, dy, w, b, y)
    for what in got:
        _close(got[what], want[what],
               {"grad_x": gtol, "grad_weight": ptol, "grad_bias": ptol}.get(what, tol), what)


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


@pytest.mark.parametrize("norm", ["batch_norm", "group_norm", "instance_norm", "layer_norm",
                                  "rms_norm"])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_out_in_place(backend, dtype, norm):
    rng = np.random.default_rng(4)
    dtype = K.np_dtype(dtype)
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
    K.assert_same(out, expected)
    y = x.copy()
    assert call(y, out=y, backend=backend) is y
    K.assert_same(y, expected)   # the same kernels on the same values
    # a non-contiguous out and the channels-last axis with out= as well
    big = np.zeros((3, C, 34), dtype)
    assert call(x, out=big[..., ::2], backend=backend).base is big
    K.assert_same(big[..., ::2], expected)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_fast_path_equals_general_path(backend, dtype, axis):
    """The short-validation fast path (plain call; for 16-bit data with float32
    parameters) and the general path (taken with return_stats=True) must give
    bit-identical results."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, C, 9) if axis == 1 else (4, 9, C)).astype(K.np_dtype(dtype))
    pdt = K.param_dtype(dtype)
    rm, rv, w, b = (rng.standard_normal(C).astype(pdt), (rng.random(C) + .5).astype(pdt),
                    rng.standard_normal(C).astype(pdt), rng.standard_normal(C).astype(pdt))
    K.assert_same(
        nk.batch_norm(x, rm, rv, w, b, axis=axis, backend=backend),
        nk.batch_norm(x, rm, rv, w, b, axis=axis, backend=backend, return_stats=True)[0])
    k = x.shape[-1]
    K.assert_same(
        nk.layer_norm(x, k, w if axis == -1 else None, b if axis == -1 else None,
                      backend=backend),
        nk.layer_norm(x, k, w if axis == -1 else None, b if axis == -1 else None,
                      backend=backend, return_stats=True)[0])
    K.assert_same(
        nk.rms_norm(x, k, backend=backend),
        nk.rms_norm(x, k, backend=backend, return_stats=True)[0])
