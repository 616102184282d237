"""Layers with 16-bit data (issue 13): float16 / bfloat16 input with parameters in the
input's dtype or in float32 (the autocast layout), against torch's modules in the same
dtypes; state_dict round trips, from_torch / from_onnx of 16-bit models.

Tolerances: ``tol_normalized`` / ``tol_grad`` of tests/_cases.py (dtype eps and
reduction length, both implementations' roundings); the few new derivations are
written next to their use.
"""
from __future__ import annotations

import numpy as np
import pytest
from _cases import np_dtype, tol_grad, tol_normalized, unit_roundoff

import normkit as nk

torch = pytest.importorskip("torch")
# tiny batches on purpose: the layers' small-batch warnings are not what is tested here
pytestmark = pytest.mark.filterwarnings(
    "ignore::normkit.diagnostics.UnstableBatchStatisticsWarning",
    "ignore:Mismatch dtype between input and weight")

HALF = ["float16", "bfloat16"]
PARAMS = ["same", "float32"]          # parameters in x's dtype, or float32 (autocast)
SHAPE = (4, 6, 8)                     # (N, C, L); LayerNorm / RMSNorm over L


def to_torch(a):
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":    # NumPy has no bfloat16: bit for bit through int16
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def to_numpy(t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.numpy()


def bits(a):
    """The bytes of an array (0-d included), to compare values bit for bit."""
    return np.atleast_1d(np.asarray(a)).view(np.uint8)


def torch_dtype(dt):
    return getattr(torch, np_dtype(dt).name)


# (torch module factory, normkit layer factory, values reduced per statistic)
LAYERS = {
    "batch": (lambda d: torch.nn.BatchNorm1d(6, dtype=d),
              lambda d, b=None: nk.BatchNorm(6, dtype=d, backend=b), SHAPE[0] * SHAPE[2]),
    "instance": (lambda d: torch.nn.InstanceNorm1d(6, affine=True, track_running_stats=True,
                                                   dtype=d),
                 lambda d, b=None: nk.InstanceNorm(6, affine=True, track_running_stats=True,
                                              dtype=d, backend=b),
                 SHAPE[2]),
    "group": (lambda d: torch.nn.GroupNorm(2, 6, dtype=d),
              lambda d, b=None: nk.GroupNorm(2, 6, dtype=d, backend=b), 3 * SHAPE[2]),
    "layer": (lambda d: torch.nn.LayerNorm(SHAPE[2], dtype=d),
              lambda d, b=None: nk.LayerNorm(SHAPE[2], dtype=d, backend=b), SHAPE[2]),
    "rms": (lambda d: torch.nn.RMSNorm(SHAPE[2], dtype=d),
            lambda d, b=None: nk.RMSNorm(SHAPE[2], dtype=d, backend=b), SHAPE[2]),
}


def pair(kind, xdt, params, seed=0, backend=None):
    """A torch module and a normkit layer with the same (random) 16-bit-exact
    parameters, in the parameter dtype of the case."""
    pdt = np_dtype(xdt) if params == "same" else np.dtype(np.float32)
    make_t, make_n, n = LAYERS[kind]
    tm = make_t(torch_dtype(pdt))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tm.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    layer = make_n(pdt, backend)
    layer.load_state_dict(tm.state_dict())
    return tm, layer, n


def data(xdt, seed=1):
    x = np.random.default_rng(seed).standard_normal(SHAPE) * 2 + 0.5
    return x.astype(np_dtype(xdt))


def assert_close(got, want, tol, what):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != torch's {want.dtype}"
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                               err_msg=what, **tol)


@pytest.mark.parametrize("backend", nk.available_backends())
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("xdt", HALF)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_train_forward_backward_vs_torch(kind, xdt, params, backend):
    tm, layer, n = pair(kind, xdt, params, backend=backend)
    x = data(xdt)
    xt = to_torch(x).requires_grad_(True)
    yt = tm(xt)
    y = layer(x)
    w = np.abs(to_numpy(tm.weight).astype(np.float64)).max()
    xs = x.astype(np.float64)
    cond = 1 + abs(xs.mean()) / xs.std() + 1       # centred-ish data, mean/std <= 1
    scale = max(1.0, float(np.abs(to_numpy(yt).astype(np.float64)).max()), 2 * w)
    assert_close(y, to_numpy(yt), tol_normalized(xdt, n, cond, scale), "y")

    dy = np.random.default_rng(2).standard_normal(SHAPE).astype(np_dtype(xdt))
    yt.backward(to_torch(dy))
    dx = layer.backward(dy)
    # tol_grad's scale for dx: rstd max|dy w| (1 + max|xhat|^2); xhat^2 <= n
    rstd = 1 / xs.std()
    gscale = rstd * np.abs(dy.astype(np.float64)).max() * w * (1 + n)
    assert_close(dx, to_numpy(xt.grad), tol_grad(xdt, n, cond, gscale), "dx")
    # dweight / dbias sum over the other axes: scale = sum |dy| (1 + |xhat|) of a
    # channel, bounded by (values per channel) max|dy| (1 + sqrt(n))
    per_channel = dy.size // tm.weight.numel()
    wscale = per_channel * np.abs(dy.astype(np.float64)).max() * (1 + np.sqrt(n))
    for name, p in tm.named_parameters():
        got = layer.grads[name]
        assert got.dtype == np_dtype(to_numpy(p).dtype), name
        assert_close(got, to_numpy(p.grad), tol_grad(xdt, per_channel, cond, wscale), name)

    for name, buf in tm.named_buffers():
        if name == "num_batches_tracked":
            assert int(layer.state_dict()[name]) == int(buf)
            continue
        got = layer.state_dict()[name]
        want = to_numpy(buf)
        assert got.dtype == want.dtype, name       # updated in their own dtype
        # (1 - m) r + m s, rounded once to the buffer's dtype on each side: 2 ulp of the
        # result plus the statistic's own error (tol_normalized with scale |r| + |s|)
        u = unit_roundoff(want.dtype)
        mag = np.abs(want.astype(np.float64)).max() + 1
        tol = tol_normalized(xdt, n, cond, mag)
        tol["atol"] += 4 * u * mag
        assert_close(got, want, tol, name)


@pytest.mark.parametrize("backend", nk.available_backends())
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("xdt", HALF)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_eval_forward_backward_vs_torch(kind, xdt, params, backend):
    tm, layer, n = pair(kind, xdt, params, seed=3, backend=backend)
    if any(True for _ in tm.buffers()):     # give the running statistics non-trivial values
        tm(to_torch(data(xdt, seed=4)))
        layer.load_state_dict(tm.state_dict())
    tm.eval()
    layer.eval()
    x = data(xdt)
    xt = to_torch(x).requires_grad_(True)
    yt = tm(xt)
    y = layer(x)
    w = np.abs(to_numpy(tm.weight).astype(np.float64)).max()
    scale = max(1.0, float(np.abs(to_numpy(yt).astype(np.float64)).max()), 2 * w)
    xs = x.astype(np.float64)
    cond = 1 + abs(xs.mean()) / xs.std() + 1
    assert_close(y, to_numpy(yt), tol_normalized(xdt, n, cond, scale), "y")
    dy = np.ones(SHAPE, np_dtype(xdt))
    yt.backward(to_torch(dy))
    dx = layer.backward(dy)
    gscale = w * (1 + n) / xs.std()
    assert_close(dx, to_numpy(xt.grad), tol_grad(xdt, n, cond, gscale), "dx")


@pytest.mark.parametrize("xdt", HALF)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_state_dict_round_trip_is_bit_exact(kind, xdt):
    tm, layer, _ = pair(kind, xdt, "same", seed=5)
    if any(True for _ in tm.buffers()):
        layer(data(xdt))                     # running statistics moved off 0 / 1
    sd = layer.state_dict()
    fresh = LAYERS[kind][1](np_dtype(xdt))
    fresh.load_state_dict(sd)
    for name, value in fresh.state_dict().items():
        assert value.dtype == sd[name].dtype, name
        np.testing.assert_array_equal(bits(value), bits(sd[name]), name)
    # and through torch: normkit -> torch module -> normkit, bits unchanged
    tm.load_state_dict({k: to_torch(v) for k, v in sd.items()})
    back = nk.from_torch(tm)
    assert back.dtype == np_dtype(xdt)
    for name, value in back.state_dict().items():
        np.testing.assert_array_equal(bits(value), bits(sd[name]), name)


@pytest.mark.parametrize("xdt", HALF)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_from_torch_keeps_16_bit_modules_16_bit(kind, xdt):
    tm, _, n = pair(kind, xdt, "same", seed=6)
    layer = nk.from_torch(tm.eval())
    assert layer.dtype == np_dtype(xdt)
    for name, value in tm.state_dict().items():
        got = layer.state_dict()[name]
        want = to_numpy(value)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(bits(got), bits(want), name)
    x = data(xdt)
    y, yt = layer(x), to_numpy(tm(to_torch(x)))
    scale = max(1.0, float(np.abs(yt.astype(np.float64)).max()))
    assert_close(y, yt, tol_normalized(xdt, n, 3.0, scale), "y")


def test_layer_dtype_argument_is_checked():
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16"):
        nk.LayerNorm(4, dtype=np.int16)
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16"):
        nk.BatchNorm(4, dtype="not a dtype")


@pytest.mark.parametrize("xdt", HALF)
def test_cumulative_running_stats_stay_16_bit(xdt):
    """momentum=None (cumulative average) over several steps: the running statistics
    stay in the 16-bit dtype and follow torch's 16-bit module. Each step rounds once
    on each side (<= 1 ulp each) on top of the statistic's own error, and earlier
    differences are carried with weight <= 1: after k steps, 2 k ulps + k stat bounds."""
    dt = np_dtype(xdt)
    tm = torch.nn.BatchNorm1d(6, momentum=None, dtype=torch_dtype(dt))
    layer = nk.BatchNorm(6, momentum=None, dtype=dt)
    steps, n = 4, SHAPE[0] * SHAPE[2]
    for k in range(steps):
        x = data(xdt, seed=10 + k)
        tm(to_torch(x))
        layer(x)
    u = unit_roundoff(dt)
    for name in ("running_mean", "running_var"):
        got, want = layer.state_dict()[name], to_numpy(getattr(tm, name))
        assert got.dtype == want.dtype == dt, name
        mag = np.abs(want.astype(np.float64)).max() + 1
        tol = tol_normalized(xdt, n, 3.0, mag)
        tol["atol"] = steps * (tol["atol"] + 2 * 2 * u * mag)   # 2 ulps <= 2 * 2u |r|
        assert_close(got, want, tol, name)
    assert int(layer.state_dict()["num_batches_tracked"]) == steps
