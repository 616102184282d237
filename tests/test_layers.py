"""Layer objects against torch.nn modules: modes, running statistics, state_dict, grads."""
import numpy as np
import pytest

import normkit as nk

torch = pytest.importorskip("torch")
BACKENDS = nk.available_backends()
C = 6


def _torch_layer(kind, ndim, **kw):
    if kind == "batch":
        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[ndim]
    else:
        cls = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d,
               5: torch.nn.InstanceNorm3d}[ndim]
    return cls(C, **kw).double()


def _data(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape) * 2 + 1


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
    for step in range(4):
        x = _data(SHAPES[ndim], step)
        xu = np.moveaxis(x, 1, -1).copy() if axis == -1 else x
        tx = torch.tensor(x, requires_grad=True)
        ty = t(tx)
        y = layer(xu)
        np.testing.assert_allclose(np.moveaxis(y, -1, 1) if axis == -1 else y,
                                   ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        dy = _data(SHAPES[ndim], 100 + step)
        ty.backward(torch.tensor(dy))
        gx = layer.backward(np.moveaxis(dy, 1, -1).copy() if axis == -1 else dy)
        np.testing.assert_allclose(np.moveaxis(gx, -1, 1) if axis == -1 else gx,
                                   tx.grad.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(layer.grads["weight"], t.weight.grad.numpy(), rtol=1e-9,
                                   atol=1e-9)
        np.testing.assert_allclose(layer.grads["bias"], t.bias.grad.numpy(), rtol=1e-9,
                                   atol=1e-9)
        t.weight.grad = t.bias.grad = None     # normkit sets grads afresh: no accumulation
    assert layer.num_batches_tracked == int(t.num_batches_tracked) == 4
    np.testing.assert_allclose(layer.running_mean, t.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, t.running_var.numpy(), rtol=1e-12)
    # eval mode uses the running statistics; backward in eval mode too
    t.eval()
    layer.eval()
    assert not layer.training
    x = _data(SHAPES[ndim], 9)
    tx = torch.tensor(x, requires_grad=True)
    ty = t(tx)
    y = layer(np.moveaxis(x, 1, -1).copy() if axis == -1 else x)
    np.testing.assert_allclose(np.moveaxis(y, -1, 1) if axis == -1 else y,
                               ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    ty.backward(torch.ones_like(ty))
    gx = layer.backward(np.ones_like(y))
    np.testing.assert_allclose(np.moveaxis(gx, -1, 1) if axis == -1 else gx,
                               tx.grad.numpy(), rtol=1e-10, atol=1e-10)
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
    np.testing.assert_allclose(layer(x), t(torch.tensor(x)).numpy(), rtol=1e-10, atol=1e-10)
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
    for step in range(3):
        x = _data((2, C, 5, 3), step)
        np.testing.assert_allclose(layer(x), t(torch.tensor(x)).detach().numpy(),
                                   rtol=1e-10, atol=1e-10)
    if track:
        np.testing.assert_allclose(layer.running_mean, t.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(layer.running_var, t.running_var.numpy(), rtol=1e-12)
        assert layer.num_batches_tracked == int(t.num_batches_tracked)
    t.eval()
    layer.eval()
    x = _data((2, C, 5, 3), 7)
    tx = torch.tensor(x, requires_grad=True)
    ty = t(tx)
    np.testing.assert_allclose(layer(x), ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    dy = _data(x.shape, 8)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-9, atol=1e-9)


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
    tx = torch.tensor(x, requires_grad=True)
    ty = t(tx)
    np.testing.assert_allclose(layer(x), ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    dy = _data(x.shape, 1)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-9, atol=1e-9)
    for name, p in t.named_parameters():
        np.testing.assert_allclose(layer.grads[name], p.grad.numpy(), rtol=1e-9, atol=1e-9)
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
