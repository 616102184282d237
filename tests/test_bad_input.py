"""The error contract of API.md: clear exceptions, never a crash, never a mutated input."""
import threading

import numpy as np
import pytest

import normkit as nk

BACKENDS = nk.available_backends()
C = 4


def x4(dtype=np.float32):
    return np.random.default_rng(0).standard_normal((2, C, 3, 5)).astype(dtype)


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
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_no_function_mutates_its_inputs(backend, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, C, 5)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    lw, lb = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
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
    x = np.random.default_rng(2).standard_normal((2, C, 3, 5)).astype(np.float32)
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
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((8, 16, 33)).astype(np.float32) for _ in range(8)]
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
