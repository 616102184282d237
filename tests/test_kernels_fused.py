"""The fused kernels of normkit/backends/_spec.py against the NumPy reference.

channels_first_group_forward (GroupNorm/InstanceNorm statistics + normalization in one
pass), channels_first_batch_forward (the same for training BatchNorm, per channel over
N planes) and channels_{first,last}_affine_act (affine + optional residual + optional ReLU
in one pass), for every available backend: odd shapes, float32/float64, read-only
inputs, in-place output (out is x, residual is out), N' = 1 and N' = N parameters,
NaN/Inf propagation, and hard data (mean 1e4, std 1 in float32) where the fused
kernel must be no less accurate than the two-kernel path it replaces. The data dtypes
include float16 and bfloat16 (parameters in float32); the 16-bit rows of a backend in
``_cases.PENDING_16BIT`` are strict xfail(TypeError).
"""
import _cases as K
import numpy as np
import pytest

from normkit.backends import numpy_ref as ref
from normkit.backends import resolve

EPS = 1e-5
# (backend, data dtype) rows: float32, float64, float16, bfloat16 on every backend
GRID = K.backend_dtype_params()


def _kernel(backend, name):
    # the registry only lists backends that implement every kernel of the contract
    return getattr(resolve(backend), name)


def _data(shape, dtype, seed, kind="normal"):
    return K.readonly(K.make(shape, dtype, kind, seed=seed))


def _ro(a):
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


# ====================================================================== group forward
# (N, C, S, groups): odd sizes, a single value per block, InstanceNorm (groups == C),
# LayerNorm-like (groups == 1), blocks large enough for the parallel path, and single
# huge blocks (fewer blocks than threads: the block itself is split).
GROUP_CASES = [
    (1, 1, 1, 1), (1, 3, 17, 1), (1, 3, 17, 3), (3, 17, 5, 17), (2, 6, 1023, 3),
    (17, 1, 3, 1), (4, 1023, 3, 1023), (2, 4, 1, 2), (5, 6, 7, 2), (1, 64, 130, 32),
    (3, 32, 4096, 8), (2, 64, 3136, 32), (1, 2, 300000, 1), (1, 3, 150001, 1),
    (2, 3, 70001, 3),
]


def _group_ref(x, groups, w, b):
    out = np.empty(x.shape)
    mean, rstd = ref.channels_first_group_forward(x, groups, w, b, EPS, out)
    return mean, rstd, out


def _group_params(c, dtype, seed):
    """weight, bias in the parameter dtype of data of ``dtype`` (float32 for 16-bit)."""
    rng = np.random.default_rng(seed)
    pdt = K.param_dtype(dtype)
    return _ro(rng.standard_normal(c).astype(pdt)), _ro(rng.standard_normal(c).astype(pdt))


@pytest.mark.parametrize("kind", ["normal", "offset", "constant"])
@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_group_forward(backend, dtype, kind, case):
    dtype = K.np_dtype(dtype)
    fn = _kernel(backend, "channels_first_group_forward")
    n, c, s, g = case
    x = _data((n, c, s), dtype, 20, kind)
    w, b = _group_params(c, dtype, 21)
    out = np.empty_like(x)
    mean, rstd = fn(x, g, w, b, EPS, out)
    rmean, rrstd, rout = _group_ref(x, g, w, b)
    assert mean.dtype == np.float64 and rstd.dtype == np.float64
    assert mean.shape == (n, g) and rstd.shape == (n, g)
    blocks = x.reshape(n * g, -1)
    K.assert_within(mean, rmean, K.bound_mean(blocks, 1).reshape(n, g), "mean")
    K.assert_within(rstd, rrstd, K.bound_rstd(blocks, 1, EPS).reshape(n, g), "rstd")
    per = lambda p: p.reshape(1, g, c // g, 1)
    bound = K.bound_normalized(x.reshape(n, g, c // g, s), (2, 3), EPS, per(w), per(b), dtype)
    K.assert_within(out, rout, bound.reshape(x.shape), "out")
    # in place: out is x
    y = x.copy()
    mean2, rstd2 = fn(y, g, w, b, EPS, y)
    K.assert_same(y, out)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(rstd2, rstd)


@pytest.mark.parametrize("shape", [(4, 6, 50), (4, 64, 3136), (1, 2, 300000)])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_group_forward_nan_inf(backend, dtype, shape):
    dtype = K.np_dtype(dtype)
    fn = _kernel(backend, "channels_first_group_forward")
    n, c, s = shape
    g = 2
    x = np.random.default_rng(22).standard_normal(shape).astype(dtype)
    x[0, 0, s // 2] = np.nan                  # block (0, 0)
    x[-1, c - 1, s - 1] = np.inf              # block (N-1, 1)
    w, b = _group_params(c, dtype, 23)
    out = np.empty_like(x)
    mean, rstd = fn(_ro(x), g, w, b, EPS, out)
    rmean, rrstd, rout = _group_ref(x, g, w, b)
    np.testing.assert_array_equal(np.isnan(mean), np.isnan(rmean))
    np.testing.assert_array_equal(np.isnan(rstd), np.isnan(rrstd))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(rout))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(rout))
    half = c // g
    assert np.isnan(out[0, :half]).all() and np.isnan(mean[0, 0])
    assert not np.isfinite(out[-1, half:]).any() and not np.isfinite(mean[-1, 1])
    if n > 1:
        assert np.isfinite(out[0, half:]).all() and np.isfinite(out[-1, :half]).all()


@pytest.mark.parametrize("shape, g", [((4, 8, 5000), 2), ((8, 64, 784), 64),
                                      ((1, 2, 300000), 1)])
@pytest.mark.parametrize("backend", K.BACKENDS)
def test_group_forward_hard_data_no_worse_than_unfused(backend, shape, g):
    """float32, mean 1e4, std 1: the fused kernel against the exact result, compared
    with the two-kernel path it replaces (plane_moments, then channels_first_affine
    with the mean split into a float32 shift and a float64 residual folded into the
    offset, as normkit.functional does)."""
    be = resolve(backend)
    fn = _kernel(backend, "channels_first_group_forward")
    n, c, s = shape
    x = _data(shape, np.float32, 24, "offset")
    w, b = _group_params(c, np.float32, 25)
    _, _, exact = _group_ref(x, g, w, b)
    out = np.empty_like(x)
    fn(x, g, w, b, EPS, out)
    fused_err = np.abs(out - exact).max()

    mean, m2 = be.plane_moments(x.reshape(n * g, -1))
    rstd = 1.0 / np.sqrt(m2 / ((c // g) * s) + EPS)
    mean_c = np.repeat(mean.reshape(n, g), c // g, axis=1)
    scale = np.repeat(rstd.reshape(n, g), c // g, axis=1) * w
    shift = mean_c.astype(np.float32)
    offset = b - (mean_c - shift) * scale
    two = np.empty_like(x)
    be.channels_first_affine(x, shift, scale.astype(np.float32), offset.astype(np.float32), two)
    unfused_err = np.abs(two - exact).max()
    # both are within float32 roundings of the exact result: the fused one may differ
    # from the unfused one by the 8 u_32 of its own last operations, no more
    assert fused_err <= unfused_err + K.bound_elementwise(np.float32, np.abs(exact).max()), \
        (fused_err, unfused_err)
    per = lambda p: p.reshape(1, g, c // g, 1)
    bound = K.bound_normalized(x.reshape(n, g, c // g, s), (2, 3), EPS, per(w), per(b),
                               np.float32)
    K.assert_within(out, exact, bound.reshape(x.shape), "fused output vs float64")


# ====================================================================== batch forward
# (N, C, S): odd sizes, one value per channel, one plane per channel (N = 1), a single
# channel, more channels than threads, ResNet planes, and channels past L2 whose 16-bit
# output is large enough to be streamed past the cache when it exceeds the L3
BATCH_CASES = [(1, 1, 1), (3, 1, 17), (1, 3, 17), (17, 5, 3), (2, 17, 1023), (8, 64, 3136),
               (5, 16, 256), (2, 3, 150001), (33, 2, 4)]


def _batch_ref(x, w, b):
    out = np.empty(x.shape)
    mean, m2 = ref.channels_first_batch_forward(x, w, b, EPS, out)
    return mean, m2, out


@pytest.mark.parametrize("kind", ["normal", "offset", "constant"])
@pytest.mark.parametrize("case", BATCH_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_batch_forward(backend, dtype, kind, case):
    dtype = K.np_dtype(dtype)
    fn = _kernel(backend, "channels_first_batch_forward")
    n, c, s = case
    x = _data(case, dtype, 30, kind)
    w, b = _group_params(c, dtype, 31)
    out = np.empty_like(x)
    mean, m2 = fn(x, w, b, EPS, out)
    rmean, rm2, rout = _batch_ref(x, w, b)
    assert mean.dtype == np.float64 and m2.dtype == np.float64
    assert mean.shape == (c,) and m2.shape == (c,)
    channels = np.moveaxis(x, 1, 0).reshape(c, n * s)
    K.assert_within(mean, rmean, K.bound_mean(channels, 1), "mean")
    K.assert_within(m2, rm2, K.bound_m2(channels, 1), "m2")
    per = lambda p: p.reshape(1, c, 1)
    K.assert_within(out, rout, K.bound_normalized(x, (0, 2), EPS, per(w), per(b), dtype),
                    "out")
    # in place: out is x
    y = x.copy()
    mean2, m22 = fn(y, w, b, EPS, y)
    K.assert_same(y, out)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(m22, m2)


@pytest.mark.parametrize("shape", [(4, 6, 50), (4, 64, 3136)])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_batch_forward_nan_inf(backend, dtype, shape):
    dtype = K.np_dtype(dtype)
    fn = _kernel(backend, "channels_first_batch_forward")
    n, c, s = shape
    x = np.random.default_rng(32).standard_normal(shape).astype(dtype)
    x[0, 0, s // 2] = np.nan                  # channel 0
    x[-1, c - 1, s - 1] = np.inf              # channel C-1
    w, b = _group_params(c, dtype, 33)
    out = np.empty_like(x)
    mean, m2 = fn(_ro(x), w, b, EPS, out)
    rmean, rm2, rout = _batch_ref(x, w, b)
    np.testing.assert_array_equal(np.isnan(mean), np.isnan(rmean))
    np.testing.assert_array_equal(np.isnan(m2), np.isnan(rm2))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(rout))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(rout))
    assert np.isnan(out[:, 0]).all() and np.isnan(mean[0])
    assert not np.isfinite(out[:, -1]).any() and not np.isfinite(mean[-1])
    assert np.isfinite(out[:, 1:-1]).all() and np.isfinite(m2[1:-1]).all()


@pytest.mark.parametrize("shape", [(4, 16, 5000), (8, 64, 784), (1, 2, 300000)])
@pytest.mark.parametrize("backend", K.BACKENDS)
def test_batch_forward_hard_data_no_worse_than_unfused(backend, shape):
    """float32, mean 1e4, std 1: the fused kernel against the exact result, compared
    with the two-kernel path it replaces (plane_moments merged over N, then
    channels_first_affine with the mean split into a float32 shift and a float64
    residual folded into the offset)."""
    be = resolve(backend)
    fn = _kernel(backend, "channels_first_batch_forward")
    n, c, s = shape
    x = _data(shape, np.float32, 34, "offset")
    w, b = _group_params(c, np.float32, 35)
    _, _, exact = _batch_ref(x, w, b)
    out = np.empty_like(x)
    fn(x, w, b, EPS, out)
    fused_err = np.abs(out - exact).max()

    pm, pq = be.plane_moments(x.reshape(n * c, s))
    pm, pq = pm.reshape(n, c), pq.reshape(n, c)
    mean = pm.mean(axis=0)
    m2 = pq.sum(axis=0) + s * ((pm - mean) ** 2).sum(axis=0)
    scale = w / np.sqrt(m2 / (n * s) + EPS)
    shift = mean.astype(np.float32)
    offset = b - (mean - shift) * scale
    two = np.empty_like(x)
    be.channels_first_affine(x, shift[None], scale.astype(np.float32)[None],
                             offset.astype(np.float32)[None], two)
    unfused_err = np.abs(two - exact).max()
    assert fused_err <= unfused_err + K.bound_elementwise(np.float32, np.abs(exact).max()), \
        (fused_err, unfused_err)
    per = lambda p: p.reshape(1, c, 1)
    K.assert_within(out, exact, K.bound_normalized(x, (0, 2), EPS, per(w), per(b),
                                                   np.float32), "fused output vs float64")


# ====================================================================== affine + act
# values are checked over the whole case table by test_kernels.py; here the aliasing
# semantics (out is x, the residual is out) on a few shapes, one with a parallel split
ALIAS_SHAPES = [(1, 1, 1), (3, 17, 5), (2, 5, 1023), (2, 7, 40000)]


def _layout(shape, last):
    n, c, s = shape
    return (n, s, c) if last else (n, c, s)


def _act_setup(shape, last, per_sample, dtype, seed):
    kshape = _layout(shape, last)
    x = _data(kshape, dtype, seed, "offset")
    rng = np.random.default_rng(seed + 1)
    np_ = shape[0] if per_sample else 1
    pdt = K.param_dtype(dtype)
    shift = _ro(rng.standard_normal((np_, shape[1])) + K.offset_center(dtype)).astype(pdt)
    scale, offset = (_ro(rng.standard_normal((np_, shape[1])).astype(pdt)) for _ in range(2))
    residual = _data(kshape, dtype, seed + 2)
    return kshape, x, (shift, scale, offset), residual


@pytest.mark.parametrize("relu", [False, True], ids=["id", "relu"])
@pytest.mark.parametrize("with_res", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("last", [False, True], ids=["first", "last"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["N'=1", "N'=N"])
@pytest.mark.parametrize("shape", ALIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_affine_act(backend, dtype, relu, with_res, last, per_sample, shape):
    dtype = K.np_dtype(dtype)
    be = resolve(backend)
    name = "channels_last_affine_act" if last else "channels_first_affine_act"
    fn = _kernel(backend, name)
    kshape, x, params, residual = _act_setup(shape, last, per_sample, dtype, 30)
    res = residual if with_res else None
    out = np.empty_like(x)
    fn(x, *params, res, relu, out)
    rout = np.empty(kshape)
    getattr(ref, name)(x, *params, res, relu, rout)
    put = (lambda p: p.astype(np.float64)[:, None, :]) if last else \
        (lambda p: p.astype(np.float64)[:, :, None])
    affine = (x.astype(np.float64) - put(params[0])) * put(params[1])
    K.assert_within(out, rout, K.bound_elementwise(dtype, affine, put(params[2]),
                                                   0.0 if res is None else res), "out")
    if relu:
        assert (out >= 0).all()
    if not with_res and not relu:     # the plain affine is the same computation
        plain = np.empty_like(x)
        getattr(be, name.replace("_act", ""))(x, *params, plain)
        K.assert_same(out, plain)
    # in place: out is x
    y = x.copy()
    fn(y, *params, res, relu, y)
    K.assert_same(y, out)
    if with_res:
        # the residual is out itself (in-place residual add)
        o = residual.copy()
        fn(x, *params, o, relu, o)
        K.assert_same(o, out)
        # out is x and the residual is out too: relu(affine(x) + x)
        want = np.empty_like(x)
        fn(x, *params, x, relu, want)
        y = x.copy()
        fn(y, *params, y, relu, y)
        K.assert_same(y, want)
        rwant = np.empty(kshape)
        getattr(ref, name)(x, *params, x, relu, rwant)
        K.assert_within(want, rwant, K.bound_elementwise(dtype, affine, put(params[2]), x),
                        "relu(affine(x) + x)")


@pytest.mark.parametrize("last", [False, True], ids=["first", "last"])
@pytest.mark.parametrize("shape", [(2, 3, 50), (4, 8, 40000)])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_affine_act_nan_inf(backend, dtype, last, shape):
    """ReLU keeps NaN (as torch.relu), maps -Inf to 0; NaN/Inf in x or in the residual
    propagate exactly like the reference."""
    dtype = K.np_dtype(dtype)
    name = "channels_last_affine_act" if last else "channels_first_affine_act"
    fn = _kernel(backend, name)
    kshape = _layout(shape, last)
    rng = np.random.default_rng(40)
    x = rng.standard_normal(kshape).astype(dtype)
    r = rng.standard_normal(kshape).astype(dtype)
    x.reshape(-1)[[3, 10, 17]] = [np.nan, np.inf, -np.inf]
    r.reshape(-1)[[5, 10, 20]] = [np.nan, -np.inf, np.inf]
    pdt = K.param_dtype(dtype)
    p = [np.ones((1, shape[1]), pdt), np.full((1, shape[1]), 2, pdt),
         np.zeros((1, shape[1]), pdt)]
    for res in (None, r):
        for relu in (False, True):
            out = np.empty_like(x)
            fn(_ro(x), *p, None if res is None else _ro(res), relu, out)
            rout = np.empty(kshape)
            getattr(ref, name)(x, *p, res, relu, rout)
            np.testing.assert_array_equal(np.isnan(out), np.isnan(rout))
            # |x - 1| * 2 + 0 (+ r): NaN/Inf exactly as the reference, the rest within
            # the rounding of those operations
            terms = [2 * np.abs(x.astype(np.float64) - 1)] + ([] if res is None else [res])
            with np.errstate(invalid="ignore"):
                K.assert_within(out, rout, K.bound_elementwise(dtype, *terms), "out")
            flat = out.reshape(-1)
            assert np.isnan(flat[3])
            if relu:
                assert flat[17] == 0 and (res is None or flat[20] == np.inf)
