"""BatchNorm(renorm=True): batch renormalization (Ioffe 2017), forward and backward.

Oracles: a NumPy transcription of Keras 3's ``BatchNormalization(renorm=True)`` training
step (for the outputs and the renorm/moving statistics where the conventions overlap),
plain BatchNorm (renorm with rmax=1, dmax=0 is BatchNorm), finite differences with r
and d held constant, and torch autograd with r and d detached (when torch is installed).
"""
import inspect

import _bounds_extra as BX
import _cases as K
import numpy as np
import pytest

import normkit

pytestmark = pytest.mark.filterwarnings("ignore::normkit.UnstableBatchStatisticsWarning")


class KerasRenorm:
    """Keras 3's renorm training step, in NumPy (conventions: Keras's momenta)."""

    def __init__(self, c, momentum, renorm_momentum, eps, clipping):
        self.momentum, self.renorm_momentum, self.eps = momentum, renorm_momentum, eps
        self.clipping = clipping
        self.moving_mean = np.zeros(c)
        self.moving_stddev = np.ones(c)
        self.moving_variance = np.ones(c)
        self.renorm_mean = np.zeros(c)
        self.renorm_stddev = np.ones(c)

    def train_step(self, x, gamma, beta, axes):
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        stddev = np.sqrt(var + self.eps)
        renorm_stddev = np.maximum(self.renorm_stddev, np.sqrt(self.eps))
        r = stddev / renorm_stddev
        d = (mean - self.renorm_mean) / renorm_stddev
        if "rmin" in self.clipping:
            r = np.maximum(r, self.clipping["rmin"])
        if "rmax" in self.clipping:
            r = np.minimum(r, self.clipping["rmax"])
        if "dmax" in self.clipping:
            d = np.clip(d, -self.clipping["dmax"], self.clipping["dmax"])
        g, b = r * gamma, d * gamma + beta
        rm, m = self.renorm_momentum, self.momentum
        self.renorm_mean = self.renorm_mean * rm + mean * (1 - rm)
        self.renorm_stddev = self.renorm_stddev * rm + stddev * (1 - rm)
        self.moving_mean = self.moving_mean * m + mean * (1 - m)
        self.moving_stddev = self.moving_stddev * m + stddev * (1 - m)
        self.moving_variance = np.maximum(self.moving_stddev ** 2 - self.eps, 0)
        shape = [1] * x.ndim
        shape[[i for i in range(x.ndim) if i not in axes][0]] = -1
        return (x - mean.reshape(shape)) / stddev.reshape(shape) * g.reshape(shape) \
            + b.reshape(shape), r, d


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("clipping", [{"rmax": 1.5, "rmin": 0.0, "dmax": 0.5},
                                      {"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}, {}])
def test_matches_keras_renorm_training_steps(axis, clipping):
    rng = np.random.default_rng(0)
    c, eps = 4, 1e-3
    keras = KerasRenorm(c, momentum=0.9, renorm_momentum=0.8, eps=eps, clipping=clipping)
    bn = normkit.BatchNorm(c, eps=eps, momentum=normkit.convert_momentum(0.9, "keras"),
                           axis=axis, dtype=np.float64, renorm=True,
                           renorm_clipping=clipping or None,
                           renorm_momentum=normkit.convert_momentum(0.8, "keras"))
    bn.weight[:] = rng.random(c) + 0.5
    bn.bias[:] = rng.standard_normal(c)
    axes = (0, 2) if axis == 1 else (0, 1)
    # the moving averages blend each step's batch statistics with weights summing to <= 1,
    # so their error is at most the sum over the steps of each step's statistic bound
    # (mean: K.bound_mean; std = sqrt(var + eps): half var's relative bound, K.bound_m2 / n)
    # plus a few float64 roundings of the value per step
    mean_err = std_err = 0.0
    for step in range(6):
        shape = (8, c, 5) if axis == 1 else (8, 5, c)
        x = rng.standard_normal(shape) * (2 + step) + 3 - step
        expected, r, d = keras.train_step(x, bn.weight.copy(), bn.bias.copy(), axes)
        y = bn(x)
        # two float64 computations of a normalization over n = 40 values: the _cases
        # bound with this batch's conditioning; r (<= rmax <= 3) and d scale the output,
        # so the scale is max |y| (and |w|, |b|, 1), times 3 for r's own statistics
        cond = K.conditioning(x.mean(axis=axes), 1 / np.sqrt(x.var(axis=axes) + eps))
        scale = 3 * max(1.0, float(np.abs(expected).max()), float(np.abs(bn.weight).max()),
                        float(np.abs(bn.bias).max()))
        np.testing.assert_allclose(y, expected, err_msg=f"step {step}",
                                   **K.tol_normalized(np.float64, x.size // c, cond, scale))
        rows = np.moveaxis(x, axis, 0).reshape(c, -1)
        sigma = np.sqrt(rows.var(axis=1) + eps)
        mean_err = mean_err + K.bound_mean(rows, 1) + 4 * K.U64 * np.abs(keras.renorm_mean)
        std_err = std_err + BX.bound_merged_var(rows, 1) / (2 * sigma) + 8 * K.U64 * sigma
        K.assert_within(bn.renorm_mean, keras.renorm_mean, mean_err, "renorm_mean")
        K.assert_within(bn.renorm_std, keras.renorm_stddev, std_err, "renorm_std")
        K.assert_within(bn.running_mean, keras.moving_mean, mean_err, "running_mean")
        if clipping.get("rmax") == 1.5 and step == 0:      # the clipping is exercised
            assert np.all(r == 1.5) and np.any(np.abs(d) == 0.5)
    # eval mode: plain BatchNorm with the moving statistics
    bn.eval()
    x = rng.standard_normal((3, c, 5) if axis == 1 else (3, 5, c))
    plain = normkit.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                               eps=eps, axis=axis)
    np.testing.assert_array_equal(bn(x), plain)


def test_running_var_differs_from_keras_by_bessel_when_converged():
    """normkit's running_var averages the unbiased variance; Keras's moving_variance is
    (average of sqrt(var_B + eps))**2 - eps. On a stationary stream both converge, to
    values n / (n - 1) apart."""
    rng = np.random.default_rng(6)
    c, eps = 3, 1e-3
    keras = KerasRenorm(c, momentum=0.5, renorm_momentum=0.5, eps=eps, clipping={})
    bn = normkit.BatchNorm(c, eps=eps, momentum=0.5, dtype=np.float64, renorm=True,
                           renorm_momentum=0.5)
    x = rng.standard_normal((4, c, 5)) * 3 + 1
    n = x.size // c
    for _ in range(60):
        keras.train_step(x, bn.weight.copy(), bn.bias.copy(), (0, 2))
        bn(x)
    # both averages are convex blends of the same batch variance (relative bound
    # BX.bound_merged_var / var, each side), a few float64 roundings per step (60 steps),
    # and the starting value's weight 0.5**60 (the running statistics start at 1)
    rows = np.moveaxis(x, 1, 0).reshape(c, -1)
    var = rows.var(axis=1)
    rtol = float(np.max(2 * BX.bound_merged_var(rows, 1) / var + 2 * 0.5 ** 60
                        * np.abs(var - 1) / var)) + 60 * 8 * K.U64
    np.testing.assert_allclose(bn.running_var * (n - 1) / n, keras.moving_variance, rtol=rtol)
    np.testing.assert_allclose(normkit.conventions.convert_running_var(
        keras.moving_variance, n, "keras"), bn.running_var, rtol=rtol + 8 * K.U64)


def test_unclipped_renorm_with_identity_statistics_is_batch_norm():
    """rmax=1, dmax=0 (the paper's start): exactly BatchNorm, forward and backward."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 7)) * 4 + 2
    dy = rng.standard_normal(x.shape)
    rn = normkit.BatchNorm(3, dtype=np.float64, renorm=True,
                           renorm_clipping={"rmax": 1.0, "dmax": 0.0})
    bn = normkit.BatchNorm(3, dtype=np.float64)
    for layer in (rn, bn):
        layer.weight[:] = [0.5, 1.5, -2.0]
        layer.bias[:] = [1.0, 0.0, 3.0]
    # r = clip(., 1, 1) = 1 and d = clip(., 0, 0) = 0 exactly, but renorm has its own
    # forward/backward (another order of operations): two float64 implementations of the
    # same norm over n = 42 values per channel (K.tol_normalized / K.tol_grad)
    rows = np.moveaxis(x, 1, 0).reshape(3, -1)
    n = rows.shape[1]
    cond = K.conditioning(rows.mean(axis=1), 1 / np.sqrt(rows.var(axis=1) + bn.eps))
    for _ in range(3):
        y = bn(x)
        np.testing.assert_allclose(rn(x), y, **K.tol_normalized(
            np.float64, n, cond, max(3.0, float(np.abs(y).max()))))
        gx = bn.backward(dy)
        np.testing.assert_allclose(rn.backward(dy), gx, **K.tol_grad(
            np.float64, n, cond, max(2.0, float(np.abs(gx).max()))))
        for k in ("weight", "bias"):   # n-term sums of |dy xhat| / |dy|
            terms = np.abs(dy) * (np.abs(y) + 3) if k == "weight" else np.abs(dy)
            scale = float(np.moveaxis(terms, 1, 0).reshape(3, -1).sum(axis=1).max())
            np.testing.assert_allclose(rn.grads[k], bn.grads[k],
                                       **K.tol_grad(np.float64, n, cond, scale))
        # running statistics: the same batch mean / unbiased variance, two implementations
        K.assert_within(rn.running_mean, bn.running_mean,
                        3 * K.bound_mean(rows, 1), "running_mean")
        K.assert_within(rn.running_var, bn.running_var,
                        3 * BX.bound_merged_var(rows, 1) * n / (n - 1) + 8 * K.U64 * bn.running_var,
                        "running_var")
        assert rn.num_batches_tracked == bn.num_batches_tracked     # an integer count


def _renorm_layer(rng, c=3, dtype=np.float64, **kw):
    bn = normkit.BatchNorm(c, dtype=dtype, renorm=True, **kw)
    bn.weight[:] = rng.random(c) + 0.5
    bn.bias[:] = rng.standard_normal(c)
    bn.renorm_mean[:] = rng.standard_normal(c)
    bn.renorm_std[:] = rng.random(c) + 0.5
    return bn


def test_backward_finite_differences_with_r_d_constant():
    rng = np.random.default_rng(2)
    bn = _renorm_layer(rng, renorm_clipping={"rmax": 1.2, "dmax": 0.3})
    x = rng.standard_normal((5, 3, 4)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    state = bn.state_dict()
    bn(x)
    r, d = bn._cache.r, bn._cache.d
    assert np.any(r == 1.2) or np.any(np.abs(d) == 0.3)          # clipping is active
    gx = bn.backward(dy)
    gamma, beta = bn.weight.copy(), bn.bias.copy()

    def loss(x, gamma, beta):        # renorm output with r and d frozen
        mean = x.mean(axis=(0, 2), keepdims=True)
        sigma = np.sqrt(x.var(axis=(0, 2), keepdims=True) + bn.eps)
        xhat = (x - mean) / sigma
        y = (xhat * r[:, None] + d[:, None]) * gamma[:, None] + beta[:, None]
        return np.sum(y * dy)

    # central differences within their derived bound (tests/_bounds_extra.py; the step
    # as in test_gradcheck: float64 loss over 20 values per channel, unit-scale data)
    # plus the analytic gradient's own bound (K.tol_grad)
    rows = np.moveaxis(x, 1, 0).reshape(3, -1)
    n = rows.shape[1]
    cond = K.conditioning(rows.mean(axis=1), 1 / np.sqrt(rows.var(axis=1) + bn.eps))
    sigma = np.sqrt(x.var(axis=(0, 2), keepdims=True) + bn.eps)
    y_ref = ((x - x.mean(axis=(0, 2), keepdims=True)) / sigma * r[:, None] + d[:, None]) \
        * gamma[:, None] + beta[:, None]                 # the output the loss weighs by dy
    h = BX.fd_step(rel_err=6e-14, curvature=1e-2)
    err = BX.loss_error(y_ref, dy, n, cond)
    x = np.ascontiguousarray(x)
    for name, p, got in (("x", x, gx), ("weight", gamma, bn.grads["weight"]),
                         ("bias", beta, bn.grads["bias"])):
        num, fd_bound = BX.central_difference(lambda: loss(x, gamma, beta), p, h, err)
        scale = max(1.0, float(np.abs(got).max()), float(np.abs(y_ref).max()))
        K.assert_within(got, num, fd_bound + K.tol_grad(np.float64, n, cond, scale)["atol"],
                        f"grad_{name}")
    # a layer loaded from the saved state reproduces the same step
    bn2 = normkit.BatchNorm(3, dtype=np.float64, renorm=True,
                            renorm_clipping={"rmax": 1.2, "dmax": 0.3})
    bn2.load_state_dict(state)
    bn3 = normkit.BatchNorm(3, dtype=np.float64, renorm=True,
                            renorm_clipping={"rmax": 1.2, "dmax": 0.3})
    bn3.load_state_dict(state)
    np.testing.assert_array_equal(bn2(x), bn3(x))
    np.testing.assert_array_equal(bn2._cache.r, r)


def test_no_affine_and_float32_channels_last():
    rng = np.random.default_rng(3)
    bn = normkit.BatchNorm(4, affine=False, axis=-1, renorm=True,
                           renorm_clipping={"rmax": 2.0, "dmax": 1.0})
    x = (rng.standard_normal((6, 5, 4)) * 3 + 2).astype(np.float32)
    y = bn(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    gx = bn.backward(np.ones_like(y))
    assert gx.dtype == np.float32 and bn.grads == {}
    # first step: renorm_mean=0, renorm_std=1 -> r = clip(sigma_B, 0.5, 2)
    xm = x.astype(np.float64).mean(axis=(0, 1))
    sd = np.sqrt(x.astype(np.float64).var(axis=(0, 1)) + bn.eps)
    r, d = np.clip(sd, 0.5, 2.0), np.clip(xm, -1, 1)
    # float32 output of a normalization with weight r and bias d against the float64
    # formula: K.bound_normalized (statistics over 30 values, ~6 float32 roundings)
    want = (x - xm) / sd * r + d
    K.assert_within(y, want, K.bound_normalized(x, (0, 1), bn.eps, r, d, np.float32), "y")


def test_torch_autograd_with_detached_corrections():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    bn = _renorm_layer(rng, c=5, dtype=np.float32,
                       renorm_clipping={"rmax": 1.5, "dmax": 0.5})
    x = (rng.standard_normal((4, 5, 3, 3)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mu_r = torch.tensor(bn.renorm_mean.copy())
    sd_r = torch.tensor(bn.renorm_std.copy())
    y = bn(x)
    gx = bn.backward(dy)

    xt = torch.tensor(x, requires_grad=True)
    g = torch.tensor(bn.weight.copy(), requires_grad=True)
    b = torch.tensor(bn.bias.copy(), requires_grad=True)
    mean = xt.mean(dim=(0, 2, 3))
    sigma = torch.sqrt(xt.var(dim=(0, 2, 3), unbiased=False) + bn.eps)
    r = (sigma / sd_r).clamp(1 / 1.5, 1.5).detach()
    d = ((mean - mu_r) / sd_r).clamp(-0.5, 0.5).detach()
    view = (1, -1, 1, 1)
    yt = ((xt - mean.view(view)) / sigma.view(view) * r.view(view) + d.view(view)) \
        * g.view(view) + b.view(view)
    yt.backward(torch.tensor(dy))
    # torch float32 (float32 accumulation) against normkit: K.tol_normalized / K.tol_grad
    # with float32 accumulation, n = 36 values per channel; r <= 1.5 and d scale y
    x64 = x.astype(np.float64)
    n = x.size // 5
    cond = K.conditioning(x64.mean(axis=(0, 2, 3)), 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + bn.eps))
    yt_np = yt.detach().numpy()
    np.testing.assert_allclose(y, yt_np, **K.tol_normalized(
        np.float32, n, cond, max(1.5, float(np.abs(yt_np).max()))))
    np.testing.assert_allclose(gx, xt.grad.numpy(), **K.tol_grad(
        np.float32, n, cond, max(1.5, float(np.abs(xt.grad.numpy()).max()))))
    for name, grad, terms in (("weight", g.grad, np.abs(dy) * (np.abs(yt_np) + 1.5)),
                              ("bias", b.grad, np.abs(dy))):   # n-term sums of these terms
        scale = float(terms.sum(axis=(0, 2, 3)).max())
        np.testing.assert_allclose(bn.grads[name], grad.numpy(), err_msg=name,
                                   **K.tol_grad(np.float32, n, cond, scale))


def test_state_and_options():
    bn = normkit.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 4})
    assert dict(bn.renorm_clipping) == {"rmax": 4.0, "rmin": 0.25, "dmax": np.inf}
    assert bn.renorm_momentum == 0.01
    with pytest.raises(TypeError):
        bn.renorm_clipping["rmax"] = 2                   # read-only: assign a new dict
    bn.renorm_clipping = {"rmax": 2, "dmax": 1}          # relaxing/tightening over time
    assert dict(bn.renorm_clipping) == {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
    assert {"renorm_mean", "renorm_std"} <= set(bn.state_dict())
    x = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32) * 5
    bn(x)
    assert not np.all(bn.renorm_mean == 0)
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.renorm_mean, 0)
    np.testing.assert_array_equal(bn.renorm_std, 1)
    assert bn.num_batches_tracked == 0
    plain = normkit.BatchNorm(3)
    assert not plain.renorm and plain.renorm_clipping is None
    assert "renorm_mean" not in plain.state_dict()
    cumulative = normkit.BatchNorm(3, momentum=None, renorm=True)
    for _ in range(2):
        cumulative(x)
    # float32 running mean of two equal batches: the float64 batch mean (K.bound_mean) and
    # two cumulative-average updates stored in float32 (a few u32 of |mean| each)
    want = x.astype(np.float64).mean(axis=0)
    K.assert_within(cumulative.running_mean, want, K.bound_mean(x, 0) + 16 * 2.0 ** -24
                    * np.abs(want), "cumulative running_mean")


@pytest.mark.parametrize("kwargs,match", [
    ({"renorm_clipping": {"rmax": 0.5, "rmin": 1.0}}, "rmin <= rmax"),
    ({"renorm_clipping": {"dmax": -1}}, "dmax"),
    ({"renorm_clipping": {"r_max": 3}}, "unknown keys"),
    ({"renorm_clipping": {"rmax": "3"}}, "must be a number"),
    ({"renorm_momentum": 1.5}, "renorm_momentum"),
    ({"track_running_stats": False}, "track_running_stats"),
])
def test_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normkit.BatchNorm(3, renorm=True, **kwargs)


def test_training_errors_as_batch_norm():
    bn = normkit.BatchNorm(3, renorm=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm\(3\): expected 3 channels on axis 1, got input of shape \(2, 4\)"):
        bn(np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="int64"):
        bn(np.ones((2, 3), np.int64))


def test_public_signature_unchanged():
    params = list(inspect.signature(normkit.BatchNorm).parameters.values())
    assert [p.name for p in params[:5]] == ["num_features", "eps", "momentum", "affine",
                                            "track_running_stats"]
    new = {p.name: p for p in params[5:]}
    for name in ("renorm", "renorm_clipping", "renorm_momentum"):
        assert new[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert new["renorm"].default is False
