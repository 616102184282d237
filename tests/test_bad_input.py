"""The error contract of API.md: clear exceptions, never a crash, never a mutated input."""
import threading

import numpy as np
import pytest

import normkit as nk

import _cases as K
from _cases import BACKENDS

C = 4


def x4(dtype=np.float32):
    return K.make((2, C, 3, 5), dtype, seed=0)


CALLS = {
    "batch_norm": lambda x, **kw: nk.batch_norm(x, None, None, None, None, True, **kw),
    "batch_norm_eval": lambda x, **kw: nk.batch_norm(x, np.zeros(C), np.ones(C), **kw),
    "instance_norm": lambda x, **kw: nk.instance_norm(x, **kw),
    "group_norm": lambda x, **kw: nk.group_norm(x, 2, **kw),
    "layer_norm": lambda x, **kw: nk.layer_norm(x, 5, **kw),
    "rms_norm": lambda x, **kw: nk.rms_norm(x, 5, **kw),
}


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, object,
                                   np.uint8])
def test_wrong_dtype_is_type_error_naming_it(name, dtype):
    x = np.ones((2, C, 3, 5), dtype=dtype)
    with pytest.raises(TypeError, match=np.dtype(dtype).name if dtype is not object
                       else "object"):
        CALLS[name](x)


@pytest.mark.parametrize("name", CALLS)
def test_not_an_array(name):
    with pytest.raises(TypeError):
        CALLS[name]("not an array")


@pytest.mark.parametrize("fn,args", [
    (nk.batch_norm, dict(weight=np.ones(C + 1))),
    (nk.batch_norm, dict(bias=np.ones((C, 1)))),
    (nk.batch_norm, dict(running_mean=np.zeros(3), running_var=np.ones(C))),
    (nk.instance_norm, dict(weight=np.ones(C - 1))),
    (nk.instance_norm, dict(running_mean=np.zeros(C), running_var=np.ones(2 * C))),
])
def test_channel_param_shape_names_expected_and_actual(fn, args):
    with pytest.raises(ValueError, match=r"expected shape \(4,\).*got shape"):
        fn(x4(), training=True, **args) if fn is nk.batch_norm else fn(x4(), **args)


def test_group_norm_shapes():
    with pytest.raises(ValueError, match="divisible by num_groups"):
        nk.group_norm(x4(), 3)
    with pytest.raises(ValueError, match=r"expected shape \(4,\)"):
        nk.group_norm(x4(), 2, weight=np.ones(2))
    with pytest.raises(ValueError, match="batch axis"):
        nk.group_norm(x4(), 2, axis=0)
    with pytest.raises(ValueError):
        nk.group_norm(x4(), 0)


@pytest.mark.parametrize("fn", [nk.layer_norm, nk.rms_norm])
def test_normalized_shape_not_a_suffix(fn):
    with pytest.raises(ValueError, match=r"suffix.*\(\*, 3\).*\(2, 4, 3, 5\)"):
        fn(x4(), (3,))
    with pytest.raises(ValueError, match="suffix"):
        fn(x4(), (1, 2, 4, 3, 5))
    with pytest.raises(ValueError, match=r"expected shape \(5,\)"):
        fn(x4(), 5, np.ones(4))


@pytest.mark.parametrize("fn", [nk.batch_norm, nk.instance_norm, nk.group_norm])
def test_ndim_below_2(fn):
    args = (2,) if fn is nk.group_norm else ()
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*\(5,\)"):
        fn(np.ones(5, np.float32), *args)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        nk.batch_norm(x4(), np.zeros(C), np.ones(C), axis=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_channel_in_training(backend):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when "
                                         r"training, got input size \(1, 4\)"):
        nk.batch_norm(np.ones((1, C), np.float32), training=True, backend=backend)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nk.BatchNorm(C, backend=backend)(np.ones((1, C, 1, 1), np.float32))
    # eval mode with one value is fine, as torch
    nk.batch_norm(np.ones((1, C), np.float32), np.zeros(C), np.ones(C), backend=backend)


def test_instance_norm_needs_spatial_values():
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        nk.instance_norm(np.ones((3, C), np.float32))


def test_eval_without_running_stats():
    with pytest.raises(ValueError, match="running_mean and running_var"):
        nk.batch_norm(x4(), None, None, training=False)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        nk.instance_norm(x4(), use_input_stats=False)


def test_out_checks():
    x = x4()
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 4, 3, 5\)"):
        nk.layer_norm(x, 5, out=np.empty((2, 4, 3, 6), np.float32))
    with pytest.raises(ValueError, match="out: expected dtype float32"):
        nk.layer_norm(x, 5, out=np.empty(x.shape, np.float64))
    big = np.zeros((2, 4, 3, 6), np.float32)
    big[..., :5] = x
    with pytest.raises(ValueError, match="partially overlaps"):
        nk.layer_norm(big[..., :5], 5, out=big[..., 1:])
    ro = np.empty_like(x)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        nk.layer_norm(x, 5, out=ro)
    with pytest.raises(TypeError):
        nk.layer_norm(x, 5, out=[1, 2])


def test_read_only_running_stats_in_training():
    rm = np.zeros(C, np.float32)
    rm.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        nk.batch_norm(x4(), rm, np.ones(C, np.float32), training=True)


def test_unknown_backend_lists_names():
    with pytest.raises(ValueError, match=r"one of \['auto', .*'numpy'.*Received 'cuda'"):
        nk.layer_norm(x4(), 5, backend="cuda")
    with pytest.raises(ValueError, match="Received 'nope'"):
        nk.set_backend("nope")
    with pytest.raises(ValueError):
        nk.BatchNorm(C, backend="nope")


def test_backward_shape_mismatch():
    x = x4()
    y, m, r = nk.batch_norm(x, training=True, return_stats=True)
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        nk.batch_norm_backward(np.ones((2, C, 3, 4)), x, m, r)
    with pytest.raises(ValueError, match=r"mean: expected shape \(4,\)"):
        nk.batch_norm_backward(np.ones(x.shape), x, m[:2], r)


def test_layer_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        nk.LayerNorm(5).backward(np.ones((2, 5), np.float32))


def test_layer_constructor_checks():
    with pytest.raises(ValueError):
        nk.BatchNorm(0)
    with pytest.raises(ValueError, match="divisible"):
        nk.GroupNorm(3, 4)
    with pytest.raises(TypeError):
        nk.LayerNorm(4, dtype=np.int32)


def test_load_state_dict_errors():
    layer = nk.BatchNorm(C)
    with pytest.raises(RuntimeError, match="missing keys"):
        layer.load_state_dict({"weight": np.ones(C)})
    bad = layer.state_dict()
    bad["weight"] = np.ones(C + 1)
    with pytest.raises(ValueError, match=r"expected shape \(4,\)"):
        layer.load_state_dict(bad)


# ------------------------------------------------------------------ nothing is mutated
@pytest.mark.parametrize("backend,dtype", K.backend_dtype_params(
    dtypes=["float16", "float32", "float64"]))   # 16-bit rows: K.PENDING_16BIT marks
def test_no_function_mutates_its_inputs(backend, dtype):
    x, dy = K.make((3, C, 5), dtype, seed=1), K.make((3, C, 5), dtype, seed=2)
    w, b = K.make(C, dtype, seed=3), K.make(C, dtype, seed=4)
    lw, lb = K.make(5, dtype, seed=5), K.make(5, dtype, seed=6)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    inputs = [x, dy, w, b, lw, lb, rm, rv]
    before = [a.copy() for a in inputs]
    kw = dict(backend=backend)
    _, m, r = nk.batch_norm(x, rm, rv, w, b, False, return_stats=True, **kw)
    nk.batch_norm_backward(dy, x, m, r, w, training=False, **kw)
    _, m, r = nk.batch_norm(x, None, None, w, b, True, return_stats=True, **kw)
    nk.batch_norm_backward(dy, x, m, r, w, **kw)
    _, m, r = nk.group_norm(x, 2, w, b, return_stats=True, **kw)
    nk.group_norm_backward(dy, x, 2, m, r, w, **kw)
    _, m, r = nk.instance_norm(x, None, None, w, b, return_stats=True, **kw)
    nk.instance_norm_backward(dy, x, m, r, w, **kw)
    _, m, r = nk.instance_norm(x, rm, rv, w, b, False, return_stats=True, **kw)
    _, m, r = nk.layer_norm(x, 5, lw, lb, return_stats=True, **kw)
    nk.layer_norm_backward(dy, x, 5, m, r, lw, **kw)
    _, m, r = nk.rms_norm(x, 5, lw, return_stats=True, **kw)
    nk.rms_norm_backward(dy, x, 5, m, r, lw, **kw)
    for a, a0 in zip(inputs, before):
        np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_propagate_like_torch(backend):
    """A NaN/Inf poisons exactly the groups it belongs to, as in torch."""
    x = K.make((2, C, 3, 5), np.float32, seed=2)
    x[1, 2, 0, 0] = np.nan
    x[0, 1, 2, 3] = np.inf
    y = nk.batch_norm(x, None, None, None, None, True, backend=backend)
    bad = ~np.isfinite(y)
    assert bad[:, 1].all() and bad[:, 2].all() and not bad[:, [0, 3]].any()
    y = nk.instance_norm(x, backend=backend)
    assert (~np.isfinite(y[1, 2])).all() and (~np.isfinite(y[0, 1])).all()
    assert np.isfinite(y[0, 0]).all() and np.isfinite(y[1, 3]).all()
    y = nk.layer_norm(x, 5, backend=backend)
    assert (~np.isfinite(y[1, 2, 0])).all() and np.isfinite(y[1, 2, 1]).all()
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    nk.batch_norm(x, rm, rv, training=True, backend=backend)
    assert np.isnan(rv[1]) and np.isnan(rv[2]) and np.isfinite(rv[[0, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    x = np.ones((0, 5), np.float32)
    assert nk.layer_norm(x, 5, backend=backend).shape == (0, 5)
    assert nk.rms_norm(x, 5, backend=backend).shape == (0, 5)
    assert nk.batch_norm(np.ones((0, C, 2), np.float32), np.zeros(C), np.ones(C),
                         backend=backend).shape == (0, C, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_threads_same_results(backend):
    xs = [K.make((8, 16, 33), np.float32, seed=3 + i) for i in range(8)]
    expected = [nk.group_norm(x, 4, backend=backend) for x in xs]
    results = [None] * 8

    def work(i):
        for _ in range(5):
            results[i] = nk.group_norm(xs[i], 4, backend=backend)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, e in zip(results, expected):
        np.testing.assert_array_equal(r, e)


# ------------------------------------------------------------------ issue 15 probes
# One row per bad input the hostile-input probes found (issue 15 groups 1 and 3, issue
# 11): the call, the exception type, and a regex the message must match -- naming the
# argument, and what was expected and given. Functional rows run on every backend.
def _x(shape=(2, C, 3, 5), dtype=np.float32):
    return K.make(shape, dtype, seed=0)


def _stats(c=C, dtype=np.float32):
    return np.zeros(c, dtype), np.ones(c, dtype)


def _masked():
    return np.ma.masked_array(_x(), mask=_x() > 1.0)


def _layer_state(**changes):
    return {**nk.BatchNorm(C).state_dict(), **changes}


NHWC = (8, 32, 32, 16)
FUNCTIONAL_ROWS = {
    "axis=1.0": (lambda be: nk.batch_norm(_x(), *_stats(), axis=1.0, backend=be),
                 TypeError, r"axis: expected an int, got float 1\.0"),
    "axis=np.float64(1.0)": (
        lambda be: nk.batch_norm(_x(), *_stats(), axis=np.float64(1.0), backend=be),
        TypeError, r"axis: expected an int, got float64"),
    "axis=True": (lambda be: nk.group_norm(_x(), 2, axis=True, backend=be),
                  TypeError, r"axis: expected an int, got bool"),
    "group_norm axis=1.0": (lambda be: nk.group_norm(_x(), 2, axis=1.0, backend=be),
                            TypeError, r"group_norm: axis: expected an int"),
    "eps=None": (lambda be: nk.layer_norm(_x(), 5, eps=None, backend=be),
                 TypeError, r"eps: expected a real number, got NoneType"),
    "eps='1e-5' (not parsed)": (lambda be: nk.layer_norm(_x(), 5, eps="1e-5", backend=be),
                                TypeError, r"eps: expected a real number, got str '1e-5'"),
    "batch_norm eps='1e-5'": (
        lambda be: nk.batch_norm(_x(), *_stats(), eps="1e-5", backend=be),
        TypeError, r"batch_norm: eps: expected a real number"),
    "group_norm eps=True": (lambda be: nk.group_norm(_x(), 2, eps=True, backend=be),
                            TypeError, r"eps: expected a real number, got bool"),
    "rms_norm eps='abc'": (lambda be: nk.rms_norm(_x(), 5, eps="abc", backend=be),
                           TypeError, r"rms_norm: eps: expected a real number"),
    "batch_norm eval eps<0": (lambda be: nk.batch_norm(_x(), *_stats(), eps=-0.5, backend=be),
                              ValueError, r"batch_norm: eps: expected a number >= 0"),
    "momentum='abc'": (
        lambda be: nk.batch_norm(_x(), None, None, training=True, momentum="abc", backend=be),
        TypeError, r"momentum: expected a real number, got str 'abc'"),
    "instance_norm momentum=None": (
        lambda be: nk.instance_norm(_x(), momentum=None, backend=be),
        ValueError, r"instance_norm: the functional form needs a float momentum"),
    "layer_norm normalized_shape=4.0 (fast path)": (
        lambda be: nk.layer_norm(_x((2, 4)), 4.0, backend=be),
        TypeError, r"layer_norm: normalized_shape: expected an int or a tuple of ints, "
                   r"got float 4\.0"),
    "layer_norm normalized_shape=(4.0,) (fast path)": (
        lambda be: nk.layer_norm(_x((2, 4)), (4.0,), backend=be),
        TypeError, r"normalized_shape: expected an int or a tuple of ints.*element 0 is "
                   r"float 4\.0"),
    "layer_norm normalized_shape=4.0 (general path)": (
        lambda be: nk.layer_norm(_x((2, 4)), 4.0, return_stats=True, backend=be),
        TypeError, r"layer_norm: normalized_shape: expected an int"),
    "rms_norm normalized_shape=4.0": (lambda be: nk.rms_norm(_x((2, 4)), 4.0, backend=be),
                                      TypeError, r"rms_norm: normalized_shape: expected"),
    "rms_norm normalized_shape=(4.0,) with out=": (
        lambda be: nk.rms_norm(_x((2, 4)), (4.0,), out=np.empty((2, 4), np.float32),
                               backend=be),
        TypeError, r"rms_norm: normalized_shape: expected"),
    "layer_norm normalized_shape=True": (lambda be: nk.layer_norm(_x((2, 1)), True, backend=be),
                                         TypeError, r"normalized_shape: expected.*got bool"),
    "layer_norm 0-d input": (lambda be: nk.layer_norm(np.array(3.0), 1, backend=be),
                             ValueError, r"x must have at least 1 dimension.*got shape \(\)"),
    "masked array, functional": (lambda be: nk.layer_norm(_masked(), 5, backend=be),
                                 TypeError, r"MaskedArray.*x\.filled\(.*x\.data"),
    "masked array, batch_norm training": (
        lambda be: nk.batch_norm(_masked(), None, None, training=True, backend=be),
        TypeError, r"MaskedArray.*x\.filled"),
    "masked weight": (
        lambda be: nk.group_norm(_x(), 2, np.ma.masked_array(np.ones(C)), backend=be),
        TypeError, r"weight: expected a plain array, got a numpy\.ma\.MaskedArray"),
    "channels-last input, channels-first call": (
        lambda be: nk.batch_norm(_x(NHWC), *_stats(16), backend=be),
        ValueError, r"running_mean: expected shape \(32,\) for the 32 channels on axis 1 "
                    r".*\(8, 32, 32, 16\), got shape \(16,\).*pass axis=-1"),
    "channels-last group_norm weight": (
        lambda be: nk.group_norm(_x(NHWC), 4, np.ones(16, np.float32), backend=be),
        ValueError, r"group_norm: weight: expected shape \(32,\).*axis 1.*pass axis=-1"),
    "channels-first input, axis=-1": (
        lambda be: nk.instance_norm(_x((2, 6, 5)), None, None, np.ones(6), axis=-1,
                                    backend=be),
        ValueError, r"weight: expected shape \(5,\).*axis 2.*axis 1 has 6.*pass axis=1"),
}

LAYER_ROWS = {
    "LayerNorm(3.5)": (lambda: nk.LayerNorm(3.5), TypeError,
                       r"LayerNorm: normalized_shape: expected an int or a tuple of ints, "
                       r"got float 3\.5"),
    "LayerNorm(None)": (lambda: nk.LayerNorm(None), TypeError,
                        r"LayerNorm: normalized_shape: expected.*got NoneType None"),
    "LayerNorm('abc')": (lambda: nk.LayerNorm("abc"), TypeError,
                         r"LayerNorm: normalized_shape: expected.*got str 'abc'"),
    "LayerNorm((-3,))": (lambda: nk.LayerNorm((-3,)), ValueError,
                         r"LayerNorm: normalized_shape: expected non-negative dimensions, "
                         r"got \(-3,\)"),
    "LayerNorm(())": (lambda: nk.LayerNorm(()), ValueError,
                      r"LayerNorm: normalized_shape: expected at least one dimension"),
    "RMSNorm(3.5)": (lambda: nk.RMSNorm(3.5), TypeError, r"RMSNorm: normalized_shape"),
    "RMSNorm(None)": (lambda: nk.RMSNorm(None), TypeError, r"RMSNorm: normalized_shape"),
    "RMSNorm('abc')": (lambda: nk.RMSNorm("abc"), TypeError, r"RMSNorm: normalized_shape"),
    "RMSNorm((-3,))": (lambda: nk.RMSNorm((-3,)), ValueError,
                       r"RMSNorm: normalized_shape: expected non-negative"),
    "LayerNorm eps='1e-5'": (lambda: nk.LayerNorm(3, eps="1e-5"), TypeError,
                             r"LayerNorm: eps: expected a real number, got str"),
    "BatchNorm momentum='abc'": (lambda: nk.BatchNorm(3, momentum="abc"), TypeError,
                                 r"BatchNorm: momentum: expected a real number"),
    "BatchNorm axis=1.0": (lambda: nk.BatchNorm(3, axis=1.0), TypeError,
                           r"BatchNorm: axis: expected an int, got float 1\.0"),
    "BatchNorm(2.0)": (lambda: nk.BatchNorm(2.0), TypeError,
                       r"BatchNorm: num_features: expected an int, got float"),
    "GroupNorm(0, 4)": (lambda: nk.GroupNorm(0, 4), ValueError,
                        r"GroupNorm: num_groups: expected an int >= 1, got 0"),
    "load_state_dict(None)": (lambda: nk.BatchNorm(C).load_state_dict(None), TypeError,
                              r"state_dict: expected a mapping of name -> array, got "
                              r"NoneType None"),
    "string weight in a state dict": (
        lambda: nk.BatchNorm(C).load_state_dict(_layer_state(weight="abc")), TypeError,
        r"state_dict\['weight'\]: expected a float array of shape \(4,\), got str 'abc'"),
    "masked running_var in a state dict": (
        lambda: nk.BatchNorm(C).load_state_dict(
            _layer_state(running_var=np.ma.masked_array(np.ones(C)))),
        TypeError, r"state_dict\['running_var'\]: expected a plain array"),
    "BatchNorm(16) on channels-last input": (
        lambda: nk.BatchNorm(16)(_x(NHWC)), ValueError,
        r"BatchNorm\(16\): expected 16 channels on axis 1, got input of shape "
        r"\(8, 32, 32, 16\) with 32 on axis 1; its last axis has 16: .*axis=-1"),
    "BatchNorm(16) eval on channels-last input": (
        lambda: nk.BatchNorm(16).eval()(_x(NHWC)), ValueError,
        r"BatchNorm\(16\): expected 16 channels on axis 1.*axis=-1"),
    "GroupNorm(4, 16) on channels-last input": (
        lambda: nk.GroupNorm(4, 16)(_x(NHWC)), ValueError,
        r"GroupNorm\(4, 16\): expected 16 channels on axis 1.*its last axis has 16.*axis=-1"),
    "InstanceNorm(16) on channels-last input": (
        lambda: nk.InstanceNorm(16)(_x(NHWC)), ValueError,
        r"InstanceNorm\(16\): expected 16 channels on axis 1.*axis=-1"),
    "masked array, layer": (lambda: nk.BatchNorm(C)(_masked()), TypeError,
                            r"MaskedArray.*x\.filled\(.*x\.data"),
    "masked array, recalibrate": (
        lambda: nk.recalibrate(nk.BatchNorm(C), [_masked()]), TypeError,
        r"MaskedArray.*filled"),
    "complex batch, recalibrate": (
        lambda: nk.recalibrate(nk.BatchNorm(C), [np.ones((2, C), complex)]), TypeError,
        r"batch must be a float16, bfloat16, float32 or float64 array, got dtype complex128"),
    "object batch, recalibrate": (
        lambda: nk.recalibrate(nk.BatchNorm(C), [np.ones((2, C), object)]), TypeError,
        r"got dtype object"),
    "channels-last batch, recalibrate": (
        lambda: nk.recalibrate(nk.BatchNorm(16), [_x(NHWC)]), ValueError,
        r"recalibrate: BatchNorm\(16\): expected 16 channels on axis 1.*axis=-1"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", list(FUNCTIONAL_ROWS))
def test_bad_input_table_functional(row, backend):
    call, exc, pattern = FUNCTIONAL_ROWS[row]
    with pytest.raises(exc, match=pattern):
        call(backend)


@pytest.mark.parametrize("row", list(LAYER_ROWS))
def test_bad_input_table_layers(row):
    call, exc, pattern = LAYER_ROWS[row]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_accepted_as_torch(backend):
    """Any real eps for layer/group/instance/rms norm (negative too: NaN where var + eps
    < 0, the caller's choice, as torch); integers and NumPy scalars are real numbers."""
    x = np.arange(12.0).reshape(2, 2, 3)      # per-row variance 2/3: eps=-0.5 stays > 0
    for call in (lambda e: nk.layer_norm(x, 3, eps=e, backend=backend),
                 lambda e: nk.group_norm(x, 1, eps=e, backend=backend),
                 lambda e: nk.instance_norm(x, eps=e, backend=backend),
                 lambda e: nk.rms_norm(x, 3, eps=e, backend=backend)):
        assert np.isfinite(call(-0.5)).all()
        np.testing.assert_array_equal(call(np.float64(1e-5)), call(1e-5))
        np.testing.assert_array_equal(call(0), call(0.0))
    assert nk.group_norm(x, 2, axis=np.int64(1), backend=backend).shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_array_likes_everywhere(backend):
    """A Python list works the same in every entry point (issue 11): converted once."""
    data = [[1.0, 2.0, 3.0], [4.0, 6.0, 5.0], [0.0, 1.0, 7.0]]
    expected = nk.batch_norm(np.array(data), None, None, training=True, backend=backend)
    # exact: the layer converts the list to the same float64 array and calls the same
    # kernel of the same backend with the same arguments (bitwise-identical code path)
    layer = nk.BatchNorm(3, dtype=np.float64, backend=backend, diagnostics=False)
    np.testing.assert_array_equal(layer(data), expected)
    layer = nk.BatchNorm(3, dtype=np.float64, backend=backend)     # diagnostics on
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nk.UnstableBatchStatisticsWarning)
        np.testing.assert_array_equal(layer(data), expected)    # same path, exact
    assert nk.recalibrate(nk.BatchNorm(3), [data]) == {0: 3}
    np.testing.assert_array_equal(nk.LayerNorm(3, dtype=np.float64, backend=backend)(data),
                                  nk.layer_norm(np.array(data), 3, backend=backend))


def test_torch_bfloat16_state_dict():
    torch = pytest.importorskip("torch")
    t = torch.nn.BatchNorm2d(C).to(torch.bfloat16)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([1.5, 2.0, 0.25, 3.0]))
        t.running_var.copy_(torch.tensor([4.0, 0.5, 1.0, 2.0]))
    layer = nk.BatchNorm(C).load_state_dict(t.state_dict())
    np.testing.assert_array_equal(layer.weight, [1.5, 2.0, 0.25, 3.0])
    np.testing.assert_array_equal(layer.running_var, [4.0, 0.5, 1.0, 2.0])
    ml_dtypes = pytest.importorskip("ml_dtypes")
    state = {k: np.asarray(v) for k, v in layer.state_dict().items()}
    state["bias"] = np.array([1, 2, 3, 4], ml_dtypes.bfloat16)
    layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.bias, [1, 2, 3, 4])


def test_failed_load_changes_nothing():
    layer = nk.BatchNorm(C)
    good = layer.state_dict()
    with pytest.raises(TypeError, match="running_var"):
        layer.load_state_dict({**good, "weight": np.full(C, 7.0), "running_var": "x"})
    np.testing.assert_array_equal(layer.weight, 1)     # checked before anything is copied
