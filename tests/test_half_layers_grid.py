"""16-bit layers over the backend grid (issue 13, the layer side): float16 / bfloat16
data through the layer objects, with 16-bit parameters or float32 ones (torch's
autocast layout), on every backend of ``_cases.backend_dtype_params`` (a backend in
``_cases.PENDING_16BIT`` has strict xfail(TypeError) rows).

Accuracy rule (as tests/test_half.py): against a float64 truth (torch's module in
float64 on the same 16-bit values and parameters), every element of normkit's result
is within ``TORCH_FACTOR`` times torch's own largest error in the same dtypes, plus one
ulp of the result's dtype at the true value (both round a float32 computation once,
and the largest errors may fall on different elements).
"""
import _cases as K
import ml_dtypes
import numpy as np
import pytest

import normkit as nk

torch = pytest.importorskip("torch")
nn = torch.nn

C, K_ROW, EPS = 6, 16, 1e-5       # channels (3 groups); row length of LayerNorm / RMSNorm
TORCH_FACTOR = 2.0
GRID = K.backend_dtype_params(dtypes=K.HALF_DTYPES)
LAYERS = ["batch", "instance", "group", "layer", "rms"]
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
         "float64": torch.float64}


# ====================================================================== helpers
def _ulp(values, dtype):
    """Spacing of ``dtype`` at each |value| (float64 array): 2^(exponent - nmant), at
    least the smallest subnormal."""
    fi = ml_dtypes.finfo(K.np_dtype(dtype))
    v = np.maximum(np.abs(np.asarray(values, np.float64)), float(fi.tiny))
    return np.maximum(np.exp2(np.floor(np.log2(v)) - fi.nmant), float(fi.smallest_subnormal))


def _t(a, dtype):
    return torch.tensor(np.asarray(a, np.float64)).to(TORCH[dtype])


def _np(t):
    return t.detach().double().numpy()


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _torch_bits(t):
    """The bits of a torch tensor (bfloat16 included, which NumPy cannot hold)."""
    t = t.detach().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return _bits(t.numpy())


def torch_module(kind, pdt):
    """torch's module for ``kind``, parameters and running statistics in ``pdt``."""
    mod = {"batch": lambda: nn.BatchNorm1d(C, EPS),
           "instance": lambda: nn.InstanceNorm1d(C, EPS, affine=True,
                                                 track_running_stats=True),
           "group": lambda: nn.GroupNorm(3, C, EPS),
           "layer": lambda: nn.LayerNorm(K_ROW, EPS),
           "rms": lambda: nn.RMSNorm(K_ROW, EPS)}[kind]()
    return mod.to(TORCH[pdt])


def normkit_layer(kind, pdt, backend):
    kw = dict(dtype=K.np_dtype(pdt), backend=backend)
    return {"batch": lambda: nk.BatchNorm(C, EPS, diagnostics=False, **kw),
            "instance": lambda: nk.InstanceNorm(C, EPS, affine=True,
                                                track_running_stats=True,
                                                diagnostics=False, **kw),
            "group": lambda: nk.GroupNorm(3, C, EPS, **kw),
            "layer": lambda: nk.LayerNorm(K_ROW, EPS, **kw),
            "rms": lambda: nk.RMSNorm(K_ROW, EPS, **kw)}[kind]()


def randomized(mod, seed):
    """``mod`` with random parameters and running statistics that bfloat16 holds
    exactly (so every dtype here holds them: |values| < 8, 8-bit mantissas)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if not t.is_floating_point():
                continue
            v = rng.standard_normal(t.shape) * 0.5
            v = np.abs(v) + 0.5 if name == "running_var" else v + (name == "weight")
            t.copy_(_t(v.astype(ml_dtypes.bfloat16), "float64"))
    return mod


def float64_twin(kind, mod):
    twin = torch_module(kind, "float64")
    twin.load_state_dict({k: v.double() if v.is_floating_point() else v
                          for k, v in mod.state_dict().items()})
    return twin


def data(kind, dtype, seed):
    shape = (4, C, 7) if kind in ("batch", "instance", "group") else (3, 5, K_ROW)
    rng = np.random.default_rng(seed)
    dt = K.np_dtype(dtype)
    return ((rng.standard_normal(shape) * 2 + 1).astype(dt),
            rng.standard_normal(shape).astype(dt))


def _name(a):
    return "float64" if a.dtype == np.float64 else K.dtype_name(a.dtype)


def torch_results(mod, x, dy, training):
    mod.train(training)
    tx = _t(x, _name(x)).requires_grad_()
    y = mod(tx)
    y.backward(_t(dy, _name(dy)))
    r = {"output": _np(y), "grad_x": _np(tx.grad)}
    for name, p in mod.named_parameters():
        r[f"grad_{name}"] = _np(p.grad)
    if training and getattr(mod, "running_mean", None) is not None:
        r["running_mean"], r["running_var"] = _np(mod.running_mean), _np(mod.running_var)
    return r


def normkit_results(layer, x, dy, training):
    layer.train(training)
    y = layer(x)
    gx = layer.backward(dy)
    assert y.dtype == x.dtype and gx.dtype == x.dtype          # outputs in x's dtype
    r = {"output": y, "grad_x": gx}
    for name, g in layer.grads.items():
        assert g.dtype == layer.dtype, name                     # gradients in the params'
        r[f"grad_{name}"] = g
    if training and getattr(layer, "running_mean", None) is not None:
        assert layer.running_mean.dtype == layer.dtype          # updated in their dtype
        assert layer.running_var.dtype == layer.dtype
        r["running_mean"], r["running_var"] = layer.running_mean, layer.running_var
    return r


def assert_no_worse_than(got, theirs, truth, result_dtypes, what=""):
    """Every element within TORCH_FACTOR x the peer's largest error + 1 ulp."""
    assert set(got) == set(theirs) == set(truth), what
    for key in truth:
        a, t, ref = (np.asarray(v[key], np.float64) for v in (got, theirs, truth))
        assert np.isfinite(ref).all() and np.isfinite(a).all(), f"{what} {key}"
        their = float(np.max(np.abs(t - ref), initial=0.0))
        ours = np.abs(a - ref)
        allowed = TORCH_FACTOR * their + _ulp(ref, result_dtypes[key])
        worst = int(np.argmax(ours - allowed))
        assert (ours <= allowed).all(), (
            f"{what} {key}: error {ours.flat[worst]:.3g} > {TORCH_FACTOR} x peer's "
            f"{their:.3g} + 1 ulp ({allowed.flat[worst]:.3g})")


def _result_dtypes(results, x_dtype, pdt):
    return {k: (x_dtype if k in ("output", "grad_x") else pdt) for k in results}


# ====================================================================== vs torch
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pdt", ["float32", "same"], ids=["params-f32", "params-16"])
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_layer_vs_torch(backend, dtype, kind, pdt, training):
    """Forward, backward, parameter gradients and running statistics of a layer against
    torch's module in the same dtypes; output and grad_x in x's dtype, gradients and
    running statistics in the layer's."""
    pdt = dtype if pdt == "same" else pdt
    seed = LAYERS.index(kind) * 4 + 2 * training + (pdt == dtype)
    x, dy = data(kind, dtype, seed)
    theirs_mod = randomized(torch_module(kind, pdt), seed)
    truth_mod = float64_twin(kind, theirs_mod)
    layer = normkit_layer(kind, pdt, backend)
    layer.load_state_dict(theirs_mod.state_dict())
    for name, value in theirs_mod.state_dict().items():     # loaded bit for bit
        np.testing.assert_array_equal(_bits(layer.state_dict()[name]), _torch_bits(value),
                                      name)
    got = normkit_results(layer, x, dy, training)
    theirs = torch_results(theirs_mod, x, dy, training)
    truth = torch_results(truth_mod, x.astype(np.float64), dy.astype(np.float64), training)
    assert_no_worse_than(got, theirs, truth, _result_dtypes(got, dtype, pdt),
                         f"{kind} {dtype} params {pdt}")


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_running_statistics_over_steps(backend, dtype):
    """Training steps with momentum=None (cumulative average): the running statistics
    stay 16-bit, each step the update of the stored 16-bit values rounded once, as
    torch's 16-bit module keeps them."""
    dt = K.np_dtype(dtype)
    layer = nk.BatchNorm(C, momentum=None, dtype=dt, backend=backend, diagnostics=False)
    mod = nn.BatchNorm1d(C, EPS, momentum=None).to(TORCH[dtype])
    rm, rv = np.zeros(C), np.ones(C)
    for step in range(1, 4):
        x, _ = data("batch", dtype, 100 + step)
        layer(x)
        mod(_t(x, dtype))
        x64 = x.astype(np.float64)
        f = 1.0 / step
        want_m = (1 - f) * rm + f * x64.mean(axis=(0, 2))
        want_v = (1 - f) * rv + f * x64.var(axis=(0, 2), ddof=1)
        assert layer.running_mean.dtype == dt and layer.running_var.dtype == dt
        # update in float32 or better from float32 batch statistics (relative error
        # far under 1e-5 for 28 values), rounded once: within 1 ulp of the exact update
        for have, want in ((layer.running_mean, want_m), (layer.running_var, want_v)):
            err = np.abs(have.astype(np.float64) - want)
            assert (err <= _ulp(want, dt) + 1e-5 * np.abs(want)).all(), (step, err)
        rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
        theirs = _np(mod.running_mean)     # torch's 16-bit module: within 2 ulps
        assert (np.abs(rm - theirs) <= 2 * _ulp(theirs, dt)).all(), step
    assert layer.num_batches_tracked == 3


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_from_torch_16_bit_module_computes_as_torch(backend, dtype, kind):
    """A float16 / bfloat16 torch module becomes a layer of the same dtype with the
    same bits, which computes as torch's module (eval mode, the accuracy rule)."""
    mod = randomized(torch_module(kind, dtype), 11).eval()
    layer = nk.from_torch(mod, backend=backend)
    assert layer.dtype == K.np_dtype(dtype) and not layer.training
    for name, value in mod.state_dict().items():
        np.testing.assert_array_equal(_bits(layer.state_dict()[name]), _torch_bits(value),
                                      name)
    x, dy = data(kind, dtype, 12)
    got = normkit_results(layer, x, dy, False)
    theirs = torch_results(mod, x, dy, False)
    truth = torch_results(float64_twin(kind, mod), x.astype(np.float64),
                          dy.astype(np.float64), False)
    assert_no_worse_than(got, theirs, truth, _result_dtypes(got, dtype, dtype), kind)
