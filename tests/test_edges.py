"""Edges where normkit follows torch, and hostile memory layouts (issues 11 and 15).

Table-driven, every backend:

* empty inputs (training BatchNorm, the other norms, the layers, the backward
  functions) against torch 2.x's behaviour, checked live when torch is installed;
* eps rules: eps <= 0 in training BatchNorm raises as torch; a negative eps in
  layer/group/instance/rms norm is used as given (NaN only where var + eps < 0);
* ``out=`` sharing memory with any parameter or the residual;
* unaligned and byte-swapped input / ``out=``;
* InstanceNorm running variance from the centred M2;
* no NumPy floating-point warning escapes normkit's own arithmetic;
* float32 data near the float32 maximum.
"""
import warnings

import _cases as K
import numpy as np
import pytest

import normkit as nk

try:
    import torch
    import torch.nn.functional as TF
except ImportError:       # the torch cross-checks skip; the rest runs
    torch = TF = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

# ---------------------------------------------------------------- empty inputs
# (id, input shape, normkit call, torch call). Each call gets (x, backend) / (t,).
# Expectations are torch's: both raise ValueError, or both return x's shape.
EMPTY = [
    ("bn-train-NCHW", (0, 5, 2, 2),
     lambda x, be: nk.batch_norm(x, None, None, training=True, backend=be),
     lambda t: TF.batch_norm(t, None, None, training=True)),
    ("bn-train-NC", (0, 5),
     lambda x, be: nk.batch_norm(x, None, None, training=True, backend=be),
     lambda t: TF.batch_norm(t, None, None, training=True)),
    ("bn-train-S0", (2, 5, 0),
     lambda x, be: nk.batch_norm(x, None, None, training=True, backend=be),
     lambda t: TF.batch_norm(t, None, None, training=True)),
    ("bn-train-C0", (2, 0, 3),
     lambda x, be: nk.batch_norm(x, np.zeros(0), np.ones(0), training=True, backend=be),
     lambda t: TF.batch_norm(t, torch.zeros(0), torch.ones(0), training=True)),
    ("bn-train-one-value", (1, 5),
     lambda x, be: nk.batch_norm(x, None, None, training=True, backend=be),
     lambda t: TF.batch_norm(t, None, None, training=True)),
    ("bn-eval", (0, 5, 2, 2),
     lambda x, be: nk.batch_norm(x, np.zeros(5), np.ones(5), backend=be),
     lambda t: TF.batch_norm(t, torch.zeros(5), torch.ones(5))),
    ("in-N0", (0, 4, 3), lambda x, be: nk.instance_norm(x, backend=be),
     lambda t: TF.instance_norm(t)),
    ("in-S0", (2, 4, 0), lambda x, be: nk.instance_norm(x, backend=be),
     lambda t: TF.instance_norm(t)),
    ("in-C0", (2, 0, 3), lambda x, be: nk.instance_norm(x, backend=be),
     lambda t: TF.instance_norm(t)),
    ("in-no-spatial", (0, 4), lambda x, be: nk.instance_norm(x, backend=be),
     lambda t: TF.instance_norm(t)),
    ("in-spatial-1", (0, 4, 1), lambda x, be: nk.instance_norm(x, backend=be),
     lambda t: TF.instance_norm(t)),
    ("gn-N0", (0, 4, 3), lambda x, be: nk.group_norm(x, 2, backend=be),
     lambda t: TF.group_norm(t, 2)),
    ("gn-S0", (2, 4, 0), lambda x, be: nk.group_norm(x, 2, backend=be),
     lambda t: TF.group_norm(t, 2)),
    ("gn-NC", (0, 4), lambda x, be: nk.group_norm(x, 2, backend=be),
     lambda t: TF.group_norm(t, 2)),
    ("gn-C0", (2, 0, 3), lambda x, be: nk.group_norm(x, 1, backend=be),
     lambda t: TF.group_norm(t, 1)),
    ("ln-rows0", (0, 4, 3), lambda x, be: nk.layer_norm(x, 3, backend=be),
     lambda t: TF.layer_norm(t, (3,))),
    ("ln-K0", (2, 4, 0), lambda x, be: nk.layer_norm(x, 0, backend=be),
     lambda t: TF.layer_norm(t, (0,))),
    ("rms-rows0", (0, 4, 3), lambda x, be: nk.rms_norm(x, 3, backend=be),
     lambda t: TF.rms_norm(t, (3,))),
    ("rms-K0", (2, 4, 0), lambda x, be: nk.rms_norm(x, 0, backend=be),
     lambda t: TF.rms_norm(t, (0,))),
]


def _outcome(fn, *args):
    """('ok', shape) or ('ValueError', message) -- what a call did."""
    try:
        return "ok", tuple(fn(*args).shape)
    except ValueError as exc:
        return "ValueError", str(exc)


@needs_torch
@pytest.mark.parametrize("case", EMPTY, ids=[c[0] for c in EMPTY])
def test_empty_and_tiny_inputs_as_torch(case, backend):
    _, shape, ours, theirs = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _outcome(ours, np.zeros(shape, np.float32), backend)
    want = _outcome(theirs, torch.zeros(shape))
    assert got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert got[1] == shape
    elif "per channel" in want[1]:
        assert got[1].startswith("Expected more than 1 value per channel when training")
    else:
        assert got[1].startswith("Expected more than 1 spatial element when training")


def test_empty_training_batch_leaves_running_statistics(backend):
    rm, rv = np.full(5, 0.25, np.float32), np.full(5, 2.0, np.float32)
    y, mean, rstd = nk.batch_norm(np.zeros((0, 5, 2, 2), np.float32), rm, rv,
                                  training=True, backend=backend, return_stats=True)
    assert y.shape == (0, 5, 2, 2) and mean.shape == rstd.shape == (5,)
    np.testing.assert_array_equal(rm, 0.25)
    np.testing.assert_array_equal(rv, 2.0)


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_layer_on_an_empty_batch(backend, momentum, renorm):
    """torch's module counts the empty batch in num_batches_tracked (checked with torch
    2.13: 0 -> 1 for momentum 0.1 and None) and leaves the statistics as they are."""
    layer = nk.BatchNorm(5, momentum=momentum, backend=backend, renorm=renorm)
    x = np.zeros((0, 5, 2, 2), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no diagnostics warning on no data
        y = layer(x)
        gx = layer.backward(np.zeros_like(x))
    assert y.shape == gx.shape == x.shape
    assert layer.num_batches_tracked == 1
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    np.testing.assert_array_equal(layer.grads["weight"], 0.0)
    np.testing.assert_array_equal(layer.grads["bias"], 0.0)


@needs_torch
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_module_counts_the_empty_batch(momentum):
    m = torch.nn.BatchNorm2d(5, momentum=momentum)
    m(torch.zeros(0, 5, 2, 2))
    assert int(m.num_batches_tracked) == 1
    assert torch.equal(m.running_mean, torch.zeros(5))


@pytest.mark.parametrize("layer", [
    lambda be: nk.InstanceNorm(4, affine=True, track_running_stats=True, backend=be),
    lambda be: nk.GroupNorm(2, 4, backend=be),
    lambda be: nk.LayerNorm(3, backend=be),
    lambda be: nk.RMSNorm(3, backend=be),
], ids=["instance", "group", "layer", "rms"])
def test_other_layers_on_empty_input(layer, backend):
    m = layer(backend)
    x = np.zeros((0, 4, 3), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m(x).shape == x.shape
        assert m.backward(np.zeros_like(x)).shape == x.shape
    for g in m.grads.values():
        np.testing.assert_array_equal(g, 0.0)


EMPTY_BACKWARD = [
    ("bn", lambda g, x, be: nk.batch_norm_backward(g, x, np.zeros(5), np.ones(5),
                                                   backend=be)),
    ("gn", lambda g, x, be: nk.group_norm_backward(g, x, 5, np.zeros((0, 5)),
                                                   np.ones((0, 5)), backend=be)),
    ("in", lambda g, x, be: nk.instance_norm_backward(g, x, np.zeros((0, 5)),
                                                      np.ones((0, 5)), backend=be)),
    ("ln", lambda g, x, be: nk.layer_norm_backward(g, x, 2, np.zeros((0, 5)),
                                                   np.ones((0, 5)), backend=be)),
    ("rms", lambda g, x, be: nk.rms_norm_backward(g, x, 2, None, np.ones((0, 5)),
                                                  backend=be)),
]


@pytest.mark.parametrize("case", EMPTY_BACKWARD, ids=[c[0] for c in EMPTY_BACKWARD])
def test_backward_on_empty_input(case, backend):
    x = np.zeros((0, 5, 2), np.float32)
    gx, gw, gb = case[1](np.zeros_like(x), x, backend)
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gw, 0.0)
    np.testing.assert_array_equal(gb, 0.0)


# ---------------------------------------------------------------- eps
@pytest.mark.parametrize("eps", [0.0, -0.1])
def test_training_batch_norm_needs_positive_eps(eps, backend):
    """torch 2.13: ValueError('batch_norm eps must be positive during training, but
    got 0.0'); eval mode accepts eps = 0."""
    x = np.arange(12.0).reshape(4, 3)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        nk.batch_norm(x, None, None, training=True, eps=eps, backend=backend)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        nk.BatchNorm(3, eps=eps, backend=backend)(x)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        nk.BatchNorm(3, eps=eps, backend=backend, renorm=True)(x)
    y = nk.batch_norm(x, np.zeros(3), np.ones(3), eps=0.0, backend=backend)
    np.testing.assert_array_equal(y, x)


NEGATIVE_EPS = [   # (id, normkit call, torch call) on arange(12).reshape(2, 2, 3)
    ("layer", lambda x, e, be: nk.layer_norm(x, 3, eps=e, backend=be),
     lambda t, e: TF.layer_norm(t, (3,), eps=e)),
    ("group1", lambda x, e, be: nk.group_norm(x, 1, eps=e, backend=be),
     lambda t, e: TF.group_norm(t, 1, eps=e)),
    ("group2", lambda x, e, be: nk.group_norm(x, 2, eps=e, backend=be),
     lambda t, e: TF.group_norm(t, 2, eps=e)),
    ("instance", lambda x, e, be: nk.instance_norm(x, eps=e, backend=be),
     lambda t, e: TF.instance_norm(t, eps=e)),
    ("rms", lambda x, e, be: nk.rms_norm(x, 3, eps=e, backend=be),
     lambda t, e: TF.rms_norm(t, (3,), eps=e)),
]


@needs_torch
@pytest.mark.parametrize("eps", [-0.5, -5.0, -50.0])
@pytest.mark.parametrize("case", NEGATIVE_EPS, ids=[c[0] for c in NEGATIVE_EPS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_negative_eps_as_torch(case, eps, dtype, backend):
    """torch computes with a negative eps: NaN exactly where var + eps < 0."""
    x = np.arange(12.0).reshape(2, 2, 3).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = case[1](x, eps, backend)
    want = case[2](torch.from_numpy(x), eps).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    # var + eps is exact here (small integers and halves); the rest is a few roundings
    tol = 8 * np.finfo(dtype).eps
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


# ---------------------------------------------------------------- out= overlaps
def _inside(out, values):
    """``values`` written into the start of ``out``, and returned as a view of it."""
    flat = out.reshape(-1)
    flat[:values.size] = values.reshape(-1)
    return flat[:values.size].reshape(values.shape)


def _bn_eval(x, p, **k):
    return nk.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                         **k)


OVERLAP = [   # (id, call(x, params, **kw), params {name: shape}, names placed in out)
    ("ln-weight", lambda x, p, **k: nk.layer_norm(x, 8, p["weight"], p["bias"], **k),
     {"weight": (8,), "bias": (8,)}, ("weight",)),
    ("ln-bias", lambda x, p, **k: nk.layer_norm(x, 8, p["weight"], p["bias"], **k),
     {"weight": (8,), "bias": (8,)}, ("bias",)),
    ("ln-both", lambda x, p, **k: nk.layer_norm(x, 8, p["weight"], p["bias"], **k),
     {"weight": (8,), "bias": (8,)}, ("weight", "bias")),
    ("rms-weight", lambda x, p, **k: nk.rms_norm(x, 8, p["weight"], **k),
     {"weight": (8,)}, ("weight",)),
    ("gn-weight", lambda x, p, **k: nk.group_norm(x, 2, p["weight"], p["bias"], **k),
     {"weight": (4,), "bias": (4,)}, ("weight",)),
    ("gn-bias", lambda x, p, **k: nk.group_norm(x, 2, p["weight"], p["bias"], **k),
     {"weight": (4,), "bias": (4,)}, ("bias",)),
    ("in-eval-stats", lambda x, p, **k: nk.instance_norm(
        x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, **k),
     {"running_mean": (4,), "running_var": (4,), "weight": (4,), "bias": (4,)},
     ("running_mean", "running_var", "weight", "bias")),
]
OVERLAP += [(f"bn-eval-{name}", _bn_eval,
             {"running_mean": (4,), "running_var": (4,), "weight": (4,), "bias": (4,)},
             (name,)) for name in ("running_mean", "running_var", "weight", "bias")]


def _params(shapes, rng):
    return {n: (rng.random(s) + 0.5).astype(np.float32) for n, s in shapes.items()}


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "out=x"])
@pytest.mark.parametrize("case", OVERLAP, ids=[c[0] for c in OVERLAP])
def test_out_sharing_memory_with_a_parameter(case, in_place, backend, rng):
    _, call, shapes, inside = case
    shape = (4, 8) if case[0][:2] in ("ln", "rm") else (3, 4, 8)
    x = rng.standard_normal(shape).astype(np.float32)
    params = _params(shapes, rng)
    out = x if in_place else np.zeros_like(x)
    shared = dict(params)
    for name in inside:           # each in its own part of out, as a view of it
        part = out.reshape(-1)[inside.index(name) * 8:]
        shared[name] = _inside(part, params[name])
    want = call(x.copy(), params, backend=backend)
    got = call(x, shared, out=out, backend=backend)
    assert got is out
    # the same kernel on the same values; only where the parameters live differs (the
    # parameters are read, or copied, before out is written): bit-identical results
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_out_sharing_memory_with_an_updated_statistic(norm, name, backend, rng):
    """In training the running statistics are written too: no order of the two writes
    is right, so the call is rejected, naming both arguments, and nothing is written."""
    x = rng.standard_normal((3, 4, 8)).astype(np.float32)
    out = np.zeros_like(x)
    stats = {"running_mean": np.zeros(4, np.float32), "running_var": np.ones(4, np.float32)}
    stats[name] = _inside(out, stats[name])
    fn = nk.batch_norm if norm == "batch" else nk.instance_norm
    with pytest.raises(ValueError, match=f"out and {name} share memory"):
        fn(x, stats["running_mean"], stats["running_var"], None, None, True, out=out,
           backend=backend)
    np.testing.assert_array_equal(out.reshape(-1)[4:], 0.0)


@pytest.mark.parametrize("norm", ["batch_norm", "group_norm"])
@pytest.mark.parametrize("overlap", ["same", "shifted"])
def test_residual_overlapping_out(norm, overlap, backend, rng):
    """residual may be out itself (read before written); a residual that overlaps out
    elsewhere is copied first."""
    shape = (3, 4, 8)
    x = rng.standard_normal(shape).astype(np.float32)
    buf = rng.standard_normal(x.size + 1).astype(np.float32)
    if overlap == "same":
        out = residual = buf[:x.size].reshape(shape)
    else:
        out, residual = buf[1:].reshape(shape), buf[:-1].reshape(shape)
    r_copy = residual.copy()
    w, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    call = {"batch_norm": lambda **k: nk.batch_norm(x, np.zeros(4), np.ones(4), w, b,
                                                    backend=backend, **k),
            "group_norm": lambda **k: nk.group_norm(x, 2, w, b, backend=backend, **k)}[norm]
    want = call(activation="relu", residual=r_copy)
    got = call(activation="relu", residual=residual, out=out)
    # the same kernel on the same values (residual read before out is written, or copied
    # first): bit-identical results
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- alignment, byte order
def _unaligned(a):
    """A copy of ``a`` at an odd byte offset (as from a network buffer)."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = buf[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned or a.dtype.itemsize == 1
    return u


LAYOUT_CALLS = [
    ("bn-train", lambda x, be, **k: nk.batch_norm(x, None, None, training=True,
                                                  backend=be, **k)),
    ("bn-train-last", lambda x, be, **k: nk.batch_norm(x, None, None, training=True,
                                                       axis=-1, backend=be, **k)),
    ("bn-eval", lambda x, be, **k: nk.batch_norm(x, np.zeros(6, x.dtype),
                                                 np.ones(6, x.dtype), backend=be, **k)),
    ("gn", lambda x, be, **k: nk.group_norm(x, 2, backend=be, **k)),
    ("gn-last", lambda x, be, **k: nk.group_norm(x, 1, axis=-1, backend=be, **k)),
    ("in", lambda x, be, **k: nk.instance_norm(x, backend=be, **k)),
    ("ln", lambda x, be, **k: nk.layer_norm(x, 6, backend=be, **k)),
    ("rms", lambda x, be, **k: nk.rms_norm(x, 6, backend=be, **k)),
]


@pytest.mark.parametrize("kind", ["unaligned-x", "unaligned-out", "byteswapped-x"])
@pytest.mark.parametrize("case", LAYOUT_CALLS, ids=[c[0] for c in LAYOUT_CALLS])
@pytest.mark.parametrize(("backend", "dtype"), K.backend_dtype_params())
def test_any_alignment_and_byte_order(case, kind, dtype, backend, rng):
    """Unaligned and byte-swapped data (16-bit included: copied once, in 16 bits, to an
    aligned native array) gives the bits of the aligned native call."""
    if kind == "byteswapped-x" and dtype == "bfloat16":
        pytest.skip("bfloat16 has no byte-swapped NumPy dtype (ml_dtypes gives '>V2')")
    x = rng.standard_normal((4, 6, 6)).astype(K.np_dtype(dtype))
    want = case[1](x, backend)
    if kind == "unaligned-out":
        out = _unaligned(np.zeros_like(x))
        got = case[1](x, backend, out=out)
        assert got is out
    elif kind == "unaligned-x":
        got = case[1](_unaligned(x), backend)
    else:
        got = case[1](x.astype(x.dtype.newbyteorder()), backend)
    K.assert_same(got, want)     # same values, same kernels


PARAM_CALLS = [   # (id, call(x (4, 6, 6), p (6,) -> parameter, backend)); p gives a fresh array
    ("ln", lambda x, p, be: nk.layer_norm(x, 6, p(), p(), backend=be)),
    ("ln-stats", lambda x, p, be: nk.layer_norm(x, 6, p(), p(), backend=be,
                                                return_stats=True)[0]),
    ("rms", lambda x, p, be: nk.rms_norm(x, 6, p(), backend=be)),
    ("bn-eval", lambda x, p, be: nk.batch_norm(x, p(), p(), p(), p(), backend=be)),
    ("bn-eval-stats", lambda x, p, be: nk.batch_norm(x, p(), p(), p(), p(), backend=be,
                                                     return_stats=True)[0]),
    ("gn", lambda x, p, be: nk.group_norm(x, 2, p(), p(), backend=be)),
    ("in-eval", lambda x, p, be: nk.instance_norm(x, p(), p(), p(), p(), False,
                                                  backend=be)),
    ("ln-backward", lambda x, p, be: nk.layer_norm_backward(
        x, x, 6, np.zeros((4, 6)), np.ones((4, 6)), p(), backend=be)[0]),
]


@pytest.mark.parametrize("kind", ["unaligned", "byteswapped"])
@pytest.mark.parametrize("case", PARAM_CALLS, ids=[c[0] for c in PARAM_CALLS])
def test_parameters_of_any_alignment_and_byte_order(case, kind, backend, rng):
    x = rng.standard_normal((4, 6, 6)).astype(np.float32)
    values = (rng.random(6) + 0.5).astype(np.float32)
    want = case[1](x, lambda: values.copy(), backend)
    if kind == "unaligned":
        got = case[1](x, lambda: _unaligned(values), backend)
    else:
        got = case[1](x, lambda: values.astype(values.dtype.newbyteorder()), backend)
    np.testing.assert_array_equal(got, want)


BACKWARD_CALLS = [
    ("bn", lambda g, x, be: nk.batch_norm_backward(
        g, x, *nk.batch_norm(x, None, None, training=True, return_stats=True)[1:],
        backend=be)),
    ("gn", lambda g, x, be: nk.group_norm_backward(
        g, x, 2, *nk.group_norm(x, 2, return_stats=True)[1:], backend=be)),
    ("ln", lambda g, x, be: nk.layer_norm_backward(
        g, x, 6, *nk.layer_norm(x, 6, return_stats=True)[1:], backend=be)),
]


@pytest.mark.parametrize("case", BACKWARD_CALLS, ids=[c[0] for c in BACKWARD_CALLS])
def test_backward_on_unaligned_input(case, backend, rng):
    x = rng.standard_normal((4, 6, 6)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    want = case[1](g, x, backend)
    got = case[1](_unaligned(g), _unaligned(x), backend)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- InstanceNorm running_var
@pytest.mark.parametrize("axis", [1, -1])
def test_instance_running_var_of_constant_instances_is_zero(axis, backend):
    """torch gives exactly 0; deriving it back from rstd gave -2.7e-19."""
    x = np.full((3, 4, 5, 5) if axis == 1 else (3, 5, 5, 4), 7.25, np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    nk.instance_norm(x, rm, rv, momentum=1.0, eps=1e-3, axis=axis, backend=backend)
    np.testing.assert_array_equal(rm, 7.25)
    np.testing.assert_array_equal(rv, 0.0)


def test_instance_running_var_of_tiny_variance(backend, rng):
    """float64 data with variance ~1e-20 around 1: the running variance is the mean of
    the unbiased per-instance variances. Both sides are centred two-pass sums over 64
    values of the same stored x, while rstd-derived values were 14% off (1/rstd^2 - eps
    cancels to eps's rounding error).

    Bound: each per-instance M2 within K.bound_m2 (both sides, any algorithm the
    contract allows; kappa = |mean| / std ~ 1e10 makes it ~3e-4 relative here, far
    below the 14% of the bug), divided by n - 1; the mean of the 3 and the momentum
    blend add a few roundings of the result (8 u64)."""
    x = 1.0 + 1e-10 * rng.standard_normal((3, 4, 64))
    rv = np.ones(4)
    nk.instance_norm(x, None, rv, momentum=1.0, backend=backend)
    want = x.var(axis=2, ddof=1).mean(axis=0)
    d_var = K.bound_m2(x, 2) / (x.shape[2] - 1)                    # (3, 4)
    K.assert_within(rv, want, d_var.mean(axis=0) + 8 * K.U64 * want, "running_var")


# ---------------------------------------------------------------- no NumPy warnings
QUIET = [   # calls whose results are NaN/Inf by the user's data or eps, not warnings
    ("bn-eval-negative-var-fast", lambda be: nk.batch_norm(
        np.ones((2, 3, 4)), np.zeros(3), -np.ones(3), backend=be)),
    ("bn-eval-negative-var-general", lambda be: nk.batch_norm(
        np.ones((2, 3, 4)), np.zeros(3), -np.ones(3), backend=be, return_stats=True)[0]),
    ("bn-eval-zero-var-eps0", lambda be: nk.batch_norm(
        np.ones((2, 3, 4), np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32),
        eps=0.0, backend=be)),
    ("bn-train-nan", lambda be: nk.batch_norm(
        np.full((2, 3, 4), np.nan), None, None, training=True, backend=be)),
    ("bn-train-inf", lambda be: nk.batch_norm(
        np.full((2, 3, 4), np.inf, np.float32), np.zeros(3), np.ones(3), training=True,
        backend=be)),
    ("in-eps0-constant", lambda be: nk.instance_norm(np.ones((2, 3, 4)), eps=0.0,
                                                     backend=be)),
    ("gn-eps0-constant", lambda be: nk.group_norm(np.ones((2, 4, 4)), 2, eps=0.0,
                                                  backend=be)),
    ("gn-negative-eps", lambda be: nk.group_norm(np.ones((2, 4, 4)), 2, eps=-1.0,
                                                 backend=be)),
    ("ln-eps0-constant", lambda be: nk.layer_norm(np.ones((2, 4)), 4, eps=0.0,
                                                  backend=be)),
    ("rms-eps0-zeros", lambda be: nk.rms_norm(np.zeros((2, 4)), 4, eps=0.0, backend=be)),
    ("bn-backward-inf-rstd", lambda be: nk.batch_norm_backward(
        np.ones((2, 3, 4)), np.ones((2, 3, 4)), np.ones(3), np.full(3, np.inf),
        backend=be)[0]),
]
@pytest.mark.parametrize("case", QUIET, ids=[c[0] for c in QUIET])
def test_no_numpy_warning_escapes(case, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = case[1](backend)
    assert not np.isfinite(y).all()        # the NaN/Inf is the result, as in torch


# ---------------------------------------------------------------- near float32 max
BIG = np.array([[3e38, -3e38, 3e38, -3e38], [3e38, -3e38, -3e38, -3e38]], np.float32)


def _exact_rows(x, rms=False):
    """The float64 result of the formula (x - mean) / sqrt(var + eps) on rows of x
    (eps = 1e-5; rms_norm's default eps is float32's eps), and its error bound: see
    test_float32_near_its_maximum."""
    eps = float(np.finfo(np.float32).eps) if rms else 1e-5
    x = x.astype(np.float64)
    mean = 0.0 if rms else x.mean(axis=-1, keepdims=True)
    var = (x * x if rms else (x - mean) ** 2).mean(axis=-1, keepdims=True)
    want = (x - mean) / np.sqrt(var + eps)
    # the float32 output bound of the case table (statistics from 4 or 8 values, 8 u32
    # of the output) plus the subnormal scale: rstd ~ 3e-39 held in float32 is off by up
    # to half its spacing, 2**-150 absolute, which |x - mean| multiplies (w = 1)
    sub = float(np.finfo(np.float32).smallest_subnormal) / 2
    bound = K.bound_normalized(x, -1, eps, None, None, np.float32, rms=rms) + sub * np.abs(
        x - mean)
    return want, bound


NEAR_MAX = [   # (id, call on BIG (2, 4) -> (2, 4), the rows its statistics reduce)
    ("ln", lambda be: nk.layer_norm(BIG, 4, backend=be), BIG, False),
    ("rms", lambda be: nk.rms_norm(BIG, 4, backend=be), BIG, True),
    ("bn-last", lambda be: nk.batch_norm(BIG.T.copy(), None, None, training=True,
                                         backend=be).T, BIG, False),
    ("bn-first", lambda be: nk.batch_norm(BIG.reshape(2, 1, 4), None, None,
                                          training=True, backend=be).reshape(2, 4),
     BIG.reshape(1, 8), False),
    ("gn", lambda be: nk.group_norm(BIG.reshape(2, 2, 2), 1, backend=be).reshape(2, 4),
     BIG, False),
    ("gn-last", lambda be: nk.group_norm(BIG.reshape(2, 2, 2), 1, axis=-1,
                                         backend=be).reshape(2, 4), BIG, False),
    ("in", lambda be: nk.instance_norm(BIG.reshape(2, 1, 4), backend=be).reshape(2, 4),
     BIG, False),
]


@pytest.mark.parametrize("case", NEAR_MAX, ids=[c[0] for c in NEAR_MAX])
def test_float32_near_its_maximum(case, backend):
    """Every backend matches the float64 formula where the result is representable.

    Tolerance (_exact_rows): the per-channel scale 1/std (~3e-39) is a float32
    subnormal when the kernels get it, with a spacing of 2**-149 = 1.4e-45, so it is
    off by up to 2**-150 absolute, i.e. 2**-150 |x - mean| (<= 3.2e-7 here) in the
    output; plus K.bound_normalized's float32 output bound (8 u32 of |y| and the
    float64 statistics' errors).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = case[1](backend)
    assert np.isfinite(got).all()
    want, bound = _exact_rows(case[2], rms=case[3])
    K.assert_within(got.astype(np.float64), want.reshape(2, 4), bound.reshape(2, 4),
                    case[0])
