"""16-bit data (float16, bfloat16) through the public functions, every norm (issue 13).

The grid is (backend, dtype) from ``_cases.backend_dtype_params`` (a backend in
``_cases.PENDING_16BIT`` has its rows as strict xfail(TypeError) until its 16-bit
kernels are merged) crossed with norms, channel axis, ndim 2..5 with odd sizes,
training / eval. Accuracy is measured the way the issue states it: against a float64
truth (torch in float64 on the same 16-bit values), normkit's largest error must be at
most ``TORCH_FACTOR`` times torch's own largest error in the same 16-bit dtype.

Also here: mixed precision (16-bit x with float32 weight, bias and running statistics,
torch's autocast layout; 16-bit parameters of another 16-bit dtype), every memory
layout giving the bits of the contiguous call, hard data (what each dtype can hold),
constants, NaN/Inf and float16 overflow as torch, empty inputs, the returned dtypes,
the oracle's single rounding, and a tracemalloc check that no float32 copy of x is
made.
"""
import math
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import normkit as nk
from normkit.backends import numpy_ref

import _cases as K

torch = pytest.importorskip("torch")
TF = torch.nn.functional

EPS = 1e-5
C = 6                        # channels; 3 groups for GroupNorm
GRID = K.backend_dtype_params(dtypes=K.HALF_DTYPES)
# normkit's error vs float64 at most this times torch's in the same dtype (both round a
# float32 computation once; the largest errors may fall on different elements)
TORCH_FACTOR = 2.0
SHAPES = {2: (17, C), 3: (3, C, 33), 4: (2, C, 5, 3), 5: (1, C, 3, 1, 3)}
NORMS = ["batch", "batch_eval", "instance", "group", "layer", "rms"]
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
         "float64": torch.float64}


# ====================================================================== helpers
def _t(a, dtype):
    if a is None:
        return None
    return torch.tensor(np.asarray(a, np.float64)).to(TORCH[dtype])


def _np(t):
    return None if t is None else t.detach().double().numpy()


def _params(rng, c, pdt, norm):
    """weight, bias, running_mean, running_var (float64 values of ``pdt``)."""
    w = (rng.standard_normal(c) * 0.5 + 1.0).astype(K.np_dtype(pdt)).astype(np.float64)
    b = rng.standard_normal(c).astype(K.np_dtype(pdt)).astype(np.float64)
    if norm == "batch_eval":
        rm = (rng.standard_normal(c) * 0.3).astype(K.np_dtype(pdt)).astype(np.float64)
        rv = (rng.random(c) + 0.5).astype(K.np_dtype(pdt)).astype(np.float64)
    else:
        rm, rv = np.zeros(c), np.ones(c)
    return w, b, rm, rv


def torch_run(norm, x, dy, p, tdt, pdt, eps=EPS):
    """torch's results on channels-first x (NumPy values): data in ``tdt``, parameters
    and running statistics in ``pdt`` (dtype names)."""
    w, b, rm, rv = p
    tx = _t(x, tdt).requires_grad_()
    tw, tb = _t(w, pdt).requires_grad_(), _t(b, pdt).requires_grad_()
    trm, trv = _t(rm, pdt), _t(rv, pdt)
    k = x.shape[-1]
    if norm in ("batch", "batch_eval"):
        y = TF.batch_norm(tx, trm, trv, tw, tb, norm == "batch", 0.1, EPS)
    elif norm == "instance":
        y = TF.instance_norm(tx, trm, trv, tw, tb, True, 0.1, EPS)
    elif norm == "group":
        y = TF.group_norm(tx, 3, tw, tb, EPS)
    elif norm == "layer":
        y = TF.layer_norm(tx, (k,), tw[:k], tb[:k], EPS)
    else:
        y = TF.rms_norm(tx, (k,), tw[:k], eps)
    y.backward(_t(dy, tdt))
    r = {"output": y, "grad_x": tx.grad, "grad_weight": tw.grad}
    if norm != "rms":
        r["grad_bias"] = tb.grad
    if norm in ("batch", "instance"):
        r["running_mean"], r["running_var"] = trm, trv
    return {key: _np(v) for key, v in r.items()}


def normkit_run(norm, x, dy, p, pdt, axis, backend):
    """normkit's results, channels-first, named as ``torch_run``'s; x, dy in the user's
    layout for ``axis`` (channels-first values moved when axis == -1)."""
    dt = x.dtype
    w, b, rm, rv = (np.asarray(a).astype(K.np_dtype(pdt)) for a in p)
    kw = dict(backend=backend, return_stats=True)
    back = dict(backend=backend)
    user = (lambda a: np.moveaxis(a, 1, -1)) if axis == -1 else (lambda a: a)
    mine = (lambda a: np.moveaxis(a, -1, 1)) if axis == -1 else (lambda a: a)
    xu, dyu = user(x), user(dy)
    r = {}
    if norm in ("batch", "batch_eval"):
        training = norm == "batch"
        y, mean, rstd = nk.batch_norm(xu, rm, rv, w, b, training, 0.1, EPS, axis=axis, **kw)
        g = nk.batch_norm_backward(dyu, xu, mean, rstd, w, training=training, axis=axis,
                                   **back)
    elif norm == "instance":
        y, mean, rstd = nk.instance_norm(xu, rm, rv, w, b, True, 0.1, EPS, axis=axis, **kw)
        g = nk.instance_norm_backward(dyu, xu, mean, rstd, w, axis=axis, **back)
    elif norm == "group":
        y, mean, rstd = nk.group_norm(xu, 3, w, b, EPS, axis=axis, **kw)
        g = nk.group_norm_backward(dyu, xu, 3, mean, rstd, w, axis=axis, **back)
    else:       # row norms: over the last axis of channels-first data, axis unused
        k = x.shape[-1]
        xu, dyu, user, mine = x, dy, (lambda a: a), (lambda a: a)
        if norm == "layer":
            y, mean, rstd = nk.layer_norm(x, k, w[:k], b[:k], EPS, **kw)
            g = nk.layer_norm_backward(dy, x, k, mean, rstd, w[:k], **back)
        else:
            y, mean, rstd = nk.rms_norm(x, k, w[:k], **kw)
            g = nk.rms_norm_backward(dy, x, k, None, rstd, w[:k], **back)
    assert y.dtype == dt and g[0].dtype == dt and y.shape == xu.shape
    assert rstd.dtype == np.float32 and (mean is None or mean.dtype == np.float32)
    assert g[1].dtype == w.dtype and g[2].dtype == w.dtype
    r = {"output": mine(y), "grad_x": mine(g[0]), "grad_weight": g[1]}
    if norm != "rms":
        r["grad_bias"] = g[2]
    if norm in ("batch", "instance"):
        assert rm.dtype == K.np_dtype(pdt) and rv.dtype == K.np_dtype(pdt)
        r["running_mean"], r["running_var"] = rm, rv
    return {key: np.asarray(v, np.float64) for key, v in r.items()}


def _ulp(dtype, m):
    """One unit in the last place of ``dtype`` at magnitude m (> 0, normal)."""
    return float(ml_dtypes.finfo(dtype).eps) * 2.0 ** math.floor(math.log2(m))


def no_worse_than_torch(got, theirs, truth, what="", dtypes=None):
    """For every result: NaN where torch's is NaN, +-Inf as torch's, and the largest
    error vs the float64 truth at most TORCH_FACTOR times torch's -- or one ulp of the
    result's dtype (``dtypes[key]``) at the largest |truth|, where that is more. Both
    round each result to its dtype once, up to half an ulp; when torch's largest error
    is well under an ulp, TORCH_FACTOR times it measures the luck of that last rounding,
    not accuracy (seen on an AVX2 EPYC: a float32 grad_weight 4.4e-7 off against
    torch's 2.1e-7, one ulp there 4.8e-7)."""
    assert set(got) == set(truth), what
    for key in got:
        a, t, ref = got[key], theirs[key], truth[key]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(t), err_msg=f"{what} {key}: NaN")
        np.testing.assert_array_equal(a[np.isinf(t)], t[np.isinf(t)],
                                      err_msg=f"{what} {key}: Inf")
        fin = np.isfinite(ref) & np.isfinite(t)
        ours = float(np.max(np.abs(a[fin] - ref[fin]), initial=0.0))
        their = float(np.max(np.abs(t[fin] - ref[fin]), initial=0.0))
        top = float(np.max(np.abs(ref[fin]), initial=0.0))
        floor = _ulp(dtypes[key], top) if dtypes and top > 0 else 0.0
        assert ours <= max(TORCH_FACTOR * their, floor), \
            f"{what} {key}: error vs float64 {ours:.3g} > {TORCH_FACTOR} x torch's {their:.3g}" \
            f" and > one ulp {floor:.3g}"


def compare_with_torch(norm, x64, dy64, p, dtype, pdt, axis, backend, what=""):
    """x64, dy64: channels-first float64 values; quantized to ``dtype`` first."""
    dt = K.np_dtype(dtype)
    xq, dyq = x64.astype(dt), dy64.astype(dt)
    got = normkit_run(norm, xq, dyq, p, pdt, axis, backend)
    rms_eps = float(np.finfo(np.float32).eps)       # torch's default for 16-bit data
    truth = torch_run(norm, xq, dyq, p, "float64", "float64", rms_eps)
    theirs = torch_run(norm, xq, dyq, p, dtype, pdt, rms_eps)
    # the data results in the data's dtype, the parameter-shaped ones in the parameters'
    dtypes = {key: dt if key in ("output", "grad_x") else K.np_dtype(pdt) for key in got}
    no_worse_than_torch(got, theirs, truth, what, dtypes)
    return got


# ====================================================================== accuracy vs torch
@pytest.mark.parametrize("pdt", ["float32", "same"], ids=["params-f32", "params-16"])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_every_norm_vs_torch(backend, dtype, norm, axis, ndim, pdt):
    """Forward, backward and running statistics; torch's two layouts: 16-bit weight,
    bias and running statistics, or float32 ones (mixed precision)."""
    if norm == "instance" and ndim == 2:
        pytest.skip("instance norm needs spatial axes (torch raises too)")
    pdt = dtype if pdt == "same" else pdt
    rng = np.random.default_rng(ndim * 10 + len(norm))
    shape = SHAPES[ndim]
    x, dy = rng.standard_normal(shape) * 1.5 + 0.3, rng.standard_normal(shape)
    compare_with_torch(norm, x, dy, _params(rng, shape[-1] if norm in ("layer", "rms")
                                            else C, pdt, norm),
                       dtype, pdt, axis, backend, f"{norm} {shape}")


# (what each dtype can hold) mean/std ~ 100 in float16, ~10 in bfloat16; values
# near float16's top (sums of squares far beyond 65504); subnormal-sized values
HARD = ["offset", "large", "tiny", "constant"]


@pytest.mark.parametrize("kind", HARD)
@pytest.mark.parametrize("norm", ["batch", "group", "layer", "rms", "instance"])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_hard_data_vs_torch(backend, dtype, norm, kind):
    shape = (4, C, 301)
    x = K.make(shape, dtype, kind, seed=5).astype(np.float64)
    dy = K.make(shape, dtype, "normal", seed=6).astype(np.float64)
    got = compare_with_torch(norm, x, dy, _params(np.random.default_rng(7), 301 if
                                                  norm in ("layer", "rms") else C,
                                                  "float32", norm),
                             dtype, "float32", 1, backend, f"{norm} {kind}")
    if kind == "constant" and norm != "rms":    # var 0: xhat is exactly 0, y the bias
        w, b, _, _ = _params(np.random.default_rng(7), 301 if norm == "layer" else C,
                             "float32", norm)
        bias = b if norm == "layer" else b[None, :, None]
        want = np.broadcast_to(bias, shape).astype(K.np_dtype(dtype)).astype(np.float64)
        np.testing.assert_array_equal(got["output"], want)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_nan_inf_and_overflow_as_torch(backend, dtype, norm):
    """NaN/Inf in x: the same NaN/Inf positions as torch in the same dtype. A float32
    weight large enough to overflow float16 gives +-Inf there, as torch."""
    rng = np.random.default_rng(8)
    shape = (3, C, 7)
    x = rng.standard_normal(shape)
    x[0, 1, 2], x[1, 3, 4], x[2, 5, 6] = np.nan, np.inf, -np.inf
    dy = rng.standard_normal(shape)
    p = list(_params(rng, 7 if norm in ("layer", "rms") else C, "float32", norm))
    p[0] = p[0] * 3e4          # |xhat| * 3e4 > 65504 for |xhat| > 2.2
    compare_with_torch(norm, x, dy, p, dtype, "float32", 1, backend, norm)


# ====================================================================== mixed parameters
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_parameters_of_any_float_dtype_are_widened_exactly(backend, dtype, norm):
    """16-bit parameters (of x's dtype or the other 16-bit dtype), float32 and float64
    ones holding the same values give the bits of the float32 call (widening a 16-bit
    value to float32 is exact). torch refuses the mixed 16-bit pairs; API.md takes any
    float dtype."""
    rng = np.random.default_rng(9)
    shape = (2, C, 5, 3)
    x = K.make(shape, dtype, seed=10)
    dy = K.make(shape, dtype, seed=11)
    p = _params(rng, 3 if norm in ("layer", "rms") else C, "bfloat16", norm)  # exact in all
    base = normkit_run(norm, x, dy, p, "float32", 1, backend)
    for pdt in ("float16", "bfloat16", "float64"):
        other = normkit_run(norm, x, dy, p, pdt, 1, backend)
        for key in ("output", "grad_x"):
            K.assert_same(other[key], base[key], err_msg=f"{pdt} {key}")


# ====================================================================== layouts
LAYOUTS = ["strided", "negative", "fortran", "readonly", "transposed-view"]


def _relayout(a, layout):
    if layout == "transposed-view":
        return np.asfortranarray(a).T.T if a.ndim > 1 else a.copy()
    return K.in_layout(a, layout)


CALLS = {
    "batch": lambda x, be, ax, p: nk.batch_norm(x, p[2], p[3], p[0], p[1], True, axis=ax,
                                                backend=be),
    "batch_eval": lambda x, be, ax, p: nk.batch_norm(x, p[2], p[3], p[0], p[1], False,
                                                     axis=ax, backend=be),
    "instance": lambda x, be, ax, p: nk.instance_norm(x, None, None, p[0], p[1], axis=ax,
                                                      backend=be),
    "group": lambda x, be, ax, p: nk.group_norm(x, 3, p[0], p[1], axis=ax, backend=be),
    "layer": lambda x, be, ax, p: nk.layer_norm(x, x.shape[-1], backend=be),
    "rms": lambda x, be, ax, p: nk.rms_norm(x, x.shape[-1], backend=be),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", [3, 4, 5])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_any_layout_gives_the_contiguous_bits(backend, dtype, norm, axis, ndim, layout):
    rng = np.random.default_rng(12)
    first = SHAPES[ndim]
    shape = first if axis == 1 else (first[0],) + first[2:] + (C,)   # channels-last
    x = K.make(shape, dtype, seed=13)
    p = [np.asarray(a, np.float32) for a in _params(rng, C, "float32", norm)]
    want = CALLS[norm](x, backend, axis, [a.copy() for a in p])
    xv = _relayout(x, layout)
    before = xv.copy()
    got = CALLS[norm](xv, backend, axis, [a.copy() for a in p])
    assert got.dtype == x.dtype and got.shape == x.shape
    K.assert_same(got, want)
    K.assert_same(xv, before)


# ====================================================================== dtypes and edges
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_running_statistics_stay_in_their_dtype(backend, dtype):
    """Training updates running statistics in place, in their own dtype (float32 or
    16-bit), as torch; normalization uses the batch statistics either way."""
    x = K.make((8, C, 9), dtype, seed=14)
    ys = []
    for pdt in ("float32", dtype, "float64"):
        rm = np.zeros(C, K.np_dtype(pdt))
        rv = np.ones(C, K.np_dtype(pdt))
        ys.append(nk.batch_norm(x, rm, rv, training=True, momentum=0.5, backend=backend))
        assert rm.dtype == K.np_dtype(pdt) and rv.dtype == K.np_dtype(pdt)
        x64 = x.astype(np.float64)
        want_m = 0.5 * x64.mean(axis=(0, 2))
        want_v = 0.5 + 0.5 * x64.var(axis=(0, 2), ddof=1)
        # batch statistics within K.bound_mean / K.bound_m2 of 16-bit data (float32
        # partial sums merged in double), times the momentum; rounded once to the
        # statistic's dtype (u)
        u = K.unit_roundoff(pdt)
        rows = x64.transpose(1, 0, 2).reshape(C, -1)
        d_m = 0.5 * K.bound_mean(rows, 1, dtype)
        d_v = 0.5 * K.bound_m2(rows, 1, dtype) / (rows.shape[1] - 1)
        np.testing.assert_allclose(rm.astype(np.float64), want_m, rtol=0,
                                   atol=u * np.abs(want_m).max() + d_m.max())
        np.testing.assert_allclose(rv.astype(np.float64), want_v, rtol=u,
                                   atol=d_v.max() * (1 + u))
    for y in ys[1:]:
        K.assert_same(y, ys[0])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("backend", "dtype"),     # no kernel runs: no pending marks
                         [(b, d) for b in K.BACKENDS for d in K.HALF_DTYPES])
def test_empty_input(backend, dtype, norm):
    """An empty 16-bit batch: an empty output of x's dtype, NaN float32 statistics,
    running statistics untouched (as torch)."""
    x = np.empty((0, C, 4), K.np_dtype(dtype))
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    p = [np.ones(C, np.float32), np.zeros(C, np.float32), rm, rv]
    y = CALLS[norm](x, backend, 1, p)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    _, mean, rstd = nk.group_norm(x, 3, return_stats=True, backend=backend)
    assert rstd.dtype == np.float32 and mean.shape == (0, 3)


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_rms_norm_default_eps_is_torchs(backend, dtype):
    """eps=None is float32's epsilon for 16-bit data (torch 2.13 uses its opmath
    type's), not the 16-bit dtype's: visible on small values."""
    x = np.full((2, 8), 1e-3).astype(K.np_dtype(dtype))
    got = nk.rms_norm(x, 8, backend=backend)
    K.assert_same(got, nk.rms_norm(x, 8, eps=float(np.finfo(np.float32).eps),
                                   backend=backend))
    want = TF.rms_norm(_t(x.astype(np.float64), dtype), (8,))
    np.testing.assert_array_equal(got.astype(np.float64), _np(want))


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_eps_rules_as_for_float32(backend, dtype):
    x = K.make((4, C, 5), dtype, seed=15)
    with pytest.raises(ValueError, match="eps"):
        nk.batch_norm(x, None, None, training=True, eps=0.0, backend=backend)
    y = nk.group_norm(K.make((2, C, 5), dtype, "constant"), 3, eps=-1.0, backend=backend)
    assert np.isnan(y.astype(np.float64)).all()       # var + eps < 0: NaN, as torch


# ====================================================================== memory
# large enough that a float32 copy (2 * x.nbytes) would dwarf the per-channel arrays
MEM_SHAPE = (8, 64, 48, 48)
MEM_GRID = K.backend_dtype_params([b for b in K.BACKENDS if b != "numpy"], K.HALF_DTYPES)


def _peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


MEM_CALLS = {
    "batch": lambda x, o, be: nk.batch_norm(x, None, None, training=True, out=o, backend=be),
    "batch_eval_last": lambda x, o, be: nk.batch_norm(
        x, np.zeros(x.shape[-1], np.float32), np.ones(x.shape[-1], np.float32), out=o,
        axis=-1, backend=be),
    "group": lambda x, o, be: nk.group_norm(x, 8, out=o, backend=be),
    "group_last": lambda x, o, be: nk.group_norm(x, 8, axis=-1, out=o, backend=be),
    "instance": lambda x, o, be: nk.instance_norm(x, out=o, backend=be),
    "layer": lambda x, o, be: nk.layer_norm(x, x.shape[-1], out=o, backend=be),
    "rms": lambda x, o, be: nk.rms_norm(x, x.shape[-1], out=o, backend=be),
}


@pytest.mark.parametrize("norm", list(MEM_CALLS))
@pytest.mark.parametrize(("backend", "dtype"), MEM_GRID)
def test_no_float32_copy_of_x(backend, dtype, norm):
    """Forward into ``out=``: traced peak under x.nbytes / 4 (a float32 copy of x is
    2 * x.nbytes; what remains are the per-channel/per-row arrays). Backward: dx
    itself (x.nbytes) plus under x.nbytes / 4. (numpy, the oracle, is excluded: it
    computes in float64 by design.)"""
    x = K.make(MEM_SHAPE, dtype, seed=16)
    out = np.empty_like(x)
    MEM_CALLS[norm](x, out, backend)                  # warm up (compilation, caches)
    peak = _peak(lambda: MEM_CALLS[norm](x, out, backend))
    assert peak < x.nbytes / 4, (peak, x.nbytes)
    if norm == "layer":
        k = x.shape[-1]
        _, mean, rstd = nk.layer_norm(x, k, return_stats=True, backend=backend)
        backward = lambda: nk.layer_norm_backward(x, x, k, mean, rstd, backend=backend)  # noqa: E731
    elif norm == "batch":
        _, mean, rstd = nk.batch_norm(x, None, None, training=True, return_stats=True,
                                      backend=backend)
        backward = lambda: nk.batch_norm_backward(x, x, mean, rstd, backend=backend)  # noqa: E731
    else:
        return
    backward()                       # warm up: a first call may compile (numba) and cache
    peak = _peak(backward)
    assert peak < x.nbytes * 1.25, (peak, x.nbytes)


# ====================================================================== the oracle
@pytest.mark.parametrize("dtype", K.HALF_DTYPES)
def test_oracle_rounds_once_to_nearest_even(dtype):
    """numpy_ref.narrow(float64) is the correctly rounded 16-bit value: ties to even,
    values next to every midpoint, overflow at max + half an ulp, subnormals, NaN.
    (ml_dtypes' own float64 -> bfloat16 cast rounds through float32: wrong on
    1 + 2**-8 + 2**-40.)"""
    dt = K.np_dtype(dtype)
    bits = np.arange(0, 0x7C00 if dtype == "float16" else 0x7F80, dtype=np.uint16)
    grid = bits.view(dt).astype(np.float64)               # every finite value >= 0
    mid = (grid[:-1] + grid[1:]) / 2
    ulp_top = grid[-1] - grid[-2]
    x = np.concatenate([grid, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf),
                        [grid[-1] + ulp_top / 2, np.nextafter(grid[-1] + ulp_top / 2, 0),
                         np.inf]])
    x = np.concatenate([x, -x])
    got = numpy_ref.narrow(x, dt).astype(np.float64)
    ax = np.abs(x)
    i = np.clip(np.searchsorted(grid, ax), 1, len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    with np.errstate(invalid="ignore"):
        nearest = np.where(ax - lo < hi - ax, lo, np.where(hi - ax < ax - lo, hi,
                                                           np.where((i - 1) % 2 == 0, lo, hi)))
    nearest = np.where(ax == hi, hi, nearest)
    nearest = np.where(ax >= grid[-1] + ulp_top / 2, np.inf,
                       np.where(ax > grid[-1], grid[-1], nearest))
    np.testing.assert_array_equal(got, np.copysign(nearest, x))
    if dtype == "bfloat16":
        # narrow takes a shortcut for arrays whose float32 rounding hits no bfloat16
        # midpoint: in pieces of 5, most pieces take it, the rest the round-to-odd path
        pieces = [numpy_ref.narrow(p, dt) for p in np.array_split(x, len(x) // 5)]
        np.testing.assert_array_equal(np.concatenate(pieces).astype(np.float64), got)
    assert np.isnan(numpy_ref.narrow(np.array([np.nan]), dt).astype(np.float64)).all()
    if dtype == "bfloat16":
        assert numpy_ref.narrow(np.array([1 + 2**-8 + 2**-40]), dt).astype(float)[0] == \
            1 + 2**-7
