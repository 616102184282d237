"""The per-call fast paths (``normkit.functional`` / ``_engine.fast_*``) against the
general path, bit for bit, and bad input through them.

The fast paths take the common inference call (contiguous native input, parameters
of the parameter dtype or of x's 16-bit dtype, no ``out=``) and reuse the derived
per-channel arrays (BatchNorm eval's folded coefficients, widened float16 row
parameters) while the parameter arrays hold the same bytes. Passing ``out=`` sends
the same call through the general path, so the two are compared on equal terms.
"""
import ml_dtypes
import numpy as np
import pytest

import normkit as nk
from normkit import _engine

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
IDS = ["f32", "f64", "f16", "bf16"]


def _bits(a):
    """The exact bits of an array (NaN payloads and signed zeros included)."""
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _same(fast, general):
    if isinstance(fast, tuple):
        for f, g in zip(fast, general, strict=True):
            _same(f, g)
        return
    if fast is None:
        assert general is None
        return
    assert fast.dtype == general.dtype and fast.shape == general.shape
    np.testing.assert_array_equal(_bits(fast), _bits(general))


def _param_dtype(dt):
    return np.float64 if np.dtype(dt) == np.float64 else np.float32


def _bn_args(rng, dt, pdt, c=16, shape=(2, 16, 3, 3)):
    x = rng.standard_normal(shape).astype(dt)
    rm = (0.3 * rng.standard_normal(c)).astype(pdt)
    rv = (0.5 + rng.random(c)).astype(pdt)
    w = (1.0 + 0.1 * rng.standard_normal(c)).astype(pdt)
    b = (0.1 * rng.standard_normal(c)).astype(pdt)
    return x, rm, rv, w, b


def _bn_both(backend, x, rm, rv, w, b, axis=1, **kw):
    fast = nk.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, axis=axis, backend=backend, **kw)
    general = nk.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, axis=axis, backend=backend,
                            out=np.empty_like(x), **kw)
    return fast, general


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
@pytest.mark.parametrize("params", ["param_dtype", "data_dtype"])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("return_stats", [False, True])
def test_batch_norm_eval_fast_equals_general(backend, rng, dt, params, axis, return_stats):
    pdt = _param_dtype(dt) if params == "param_dtype" else dt
    shape = (2, 16, 3, 3) if axis == 1 else (2, 3, 3, 16)
    x, rm, rv, w, b = _bn_args(rng, dt, pdt, shape=shape)
    for weight, bias in ((w, b), (None, b), (w, None), (None, None)):
        for _ in range(2):          # the second call reuses the folded coefficients
            _same(*_bn_both(backend, x, rm, rv, weight, bias, axis=axis,
                            return_stats=return_stats))


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
@pytest.mark.parametrize("params", ["param_dtype", "data_dtype"])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("return_stats", [False, True])
def test_batch_norm_training_fast_equals_general(backend, rng, dt, params, axis,
                                                 return_stats):
    """Training mode: the output, the returned statistics and both running statistics
    (updated in place, in their own dtype) bit for bit, with and without each of them;
    NaN in one channel stays in that channel in both."""
    pdt = _param_dtype(dt) if params == "param_dtype" else dt
    shape = (2, 16, 3, 3) if axis == 1 else (2, 3, 3, 16)
    x, rm, rv, w, b = _bn_args(rng, dt, pdt, shape=shape)
    x[(0, 3) if axis == 1 else (0, 0, 0, 3)] = np.nan
    for weight, bias, keep in ((w, b, (True, True)), (None, b, (True, False)),
                               (w, None, (False, True)), (None, None, (False, False))):
        run = [rm.copy() if keep[0] else None, rv.copy() if keep[1] else None]
        run_g = [None if a is None else a.copy() for a in run]
        for _ in range(2):
            fast = nk.batch_norm(x, *run, weight, bias, True, 0.1, 1e-5, axis=axis,
                                 backend=backend, return_stats=return_stats)
            general = nk.batch_norm(x, *run_g, weight, bias, True, 0.1, 1e-5, axis=axis,
                                    backend=backend, return_stats=return_stats,
                                    out=np.empty_like(x))
            _same(fast, general)
            _same(tuple(run), tuple(run_g))


def test_training_fast_path_leaves_bad_input_to_the_general_path(backend, rng):
    """Arguments the training fast path does not take reach the general path's checks."""
    x, rm, rv, w, b = _fast_ok(rng)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        nk.batch_norm(x, rm, rv, w, b, True, 0.1, 0.0, backend=backend)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nk.batch_norm(x[:1, :, :1, :1], rm, rv, w, b, True, backend=backend)
    ro = rm.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="running_mean is read-only"):
        nk.batch_norm(x, ro, rv, w, b, True, backend=backend)
    with pytest.raises(ValueError, match=r"running_var: expected shape \(16,\)"):
        nk.batch_norm(x, rm, rv[:8], w, b, True, backend=backend)
    # momentum as an int and a running statistic of another float dtype: general path
    r64, r16 = rm.astype(np.float64), rv.astype(np.float16)
    y = nk.batch_norm(x, r64, r16, w, b, True, 1, backend=backend)
    assert np.isfinite(y).all() and r16.dtype == np.float16


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
@pytest.mark.parametrize("params", ["param_dtype", "data_dtype"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("return_stats", [False, True])
@pytest.mark.parametrize("k", [96, 4096])     # 4096: 16-bit parameters widened once
def test_rows_fast_equals_general(backend, rng, dt, params, rms, return_stats, k):
    pdt = _param_dtype(dt) if params == "param_dtype" else dt
    x = rng.standard_normal((3, 2, k)).astype(dt)
    w = (1.0 + 0.1 * rng.standard_normal(k)).astype(pdt)
    b = (0.1 * rng.standard_normal(k)).astype(pdt)

    def call(weight, bias, **kw):
        if rms:
            return nk.rms_norm(x, k, weight, None, backend=backend,
                               return_stats=return_stats, **kw)
        return nk.layer_norm(x, (k,), weight, bias, 1e-5, backend=backend,
                             return_stats=return_stats, **kw)

    for weight, bias in ((w, b), (None, b), (w, None), (None, None)):
        for _ in range(2):          # the second call reuses widened float16 parameters
            _same(call(weight, bias), call(weight, bias, out=np.empty_like(x)))


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
@pytest.mark.parametrize("params", ["param_dtype", "data_dtype"])
@pytest.mark.parametrize("norm", ["group_norm", "instance_norm"])
@pytest.mark.parametrize("return_stats", [False, True])
def test_per_sample_fast_equals_general(backend, rng, dt, params, norm, return_stats):
    pdt = _param_dtype(dt) if params == "param_dtype" else dt
    for c in (8, 4096):         # 4096: 16-bit parameters widened once
        _per_sample_both(backend, rng, dt, pdt, norm, return_stats, c)


def _per_sample_both(backend, rng, dt, pdt, norm, return_stats, c):
    w = (1.0 + 0.1 * rng.standard_normal(c)).astype(pdt)
    b = (0.1 * rng.standard_normal(c)).astype(pdt)

    def call(x, weight, bias, **kw):
        if norm == "group_norm":
            return nk.group_norm(x, 4, weight, bias, 1e-5, backend=backend,
                                 return_stats=return_stats, **kw)
        return nk.instance_norm(x, None, None, weight, bias, backend=backend,
                                return_stats=return_stats, **kw)

    for shape in ((2, c, 3, 3), (3, c, 2), (2, c)):
        if norm == "instance_norm" and len(shape) == 2:
            continue            # one value per instance: an error (below)
        x = rng.standard_normal(shape).astype(dt)
        for weight, bias in ((w, b), (None, b), (w, None), (None, None)):
            for _ in range(2):
                _same(call(x, weight, bias), call(x, weight, bias, out=np.empty_like(x)))


def test_bad_per_sample_input_through_the_fast_path(backend, rng):
    x = rng.standard_normal((2, 8, 3)).astype(np.float32)
    w = np.ones(8, np.float32)
    nk.group_norm(x, 4, w, w, backend=backend)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        nk.group_norm(x, 3, w, w, backend=backend)
    with pytest.raises(TypeError, match="num_groups: expected an int"):
        nk.group_norm(x, 4.0, w, w, backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\)"):
        nk.group_norm(x, 4, w[:4], w, backend=backend)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        nk.instance_norm(x[:, :, :1], None, None, w, w, backend=backend)
    with pytest.raises(ValueError, match="momentum=None"):
        nk.instance_norm(x, None, None, w, w, True, None, backend=backend)
    with pytest.raises(ValueError, match="the channel axis cannot be the batch axis"):
        nk.group_norm(x, 1, None, None, axis=0, backend=backend)


@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
def test_parameters_updated_in_place_are_seen(backend, rng, dt):
    """A reused result is keyed on the parameters' bytes: writes between calls count."""
    x, rm, rv, w, b = _bn_args(rng, dt, dt)
    first = nk.batch_norm(x, rm, rv, w, b, backend=backend)
    for p in (rm, rv, w, b):
        p[3] = p[3] * 2 + 1
        _same(*_bn_both(backend, x, rm, rv, w, b))
    assert not np.array_equal(_bits(first), _bits(nk.batch_norm(x, rm, rv, w, b,
                                                                backend=backend)))
    k = 4096        # long enough for 16-bit weights to be widened once and reused
    x = rng.standard_normal((2, k)).astype(dt)
    lw = (1.0 + rng.random(k)).astype(dt)
    before = nk.layer_norm(x, k, lw, None, backend=backend)
    lw[0] = 5
    after = nk.layer_norm(x, k, lw, None, backend=backend)
    _same(after, nk.layer_norm(x, k, lw, None, backend=backend, out=np.empty_like(x)))
    assert not np.array_equal(_bits(before), _bits(after))


def test_a_new_array_at_a_reused_address_is_not_confused(backend, rng):
    """Arrays are remembered by id *and* contents: a new array with the old one's id
    (freed and reallocated) but other values is computed afresh."""
    x = rng.standard_normal((1, 16, 2, 2)).astype(np.float16)
    for i in range(20):
        rm, rv, w, b = (np.full(16, v, np.float16) for v in (0.1 * i, 1.0 + i, 1.5, -i))
        _same(*_bn_both(backend, x, rm, rv, w, b))
        del rm, rv, w, b


def test_user_arrays_stay_writable_and_returned_stats_are_copies(backend, rng):
    x, rm, rv, w, b = _bn_args(rng, np.float16, np.float16)
    _, mean, rstd = nk.batch_norm(x, rm, rv, w, b, backend=backend, return_stats=True)
    assert all(p.flags.writeable for p in (rm, rv, w, b))
    assert mean.flags.writeable and rstd.flags.writeable
    mean[...] = 7.0
    rstd[...] = 7.0
    _, mean2, rstd2 = nk.batch_norm(x, rm, rv, w, b, backend=backend, return_stats=True)
    np.testing.assert_array_equal(mean2, rm.astype(np.float32))
    assert not np.any(rstd2 == 7.0)
    lw = rng.random(x.shape[-1]).astype(np.float16)
    nk.layer_norm(x, x.shape[-1], lw, lw, backend=backend)
    assert lw.flags.writeable


def test_negative_running_var_leaves_the_fast_path_quietly(backend, rng):
    x, rm, rv, w, b = _bn_args(rng, np.float16, np.float32)
    rv[2] = -1.0
    with np.errstate(all="raise"):      # the general path's NaN raises no warning
        fast, general = _bn_both(backend, x, rm, rv, w, b)
    _same(fast, general)
    assert np.isnan(fast[:, 2].astype(np.float32)).all()


def test_memory_of_derived_arrays_is_bounded(backend, rng, monkeypatch):
    monkeypatch.setattr(_engine, "_DERIVED_ENTRIES", 16)
    x = rng.standard_normal((1, 8, 2, 2)).astype(np.float32)
    for _ in range(3 * _engine._DERIVED_ENTRIES):
        p = rng.random(8).astype(np.float32) + 0.5
        nk.batch_norm(x, p, p, p, p, backend=backend)
    assert len(_engine._derived) <= _engine._DERIVED_ENTRIES
    # and by bytes: 4 KiB parameters, a budget of ~10 entries
    monkeypatch.setattr(_engine, "_DERIVED_BUDGET", 10 * 6 * 4096)
    x = rng.standard_normal((1, 1024, 1, 1)).astype(np.float32)
    for _ in range(40):
        p = rng.random(1024).astype(np.float32) + 0.5
        nk.batch_norm(x, p, p, p, p, backend=backend)
    held = sum(e[2] for e in _engine._derived.values())
    assert held == _engine._derived_size[0] <= _engine._DERIVED_BUDGET
    assert len(_engine._derived) >= 5


def test_derived_arrays_of_a_network_stay_cached(backend, rng):
    """Layers called in turn (a network of 53 BatchNorms) all stay cached: the second
    pass over them computes no folded coefficients again."""
    x = rng.standard_normal((1, 8, 2, 2)).astype(np.float32)
    params = [rng.random(8).astype(np.float32) + 0.5 for _ in range(53)]
    for p in params:
        nk.batch_norm(x, p, p, p, p, backend=backend)
    calls = []
    real = _engine._bn_eval_coefs

    def counted(*a):
        calls.append(1)
        return real(*a)
    _engine._bn_eval_coefs = counted
    try:
        for p in params:
            nk.batch_norm(x, p, p, p, p, backend=backend)
    finally:
        _engine._bn_eval_coefs = real
    assert not calls


# ---------------------------------------------------------------- bad input
def _fast_ok(rng, dt=np.float32):
    return _bn_args(rng, dt, _param_dtype(dt))


@pytest.mark.parametrize("case, exc, match", [
    ("running_var shape", ValueError, r"running_var: expected shape \(16,\)"),
    ("weight int", TypeError, r"weight must be a float array, got dtype int64"),
    ("eps str", TypeError, r"eps: expected a real number"),
    ("eps negative", ValueError, r"eps: expected a number >= 0"),
    ("running_mean list", None, None),
    ("axis 2", ValueError, r"expected shape \(3,\)"),
    ("x int", TypeError, r"x must be a float16, bfloat16, float32 or float64 array"),
    ("eval without running_var", ValueError, r"eval mode .* needs running_mean"),
])
def test_bad_batch_norm_input_through_the_fast_path(backend, rng, case, exc, match):
    x, rm, rv, w, b = _fast_ok(rng)
    eps, axis = 1e-5, 1
    if case == "running_var shape":
        rv = rv[:8]
    elif case == "weight int":
        w = np.ones(16, np.int64)
    elif case == "eps str":
        eps = "1e-5"
    elif case == "eps negative":
        eps = -1e-5
    elif case == "running_mean list":
        rm = list(rm)
    elif case == "axis 2":
        axis = 2
    elif case == "x int":
        x = np.ones(x.shape, np.int64)
    elif case == "eval without running_var":
        rv = None
    for _ in range(2):      # also after the same call's parameters were remembered
        if exc is None:     # a list is not a running statistic (updated in place)
            with pytest.raises(TypeError, match="running_mean must be a NumPy array"):
                nk.batch_norm(x, rm, rv, w, b, False, 0.1, eps, axis=axis, backend=backend)
            continue
        with pytest.raises(exc, match=match):
            nk.batch_norm(x, rm, rv, w, b, False, 0.1, eps, axis=axis, backend=backend)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_bad_rows_input_through_the_fast_path(backend, rng, rms):
    x = rng.standard_normal((2, 8)).astype(np.float16)
    w = np.ones(8, np.float16)
    fn = nk.rms_norm if rms else nk.layer_norm
    fn(x, 8, w, backend=backend)          # remembered
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\), got shape \(4,\)"):
        fn(x, 8, w[:4], backend=backend)
    with pytest.raises(ValueError, match="must be a suffix of the input shape"):
        fn(x, 4, w, backend=backend)
    with pytest.raises(TypeError, match="weight must be a float array"):
        fn(x, 8, np.ones(8, np.int32), backend=backend)
    with pytest.raises(TypeError, match="normalized_shape: expected an int or a tuple"):
        fn(x, 8.0, w, backend=backend)


# ---------------------------------------------------------------- layers
@pytest.mark.parametrize("dt", DTYPES, ids=IDS)
def test_eval_batch_norm_layer_equals_the_general_path(backend, rng, dt):
    layer = nk.BatchNorm(16, dtype=dt, backend=backend)
    layer.running_mean[...] = (0.2 * rng.standard_normal(16)).astype(dt)
    layer.running_var[...] = (0.5 + rng.random(16)).astype(dt)
    layer.weight[...] = (1 + 0.1 * rng.standard_normal(16)).astype(dt)
    layer.eval()
    x = rng.standard_normal((2, 16, 3, 3)).astype(dt)
    dy = rng.standard_normal(x.shape).astype(dt)
    y = layer(x)
    general = nk.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                            layer.bias, False, backend=backend, out=np.empty_like(x),
                            return_stats=True)
    _same(y, general[0])
    gx = layer.backward(dy)
    want = nk.batch_norm_backward(dy, x, general[1], general[2], layer.weight,
                                  training=False, backend=backend)
    _same(gx, want[0])
    with pytest.raises(ValueError, match="expected 16 channels on axis 1"):
        layer(x[:, :8])


@pytest.mark.parametrize("dt", [np.float32, np.float16, ml_dtypes.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("rms", [False, True], ids=["LayerNorm", "RMSNorm"])
def test_row_layers_equal_the_general_path(backend, rng, dt, rms):
    k = 64
    layer = (nk.RMSNorm(k, dtype=dt, backend=backend) if rms
             else nk.LayerNorm(k, dtype=dt, backend=backend))
    layer.weight[...] = (1 + 0.1 * rng.standard_normal(k)).astype(dt)
    x = rng.standard_normal((3, k)).astype(dt)
    dy = rng.standard_normal(x.shape).astype(dt)
    y = layer(x)
    if rms:
        want = nk.rms_norm(x, k, layer.weight, None, backend=backend,
                           out=np.empty_like(x), return_stats=True)
        gwant = nk.rms_norm_backward(dy, x, k, None, want[2], layer.weight,
                                     backend=backend)
    else:
        want = nk.layer_norm(x, k, layer.weight, layer.bias, 1e-5, backend=backend,
                             out=np.empty_like(x), return_stats=True)
        gwant = nk.layer_norm_backward(dy, x, k, want[1], want[2], layer.weight,
                                       backend=backend)
    _same(y, want[0])
    _same(layer.backward(dy), gwant[0])

