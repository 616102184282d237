"""Hard data: float32 with |mean| >> std, constants, tiny spreads.

The error of each backend against a float64 truth must be no worse than torch's
on the same float32 data (plus a float32-rounding floor), for outputs, statistics
and gradients. These are the cases where E[x^2] - E[x]^2 or an uncentered backward
lose every digit.
"""
import numpy as np
import pytest

import normkit as nk
from normkit.backends import numpy_ref

import _cases as K

torch = pytest.importorskip("torch")
TF = torch.nn.functional
BACKENDS = K.BACKENDS


def _floor(truth):
    """The float32 rounding of the last few operations (8 u_32 of the largest value):
    the error no float32 result can avoid, whatever torch achieved."""
    return K.bound_elementwise(np.float32, float(np.max(np.abs(truth))))


def _hard(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "mean1e4_std1":
        return (rng.standard_normal(shape) + 1e4).astype(np.float32)
    if kind == "constant1234":
        return np.full(shape, 1234.0, np.float32)
    if kind == "small_spread":
        return (rng.standard_normal(shape) * 0.01 + 100).astype(np.float32)
    raise ValueError(kind)


KINDS = ["mean1e4_std1", "constant1234", "small_spread"]


def _err(a, truth):
    return float(np.max(np.abs(np.asarray(a, np.float64) - truth)))


def _compare(ours, theirs, truth, what):
    e_ours, e_theirs = _err(ours, truth), _err(theirs, truth)
    assert np.isfinite(e_ours), f"{what}: normkit gave non-finite values"
    assert e_ours <= e_theirs + _floor(truth), \
        f"{what}: normkit error {e_ours:.3g} > torch error {e_theirs:.3g}"


def _truth_call(norm, x64, w, b):
    with nk.use_backend("numpy"):
        return norm(x64, w, b)


CASES = {
    # name: (normkit call, torch call, shape); w/b are float32 arrays of the channel size
    "batch_norm": (lambda x, w, b, **k: nk.batch_norm(x, None, None, w, b, True,
                                                       return_stats=True, **k),
                   lambda t, w, b: TF.batch_norm(t, None, None, w, b, True), (16, 8, 9, 9)),
    "batch_norm_nhwc": (lambda x, w, b, **k: nk.batch_norm(x, None, None, w, b, True, axis=-1,
                                                            return_stats=True, **k),
                        None, (16, 9, 9, 8)),
    "group_norm": (lambda x, w, b, **k: nk.group_norm(x, 4, w, b, return_stats=True, **k),
                   lambda t, w, b: TF.group_norm(t, 4, w, b), (4, 8, 9, 9)),
    "instance_norm": (lambda x, w, b, **k: nk.instance_norm(x, None, None, w, b,
                                                             return_stats=True, **k),
                      lambda t, w, b: TF.instance_norm(t, None, None, w, b), (4, 8, 9, 9)),
    "layer_norm": (lambda x, w, b, **k: nk.layer_norm(x, 8, w, b, return_stats=True, **k),
                   lambda t, w, b: TF.layer_norm(t, (8,), w, b), (64, 8)),
    "layer_norm_long": (lambda x, w, b, **k: nk.layer_norm(x, 4096, w, b, return_stats=True,
                                                            **k),
                        lambda t, w, b: TF.layer_norm(t, (4096,), w, b), (4, 4096)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_no_worse_than_torch(backend, case, kind):
    call, tcall, shape = CASES[case]
    x = _hard(kind, shape)
    c = 4096 if case == "layer_norm_long" else 8
    rng = np.random.default_rng(1)
    w = (rng.random(c) + 0.5).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, rstd = call(x, w, b, backend=backend)
    y64, mean64, rstd64 = call(x.astype(np.float64), w.astype(np.float64),
                               b.astype(np.float64), backend="numpy")
    if tcall is None:   # channels-last: compare with torch on the channels-first copy
        tcall = CASES["batch_norm"][1]
        tx = torch.tensor(np.ascontiguousarray(np.moveaxis(x, -1, 1)), requires_grad=True)
        ty = tcall(tx, torch.tensor(w), torch.tensor(b))
        ty_user = ty.detach().numpy().transpose(0, 2, 3, 1)
        tdy = torch.tensor(np.ascontiguousarray(np.moveaxis(dy, -1, 1)))
    else:
        tx = torch.tensor(x, requires_grad=True)
        ty = tcall(tx, torch.tensor(w), torch.tensor(b))
        ty_user = ty.detach().numpy()
        tdy = torch.tensor(dy)
    _compare(y, ty_user, y64, f"{case}/{kind} output")
    _compare(mean, mean64.astype(np.float32), mean64, f"{case}/{kind} mean")
    # gradients: against the float64 gradient of the float64 computation
    ty.backward(tdy)
    tgx = tx.grad.numpy()
    if case == "batch_norm_nhwc":
        tgx = tgx.transpose(0, 2, 3, 1)
    backward = {
        "batch_norm": lambda d, xx, m, r, ww, be: nk.batch_norm_backward(d, xx, m, r, ww,
                                                                         backend=be),
        "batch_norm_nhwc": lambda d, xx, m, r, ww, be: nk.batch_norm_backward(
            d, xx, m, r, ww, axis=-1, backend=be),
        "group_norm": lambda d, xx, m, r, ww, be: nk.group_norm_backward(d, xx, 4, m, r, ww,
                                                                         backend=be),
        "instance_norm": lambda d, xx, m, r, ww, be: nk.instance_norm_backward(
            d, xx, m, r, ww, backend=be),
        "layer_norm": lambda d, xx, m, r, ww, be: nk.layer_norm_backward(d, xx, 8, m, r, ww,
                                                                         backend=be),
        "layer_norm_long": lambda d, xx, m, r, ww, be: nk.layer_norm_backward(
            d, xx, 4096, m, r, ww, backend=be),
    }[case]
    gx = backward(dy, x, mean, rstd, w, backend)[0]
    gx64 = backward(dy.astype(np.float64), x.astype(np.float64), mean64, rstd64,
                    w.astype(np.float64), "numpy")[0]
    if kind == "constant1234":
        # var = 0: the gradient is scaled by 1/sqrt(eps) ~ 316 and the truth depends on
        # float64 rounding of x - mean == 0; both must simply stay finite and agree.
        assert np.isfinite(gx).all()
    scale = max(1.0, float(np.max(np.abs(gx64))))
    e_ours, e_theirs = _err(gx, gx64) / scale, _err(tgx, gx64) / scale
    # relative to the gradient's scale; the floor: ~10 float32 roundings (dx has ~3x
    # the forward's operations, as in _cases.tol_grad) on values of size 1
    assert e_ours <= e_theirs + 3 * _floor(1.0), \
        f"{case}/{kind} grad_x: normkit {e_ours:.3g} > torch {e_theirs:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_rows_give_zero_not_nan(backend):
    """ONNX Runtime returns NaN for a constant LayerNorm row of 1234; we return bias."""
    x = np.full((3, 768), 1234.0, np.float32)
    b = np.linspace(-1, 1, 768).astype(np.float32)
    y = nk.layer_norm(x, 768, None, b, backend=backend)
    # x - mean == 0 exactly (mean of equal values), so y == bias to its own rounding
    np.testing.assert_allclose(y, np.broadcast_to(b, y.shape), rtol=0,
                               atol=K.bound_elementwise(np.float32, 1.0))
    y = nk.batch_norm(np.full((4, 3, 5, 5), 1234.0, np.float32), training=True,
                      backend=backend)
    assert np.all(y == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_reduction_float32_accuracy(backend):
    """~4e7 values in one channel: float32 accumulation would drift; float64 does not."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 1, 6000, 6000)) * 3 + 1000).astype(np.float32)
    y, mean, rstd = nk.batch_norm(x, None, None, None, None, True, backend=backend,
                                  return_stats=True)
    mean_ref, m2 = numpy_ref.plane_moments(x.reshape(1, -1))
    var_ref = m2[0] / x.size
    # float64 reductions of n = 3.6e7 values (_cases bounds); the statistics come back
    # as float32 (one rounding, u_32) and var = 1 / rstd^2 - eps doubles rstd's error
    flat = x.reshape(1, -1)
    u32 = K.unit_roundoff(np.float32)
    assert abs(float(mean[0]) - mean_ref[0]) <= K.bound_mean(flat, 1)[0] + u32 * abs(mean_ref[0])
    rel_var = K.bound_m2(flat, 1)[0] / m2[0] + 2 * u32 + 4 * K.U64
    assert abs(1 / float(rstd[0]) ** 2 - 1e-5 - var_ref) / var_ref <= 2 * rel_var
