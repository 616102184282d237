"""Layer objects against torch.nn modules: modes, running statistics, state_dict, grads."""
import numpy as np
import pytest

import normkit as nk

import _cases as K
from _cases import BACKENDS

torch = pytest.importorskip("torch")
C = 6
EPS = 1e-5                      # torch's and normkit's default eps


def _torch_layer(kind, ndim, **kw):
    if kind == "batch":
        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[ndim]
    else:
        cls = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d,
               5: torch.nn.InstanceNorm3d}[ndim]
    return cls(C, **kw).double()


def _data(shape, seed):
    return K.make(shape, np.float64, "normal", seed=seed)


def _tols(rows, dy_rows, w_max=1.0, b_max=0.0, rms=False):
    """``assert_allclose`` kwargs for y, dx and the parameter grads of a float64 norm
    computed by normkit and by torch, from K.tol_normalized / K.tol_grad: ``rows`` (R, n)
    holds the values of each statistic, ``dy_rows`` the upstream gradient alike; the
    conditioning comes from the statistics, the scales from |y| <= |w| |xhat| + |b|, dx's
    rstd |g| (1 + xhat^2) and the grads' sums of |dy xhat| and |dy| (all values: an
    upper bound of each parameter's sum)."""
    n = rows.shape[1]
    mean = 0.0 if rms else rows.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((rows - mean) ** 2).mean(axis=1, keepdims=True) + EPS)
    cond = K.conditioning(None if rms else mean, rstd)
    xhat = np.abs((rows - mean) * rstd)
    y = dict(K.tol_normalized(np.float64, n, cond, max(1.0, w_max * xhat.max() + b_max)))
    dx_scale = float(rstd.max()) * np.abs(dy_rows).max() * w_max * (1 + xhat.max() ** 2)
    grad_scale = max(np.abs(dy_rows * xhat).sum(), np.abs(dy_rows).sum(), dx_scale, 1.0)
    return dict(y=y, dx=K.tol_grad(np.float64, n, cond, max(1.0, dx_scale)),
                grads=K.tol_grad(np.float64, rows.size, cond, grad_scale))


def _bn_rows(x):
    """(C, values per channel) of a channels-first array."""
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def _running_bound(bound, rows, running_mean, running_var):
    """Add one training step to the running-statistics bounds (mean, var): the batch
    mean within K.bound_mean, the unbiased variance within K.bound_m2 / (n - 1), the
    blend a few roundings (4 u64 of the result); the momentum factors are <= 1."""
    n = rows.shape[1]
    return (bound[0] + K.bound_mean(rows, 1) + 4 * K.U64 * np.abs(running_mean),
            bound[1] + K.bound_m2(rows, 1) / (n - 1) + 4 * K.U64 * np.abs(running_var))


SHAPES = {2: (9, C), 3: (4, C, 7), 4: (3, C, 5, 4), 5: (2, C, 3, 2, 3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("axis", [1, -1])
def test_batch_norm_layer_matches_torch(backend, momentum, ndim, axis):
    t = _torch_layer("batch", ndim, momentum=momentum)
    layer = nk.BatchNorm(C, momentum=momentum, axis=axis, dtype=np.float64, backend=backend)
    with torch.no_grad():
        t.weight.copy_(torch.linspace(0.5, 2, C, dtype=torch.float64))
        t.bias.copy_(torch.linspace(-1, 1, C, dtype=torch.float64))
    layer.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
    run_bound = (0.0, 0.0)
    for step in range(4):
        x = _data(SHAPES[ndim], step)
        xu = np.moveaxis(x, 1, -1).copy() if axis == -1 else x
        tx = torch.tensor(x, requires_grad=True)
        ty = t(tx)
        y = layer(xu)
        dy = _data(SHAPES[ndim], 100 + step)
        tol = _tols(_bn_rows(x), _bn_rows(dy), w_max=2.0, b_max=1.0)
        np.testing.assert_allclose(np.moveaxis(y, -1, 1) if axis == -1 else y,
                                   ty.detach().numpy(), **tol["y"])
        ty.backward(torch.tensor(dy))
        gx = layer.backward(np.moveaxis(dy, 1, -1).copy() if axis == -1 else dy)
        np.testing.assert_allclose(np.moveaxis(gx, -1, 1) if axis == -1 else gx,
                                   tx.grad.numpy(), **tol["dx"])
        np.testing.assert_allclose(layer.grads["weight"], t.weight.grad.numpy(),
                                   **tol["grads"])
        np.testing.assert_allclose(layer.grads["bias"], t.bias.grad.numpy(), **tol["grads"])
        t.weight.grad = t.bias.grad = None     # normkit sets grads afresh: no accumulation
        run_bound = _running_bound(run_bound, _bn_rows(x), layer.running_mean,
                                   layer.running_var)
    assert layer.num_batches_tracked == int(t.num_batches_tracked) == 4
    K.assert_within(layer.running_mean, t.running_mean.numpy(), run_bound[0], "running_mean")
    K.assert_within(layer.running_var, t.running_var.numpy(), run_bound[1], "running_var")
    # eval mode uses the running statistics; backward in eval mode too
    t.eval()
    layer.eval()
    assert not layer.training
    x = _data(SHAPES[ndim], 9)
    tx = torch.tensor(x, requires_grad=True)
    ty = t(tx)
    y = layer(np.moveaxis(x, 1, -1).copy() if axis == -1 else x)
    # eval: an elementwise affine map with the running statistics, which agree with
    # torch's within run_bound; y = (x - rm) w / sqrt(rv + eps) + b moves by
    # |w| (d_rm rstd + |x - rm| rstd^3 d_rv / 2), plus a few roundings of |y|
    rstd = 1 / np.sqrt(layer.running_var + EPS)
    xc = np.abs(_bn_rows(x) - layer.running_mean[:, None])
    y_bound = (2.0 * (run_bound[0][:, None] * rstd[:, None]
                      + xc * rstd[:, None] ** 3 * run_bound[1][:, None] / 2)
               + K.bound_elementwise(np.float64, 2.0 * xc * rstd[:, None], 1.0))
    y_bound = np.moveaxis(y_bound.reshape((C, x.shape[0]) + x.shape[2:]), 0, 1)
    K.assert_within(np.moveaxis(y, -1, 1) if axis == -1 else y, ty.detach().numpy(),
                    y_bound, "eval y")
    ty.backward(torch.ones_like(ty))
    gx = layer.backward(np.ones_like(y))
    # eval dx = w rstd_running: relative error of rstd (d_rv / 2 (rv + eps)) + roundings
    gx_bound = 2.0 * rstd * (run_bound[1] / (2 * (layer.running_var + EPS)) + 4 * K.U64)
    gx_bound = gx_bound.reshape((1, C) + (1,) * (x.ndim - 2))
    K.assert_within(np.moveaxis(gx, -1, 1) if axis == -1 else gx, tx.grad.numpy(),
                    np.broadcast_to(gx_bound, x.shape), "eval dx")
    assert layer.num_batches_tracked == 4     # eval does not count batches
    # state_dict round trip into torch
    sd = layer.state_dict()
    assert set(sd) == set(t.state_dict())
    t2 = _torch_layer("batch", ndim, momentum=momentum)
    t2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
    np.testing.assert_array_equal(t2.running_var.numpy(), layer.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_without_running_stats(backend):
    t = torch.nn.BatchNorm2d(C, track_running_stats=False, affine=False).double().eval()
    layer = nk.BatchNorm(C, track_running_stats=False, affine=False, dtype=np.float64,
                         backend=backend).eval()
    assert layer.running_mean is None and layer.state_dict() == {}
    assert layer.parameters() == {}
    x = _data((3, C, 4, 4), 0)
    tol = _tols(_bn_rows(x), _bn_rows(np.ones_like(x)))
    np.testing.assert_allclose(layer(x), t(torch.tensor(x)).numpy(), **tol["y"])
    layer.backward(np.ones_like(x))
    assert layer.grads == {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_layer_matches_torch(backend, momentum, track, affine):
    # torch's InstanceNorm never counts num_batches_tracked and treats momentum=None as 0
    t = torch.nn.InstanceNorm2d(C, affine=affine, track_running_stats=track,
                                momentum=momentum).double()
    layer = nk.InstanceNorm(C, affine=affine, track_running_stats=track, momentum=momentum,
                            dtype=np.float64, backend=backend)
    assert set(layer.state_dict()) == set(t.state_dict())
    inst_rows = lambda a: a.reshape(-1, a[0, 0].size)        # (N C, H W): one row a statistic
    run_bound = (0.0, 0.0)
    for step in range(3):
        x = _data((2, C, 5, 3), step)
        tol = _tols(inst_rows(x), inst_rows(np.ones_like(x)))    # w = 1, b = 0 at init
        np.testing.assert_allclose(layer(x), t(torch.tensor(x)).detach().numpy(), **tol["y"])
        if track:   # the running statistics blend the per-instance ones: channel rows
            run_bound = _running_bound(run_bound, _bn_rows(x), layer.running_mean,
                                       layer.running_var)
    if track:
        K.assert_within(layer.running_mean, t.running_mean.numpy(), run_bound[0],
                        "running_mean")
        K.assert_within(layer.running_var, t.running_var.numpy(), run_bound[1],
                        "running_var")
        assert layer.num_batches_tracked == int(t.num_batches_tracked)
    t.eval()
    layer.eval()
    x = _data((2, C, 5, 3), 7)
    tx = torch.tensor(x, requires_grad=True)
    ty = t(tx)
    dy = _data(x.shape, 8)
    tol = _tols(inst_rows(x), inst_rows(dy))          # eval without tracking: batch stats
    if track:      # eval with the running statistics: their bound, propagated as in BN
        rstd = 1 / np.sqrt(layer.running_var + EPS)
        xc = np.abs(_bn_rows(x) - layer.running_mean[:, None])
        y_bound = (run_bound[0][:, None] * rstd[:, None]
                   + xc * rstd[:, None] ** 3 * run_bound[1][:, None] / 2
                   + K.bound_elementwise(np.float64, xc * rstd[:, None], 0.0))
        tol["y"] = dict(rtol=0.0, atol=float(y_bound.max()))
        tol["dx"] = dict(rtol=0.0, atol=float((np.abs(dy).max() * rstd * (
            run_bound[1] / (2 * (layer.running_var + EPS)) + 4 * K.U64)).max()))
    np.testing.assert_allclose(layer(x), ty.detach().numpy(), **tol["y"])
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), **tol["dx"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "layer_nobias", "rms", "group"])
def test_affine_layers_match_torch(backend, kind):
    if kind == "layer":
        t, layer = torch.nn.LayerNorm((4, 5)), nk.LayerNorm((4, 5), backend=backend,
                                                             dtype=np.float64)
    elif kind == "layer_nobias":
        t, layer = torch.nn.LayerNorm(5, bias=False), nk.LayerNorm(5, bias=False,
                                                                   backend=backend,
                                                                   dtype=np.float64)
    elif kind == "rms":
        t, layer = torch.nn.RMSNorm([4, 5]), nk.RMSNorm([4, 5], backend=backend,
                                                         dtype=np.float64)
    else:
        t, layer = torch.nn.GroupNorm(2, 4), nk.GroupNorm(2, 4, backend=backend,
                                                          dtype=np.float64)
    t = t.double()
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    assert set(layer.state_dict()) == set(t.state_dict())
    assert set(layer.parameters()) == {n for n, _ in t.named_parameters()}
    layer.load_state_dict(t.state_dict())   # torch tensors load directly
    x = _data((3, 4, 5), 0)
    dy = _data(x.shape, 1)
    # the values of one statistic: (4, 5) or 5 trailing values, or 2 channels x 5
    rows = {"layer": lambda a: a.reshape(3, 20), "rms": lambda a: a.reshape(3, 20),
            "layer_nobias": lambda a: a.reshape(12, 5),
            "group": lambda a: a.reshape(6, 10)}[kind]
    tol = _tols(rows(x), rows(dy), w_max=1.5, b_max=1.5, rms=kind == "rms")  # p in [.5, 1.5)
    tx = torch.tensor(x, requires_grad=True)
    ty = t(tx)
    np.testing.assert_allclose(layer(x), ty.detach().numpy(), **tol["y"])
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), **tol["dx"])
    for name, p in t.named_parameters():
        np.testing.assert_allclose(layer.grads[name], p.grad.numpy(), **tol["grads"])
        assert layer.grads[name].dtype == layer.parameters()[name].dtype


def test_parameters_are_live_arrays_and_modes():
    layer = nk.BatchNorm(3)
    assert layer.training
    params = layer.parameters()
    params["weight"][...] = 2.0
    assert (layer.weight == 2.0).all()
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training
    layer.train(False)
    assert not layer.training
    assert isinstance(layer, nk.Norm)
    assert layer.backend in nk.available_backends()
    assert "BatchNorm(3" in repr(layer)
    assert layer.state_dict()["num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_layer_dtype(dtype):
    layer = nk.LayerNorm(8, dtype=dtype)
    assert layer.weight.dtype == dtype
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert layer(x).dtype == np.float32
    layer.backward(np.ones_like(x))
    assert layer.grads["weight"].dtype == dtype


def test_grads_set_afresh_not_accumulated():
    layer = nk.GroupNorm(2, 4)
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    layer(x)
    layer.backward(np.ones_like(x))
    first = {k: v.copy() for k, v in layer.grads.items()}
    layer(x)
    layer.backward(np.ones_like(x))
    for k in first:
        np.testing.assert_array_equal(layer.grads[k], first[k])
