"""Backward passes against central finite differences, in float64, without torch.

For every norm, the functional ``*_backward`` and the layer ``.backward()`` / ``.grads``
are checked on the loss ``L = sum(y * g)`` with a fixed random projection ``g``
(so ``grad_out = g``): ``grad_x``, ``grad_weight`` and ``grad_bias`` must match
``(L(p + h) - L(p - h)) / 2h`` for every element ``p`` of x, weight and bias.

Covered: training and eval modes where the gradient differs (BatchNorm eval uses
fixed running statistics, InstanceNorm ``use_input_stats=False`` likewise; a BatchNorm
without running statistics uses batch statistics in eval too), channel axis 1 and -1
(and a channel axis in the middle for the per-sample norms), BatchNorm on (N, C),
one- and two-axis ``normalized_shape``, affine on and off. Without affine the
functional backward still returns grad_weight / grad_bias, which must then equal the
gradient with respect to a weight of ones and a bias of zeros.
"""
import _bounds_extra as BX
import _cases as K
import numpy as np
import pytest

import normkit

# The tiny batches used here are (rightly) reported as unreliable statistics by the
# diagnostics; that is tested elsewhere and irrelevant to gradients.
pytestmark = pytest.mark.filterwarnings("ignore::normkit.UnstableBatchStatisticsWarning")

# Step balancing truncation against rounding (BX.fd_step): BX.loss_error of these
# float64 losses is ~6e-14 of sum|y g| (n <= 60 values, cond ~ 1.5), and their third
# derivative is ~1e-2 of L (unit-scale data x ~ 0.7 +- 1.5, weights ~ 1): h = 2**-12
H = BX.fd_step(rel_err=6e-14, curvature=1e-2)
EPS = 1e-3   # large enough that eps placement matters in the gradient


def check_grad(analytic, loss, arr, y, g, n, cond, what):
    """analytic == central differences of loss() w.r.t. arr, within the finite-difference
    bound (truncation by Richardson, rounding of L and of p +- h: BX.central_difference)
    plus the analytic gradient's own float64 error (K.tol_grad over n-value reductions
    of data with conditioning cond, terms <= scale)."""
    num, fd_bound = BX.central_difference(loss, arr, H, BX.loss_error(y, g, n, cond))
    scale = max(1.0, float(np.abs(analytic).max()), float(np.abs(y).max()))
    bound = fd_bound + K.tol_grad(np.float64, n, cond, scale)["atol"]
    K.assert_within(analytic, num, bound, what)


def _cond_n(x, mean, rstd):
    """Conditioning of the statistics (K.conditioning) and the reduction length."""
    return K.conditioning(mean, rstd), x.size // np.size(rstd)


def _x(rng, shape):
    # mean offset and non-unit spread: the mean/variance terms of the gradient matter
    return rng.standard_normal(shape) * 1.5 + 0.7


def _channels_shape(axis):
    """4-D (N, C, spatial...) with C = 4 on ``axis`` (1, 2 or -1); 48 elements."""
    shape = [3, 2, 2]
    shape.insert(axis % 4, 4)
    return tuple(shape)


# ------------------------------------------------------------------ functional cases
def _functional_case(kind, mode, axis, rng, backend):
    """x shape, parameter shape, forward(x, w, b) and backward(g, x, w, b)."""
    if kind in ("layer", "rms"):
        shape = (3, 4, 5)
        ns = shape[-axis:]                      # axis = number of normalized axes here
        pshape = ns
        if kind == "layer":
            def fwd(x, w, b, stats=False):
                return normkit.layer_norm(x, ns, w, b, EPS, backend=backend,
                                          return_stats=stats)

            def bwd(g, x, w, b):
                _, mean, rstd = fwd(x, w, b, stats=True)
                return normkit.layer_norm_backward(g, x, ns, mean, rstd, w, backend=backend)
        else:
            def fwd(x, w, b, stats=False):
                return normkit.rms_norm(x, ns, w, EPS, backend=backend, return_stats=stats)

            def bwd(g, x, w, b):
                _, mean, rstd = fwd(x, w, b, stats=True)
                assert mean is None
                return normkit.rms_norm_backward(g, x, ns, mean, rstd, w, backend=backend)
        return shape, pshape, fwd, bwd

    shape = (5, 3) if axis == "2d" else _channels_shape(axis)
    ax = 1 if axis == "2d" else axis
    c = shape[ax]
    pshape = (c,)
    if kind == "batch":
        training = mode == "train"
        rmean = rng.standard_normal(c)
        rvar = rng.uniform(0.5, 2.0, c)

        def fwd(x, w, b, stats=False):
            if training:   # no running statistics: nothing is updated between calls
                return normkit.batch_norm(x, None, None, w, b, True, 0.1, EPS, axis=ax,
                                          backend=backend, return_stats=stats)
            return normkit.batch_norm(x, rmean, rvar, w, b, False, 0.1, EPS, axis=ax,
                                      backend=backend, return_stats=stats)

        def bwd(g, x, w, b):
            _, mean, rstd = fwd(x, w, b, stats=True)
            return normkit.batch_norm_backward(g, x, mean, rstd, w, training=training,
                                               axis=ax, backend=backend)
    elif kind == "instance":
        use_input_stats = mode == "train"
        rmean = rng.standard_normal(c)
        rvar = rng.uniform(0.5, 2.0, c)

        def fwd(x, w, b, stats=False):
            if use_input_stats:
                return normkit.instance_norm(x, None, None, w, b, True, 0.1, EPS, axis=ax,
                                             backend=backend, return_stats=stats)
            return normkit.instance_norm(x, rmean, rvar, w, b, False, 0.1, EPS, axis=ax,
                                         backend=backend, return_stats=stats)

        def bwd(g, x, w, b):
            _, mean, rstd = fwd(x, w, b, stats=True)
            return normkit.instance_norm_backward(g, x, mean, rstd, w,
                                                  use_input_stats=use_input_stats,
                                                  axis=ax, backend=backend)
    elif kind == "group":
        groups = 2

        def fwd(x, w, b, stats=False):
            return normkit.group_norm(x, groups, w, b, EPS, axis=ax, backend=backend,
                                      return_stats=stats)

        def bwd(g, x, w, b):
            _, mean, rstd = fwd(x, w, b, stats=True)
            return normkit.group_norm_backward(g, x, groups, mean, rstd, w, axis=ax,
                                               backend=backend)
    else:
        raise AssertionError(kind)
    return shape, pshape, fwd, bwd


FUNCTIONAL = (
    [("batch", m, a) for m in ("train", "eval") for a in (1, -1, 2, "2d")]
    + [("instance", m, a) for m in ("train", "eval") for a in (1, -1, 2)]
    + [("group", "train", a) for a in (1, -1, 2)]
    + [("layer", "train", k) for k in (1, 2)]      # k = number of normalized axes
    + [("rms", "train", k) for k in (1, 2)]
)


def _fid(p):
    kind, mode, axis = p
    where = f"ns{axis}" if kind in ("layer", "rms") else f"axis{axis}"
    return f"{kind}-{mode}-{where}"


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("kind,mode,axis", FUNCTIONAL, ids=[_fid(p) for p in FUNCTIONAL])
def test_functional_backward(kind, mode, axis, affine, backend, rng):
    shape, pshape, fwd, bwd = _functional_case(kind, mode, axis, rng, backend)
    x = _x(rng, shape)
    g = rng.standard_normal(shape)
    has_bias = kind != "rms"
    w = rng.uniform(0.5, 1.5, pshape) * rng.choice([-1.0, 1.0], pshape) if affine else None
    b = rng.standard_normal(pshape) if (affine and has_bias) else None
    x0, g0 = x.copy(), g.copy()

    gx, gw, gb = bwd(g, x, w, b)
    np.testing.assert_array_equal(x, x0)          # backward does not modify its inputs
    np.testing.assert_array_equal(g, g0)
    assert gx.shape == x.shape and gx.dtype == np.float64
    assert gw.shape == pshape and gb.shape == pshape

    # without affine, the gradients are those w.r.t. weight = 1 and bias = 0
    w_eff = w if w is not None else np.ones(pshape)
    b_eff = b if b is not None else np.zeros(pshape)
    if not affine:
        # weight 1 and bias 0 make every multiply by w and add of b exact (also when
        # fused into an FMA), and the statistics do not depend on them: equal up to the
        # elementwise bound of the rest of the pass (a None weight may take another
        # kernel, formed in another order)
        y_none = fwd(x, None, None)
        K.assert_within(y_none, fwd(x, w_eff, b_eff if has_bias else None),
                        K.bound_elementwise(np.float64, y_none), "affine=None vs ones/zeros")
    b_arg = b_eff if has_bias else None
    y, mean, rstd = fwd(x, w_eff, b_arg, stats=True)
    cond, n = _cond_n(x, mean, rstd)

    def loss():
        return float(np.sum(fwd(x, w_eff, b_arg) * g))

    check_grad(gx, loss, x, y, g, n, cond, "grad_x")
    check_grad(gw, loss, w_eff, y, g, n, cond, "grad_weight")
    if has_bias:
        check_grad(gb, loss, b_eff, y, g, n, cond, "grad_bias")
    else:   # documented: RMSNorm has no bias; grad_bias is sum(grad_out) over rows
        rows = g.reshape(-1, *pshape)
        # a float64 sum over the rows (K.bound_sum: both sides' 2 gamma(rows))
        K.assert_within(gb, rows.sum(axis=0),
                        K.bound_sum(np.abs(rows).sum(axis=0), rows.shape[0]), "grad_bias")
    if kind in ("batch", "instance") and mode == "eval":
        # fixed statistics: dx = weight * rstd * dy exactly, no mean/variance terms
        assert not np.allclose(gx, 0)


# ------------------------------------------------------------------ layers
def _layer(kind, variant, axis, affine, backend):
    dt = np.float64
    if kind == "batch":
        return normkit.BatchNorm(4 if axis != "2d" else 3, eps=EPS, affine=affine,
                                 track_running_stats=(variant != "notrack"),
                                 axis=1 if axis == "2d" else axis, dtype=dt, backend=backend)
    if kind == "instance":
        return normkit.InstanceNorm(4, eps=EPS, affine=affine,
                                    track_running_stats=(variant != "notrack"), axis=axis,
                                    dtype=dt, backend=backend)
    if kind == "group":
        return normkit.GroupNorm(2, 4, eps=EPS, affine=affine, axis=axis, dtype=dt,
                                 backend=backend)
    ns = (3, 4, 5)[-axis:]
    if kind == "layer":
        return normkit.LayerNorm(ns, eps=EPS, elementwise_affine=affine,
                                 bias=(variant != "nobias"), dtype=dt, backend=backend)
    if kind == "rms":
        return normkit.RMSNorm(ns, eps=EPS, elementwise_affine=affine, dtype=dt,
                               backend=backend)
    raise AssertionError(kind)


# (kind, variant, mode, axis): variant "notrack" = no running statistics
LAYERS = (
    [("batch", "track", m, a) for m in ("train", "eval") for a in (1, -1, "2d")]
    + [("batch", "notrack", "eval", 1)]
    + [("instance", "track", m, a) for m in ("train", "eval") for a in (1, -1)]
    + [("instance", "notrack", "eval", -1)]
    + [("group", "-", m, a) for m in ("train", "eval") for a in (1, -1)]
    + [("layer", "-", "train", k) for k in (1, 2)] + [("layer", "nobias", "eval", 1)]
    + [("rms", "-", m, k) for m, k in (("train", 1), ("eval", 2))]
)


def _lid(p):
    kind, variant, mode, axis = p
    where = f"ns{axis}" if kind in ("layer", "rms") else f"axis{axis}"
    return f"{kind}-{variant}-{mode}-{where}"


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("kind,variant,mode,axis", LAYERS, ids=[_lid(p) for p in LAYERS])
def test_layer_backward(kind, variant, mode, axis, affine, backend, rng):
    layer = _layer(kind, variant, axis, affine, backend)
    if kind in ("layer", "rms"):
        shape = (3, 4, 5)
    elif axis == "2d":
        shape = (5, 3)
    else:
        shape = _channels_shape(axis)
    params = layer.parameters()
    assert set(params) == ({"weight", "bias"} if affine else set()) - (
        {"bias"} if kind == "rms" or variant == "nobias" else set())
    for name, p in params.items():   # live arrays: in-place changes reach the layer
        p[...] = (rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1.0, 1.0], p.shape)
                  if name == "weight" else rng.standard_normal(p.shape))
    if getattr(layer, "running_mean", None) is not None:
        layer.running_mean[...] = rng.standard_normal(layer.running_mean.shape)
        layer.running_var[...] = rng.uniform(0.5, 2.0, layer.running_var.shape)
    layer.train(mode == "train")
    assert layer.training == (mode == "train")

    x = _x(rng, shape)
    g = rng.standard_normal(shape)
    y = layer(x)
    assert y.shape == x.shape
    gx = layer.backward(g)
    grads = layer.grads
    assert set(grads) == set(params)
    for name in grads:
        assert grads[name].shape == params[name].shape

    cache = layer._cache          # (x, mean, rstd, ...) or, for RMSNorm, (x, rstd)
    mean, rstd = (None, cache[1]) if kind == "rms" else (cache[1], cache[2])
    cond, n = _cond_n(x, mean, rstd)

    def loss():
        return float(np.sum(layer(x) * g))

    check_grad(gx, loss, x, y, g, n, cond, "grad_x")
    for name, p in params.items():
        check_grad(grads[name], loss, p, y, g, n, cond, f"grad_{name}")

    # grads are set afresh, not accumulated (that would double them): a second
    # forward/backward agrees within the bound of two evaluations of the gradient
    # (K.tol_grad; the threads may merge partial sums in another order)
    layer(x)
    gx2 = layer.backward(g)
    for name, new, old in [("grad_x", gx2, gx)] + [(k, layer.grads[k], grads[k]) for k in grads]:
        scale = max(1.0, float(np.abs(old).max()), float(np.abs(y).max()))
        np.testing.assert_allclose(new, old, err_msg=name,
                                   **K.tol_grad(np.float64, n, cond, scale))


def test_eval_gradient_differs_from_train(backend, rng):
    """Sanity of the mode handling itself: BatchNorm's train and eval gradients differ
    (eval has no mean/variance terms), so the eval cases above test something else."""
    x = _x(rng, (3, 4, 2, 2))
    g = rng.standard_normal(x.shape)
    layer = normkit.BatchNorm(4, dtype=np.float64, backend=backend)
    layer.running_mean[...] = x.mean(axis=(0, 2, 3))
    layer.running_var[...] = x.var(axis=(0, 2, 3))
    layer.train()
    layer(x)
    g_train = layer.backward(g)
    layer.eval()
    layer(x)
    g_eval = layer.backward(g)
    # the eval gradient is weight * rstd * g per channel, with the running variance
    # (which the training step above has just updated in place)
    rstd = 1 / np.sqrt(layer.running_var + layer.eps)
    # (a few float64 roundings each: rstd from var + eps, its product with w and g)
    want = g * rstd[None, :, None, None]
    K.assert_within(g_eval, want, K.bound_elementwise(np.float64, want), "eval gradient")
    # the training gradient sums to zero over each channel (the mean term), eval does not:
    # a 12-term float64 sum of gradients each within K.tol_grad (n = 12 values per channel,
    # centred data: cond from the batch statistics) of exact
    sums = g_train.sum(axis=(0, 2, 3))
    cond = K.conditioning(x.mean(axis=(0, 2, 3)), 1 / np.sqrt(x.var(axis=(0, 2, 3)) + layer.eps))
    scale = max(1.0, float(np.abs(g_train).max()))
    zero_bound = (K.bound_sum(np.abs(g_train).sum(axis=(0, 2, 3)), 12)
                  + 12 * K.tol_grad(np.float64, 12, cond, scale)["atol"])
    K.assert_within(sums, np.zeros(4), zero_bound, "sum of the training gradient")
    assert np.abs(g_eval.sum(axis=(0, 2, 3))).max() > 1e6 * zero_bound.max()
