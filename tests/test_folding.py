"""fold_batch_norm / fold_batch_norm_stats: folded layer == layer followed by eval BN.

Oracles: explicit NumPy linear, convolution and transposed convolution (always), and
torch's ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` and module forwards (when torch
is installed).
"""
import _bounds_extra as BX
import _cases as K
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import normkit


# ------------------------------------------------------------------ NumPy oracles
def np_conv2d(x, w, b=None, *, groups=1, stride=1, padding=0):
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cout, cin_g, kh, kw = w.shape
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    og = cout // groups
    y = np.concatenate([np.einsum("ncijkl,ockl->noij", win[:, g * cin_g:(g + 1) * cin_g],
                                  w[g * og:(g + 1) * og]) for g in range(groups)], axis=1)
    return y if b is None else y + b[None, :, None, None]


def np_conv_transpose2d(x, w, b=None, *, groups=1, stride=1):
    n, cin, h, wd = x.shape
    _, og, kh, kw = w.shape
    ig = cin // groups
    y = np.zeros((n, og * groups, (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for g in range(groups):
        xg, wg = x[:, g * ig:(g + 1) * ig], w[g * ig:(g + 1) * ig]
        for k in range(kh):
            for l in range(kw):
                y[:, g * og:(g + 1) * og, k:k + stride * h:stride, l:l + stride * wd:stride] \
                    += np.einsum("ncij,co->noij", xg, wg[:, :, k, l])
    return y if b is None else y + b[None, :, None, None]


def np_bn_eval(y, mean, var, gamma, beta, eps, axis=1):
    shape = [1] * y.ndim
    shape[axis] = -1
    out = (y - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


def make_bn(rng, c, affine=True, dtype=np.float64, eps=1e-3):
    bn = normkit.BatchNorm(c, eps=eps, affine=affine, dtype=dtype).eval()
    bn.running_mean[:] = rng.standard_normal(c)
    bn.running_var[:] = rng.uniform(0.2, 3.0, c)
    if affine:
        bn.weight[:] = rng.standard_normal(c)
        bn.bias[:] = rng.standard_normal(c)
    return bn


def bn_ref(bn, y, axis=1):
    return np_bn_eval(y, bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64),
                      None if bn.weight is None else bn.weight.astype(np.float64),
                      None if bn.bias is None else bn.bias.astype(np.float64), bn.eps, axis)


def fold_bound(bn, abs_out, k, axis=1, dtype=np.float64):
    """BX.bound_folded for ``bn`` folded into a layer whose output on |u|, |W|, |b| is
    ``abs_out`` (channels on ``axis``), k products per output element."""
    def f64(a, fill):
        return np.full(bn.num_features, fill) if a is None else np.abs(np.asarray(a, np.float64))

    s = f64(bn.weight, 1.0) / np.sqrt(np.asarray(bn.running_var, np.float64) + bn.eps)
    shift = s * np.abs(np.asarray(bn.running_mean, np.float64)) + f64(bn.bias, 0.0)
    view = [1] * np.ndim(abs_out)
    view[axis] = -1
    return BX.bound_folded(s.reshape(view) * abs_out, shift.reshape(view), k, dtype)


# ------------------------------------------------------------------ NumPy tests
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_linear(rng, with_bias, affine):
    w = rng.standard_normal((5, 3))
    b = rng.standard_normal(5) if with_bias else None
    bn = make_bn(rng, 5, affine)
    u = rng.standard_normal((7, 3))
    expected = bn_ref(bn, u @ w.T + (0 if b is None else b))
    w2, b2 = normkit.fold_batch_norm(w, b, bn)
    # 3 products + the bias per output (BX.bound_folded)
    bound = fold_bound(bn, np.abs(u) @ np.abs(w).T + (0 if b is None else np.abs(b)), 4)
    K.assert_within(u @ w2.T + b2, expected, bound, "folded linear")
    # and with normkit's own eval BatchNorm as the reference
    K.assert_within(u @ w2.T + b2, bn(u @ w.T + (0 if b is None else b)), bound,
                    "folded linear vs normkit BatchNorm")


@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 0), (1, 2, 1), (2, 1, 1),
                                                   (6, 2, 0)])
def test_conv2d(rng, groups, stride, padding):
    cin, cout = 6, 12
    w = rng.standard_normal((cout, cin // groups, 3, 3))
    b = rng.standard_normal(cout)
    bn = make_bn(rng, cout)
    x = rng.standard_normal((2, cin, 9, 8))
    expected = bn_ref(bn, np_conv2d(x, w, b, groups=groups, stride=stride, padding=padding))
    w2, b2 = normkit.fold_batch_norm(w, b, bn, axis=0)
    got = np_conv2d(x, w2, b2, groups=groups, stride=stride, padding=padding)
    # (cin / groups) * 3 * 3 products + the bias per output
    abs_out = np_conv2d(np.abs(x), np.abs(w), np.abs(b), groups=groups, stride=stride,
                        padding=padding)
    K.assert_within(got, expected, fold_bound(bn, abs_out, cin // groups * 9 + 1), "conv2d")


@pytest.mark.parametrize("groups,stride", [(1, 1), (1, 2), (2, 2), (4, 1)])
def test_conv_transpose2d(rng, groups, stride):
    cin, cout = 8, 12
    w = rng.standard_normal((cin, cout // groups, 3, 2))
    b = rng.standard_normal(cout)
    bn = make_bn(rng, cout)
    x = rng.standard_normal((2, cin, 4, 5))
    expected = bn_ref(bn, np_conv_transpose2d(x, w, b, groups=groups, stride=stride))
    w2, b2 = normkit.fold_batch_norm(w, b, bn, axis=1, groups=groups)
    got = np_conv_transpose2d(x, w2, b2, groups=groups, stride=stride)
    # at most (cin / groups) * 3 * 2 products + the bias per output
    abs_out = np_conv_transpose2d(np.abs(x), np.abs(w), np.abs(b), groups=groups, stride=stride)
    K.assert_within(got, expected, fold_bound(bn, abs_out, cin // groups * 6 + 1), "convT2d")


def test_channels_last_kernel(rng):
    """A Keras-style Dense kernel (in, out) and an HWIO conv kernel: axis=-1."""
    kernel = rng.standard_normal((3, 5))
    bn = make_bn(rng, 5)
    u = rng.standard_normal((4, 3))
    k2, b2 = normkit.fold_batch_norm(kernel, None, bn, axis=-1)
    K.assert_within(u @ k2 + b2, bn_ref(bn, u @ kernel, axis=-1),
                    fold_bound(bn, np.abs(u) @ np.abs(kernel), 3, axis=-1), "dense kernel")
    hwio = rng.standard_normal((3, 3, 4, 5))
    k2, _ = normkit.fold_batch_norm(hwio, None, bn, axis=-1)
    oihw = np.transpose(hwio, (3, 2, 0, 1))
    k_ref, _ = normkit.fold_batch_norm(oihw, None, bn, axis=0)
    # the same products W * s per element, only the layout differs: bitwise equal
    np.testing.assert_array_equal(np.transpose(k2, (3, 2, 0, 1)), k_ref)


def test_stats_form_matches_layer_form(rng):
    bn = make_bn(rng, 4, eps=1e-5)
    w, b = rng.standard_normal((4, 2, 3)), rng.standard_normal(4)
    by_layer = normkit.fold_batch_norm(w, b, bn)
    by_stats = normkit.fold_batch_norm_stats(w, b, bn.running_mean, bn.running_var,
                                             bn.weight, bn.bias, bn.eps)
    for a, e in zip(by_stats, by_layer):
        np.testing.assert_array_equal(a, e)
    # no gamma/beta: pure normalization
    w2, b2 = normkit.fold_batch_norm_stats(np.eye(4), None, np.arange(4.0), np.full(4, 3.0),
                                           eps=1.0)
    # 1 / sqrt(3 + 1) = 0.5 and -m * 0.5 are exact in binary floating point
    np.testing.assert_array_equal(np.diag(w2), 0.5)
    np.testing.assert_array_equal(b2, -np.arange(4.0) / 2)


def test_dtypes_and_no_mutation(rng):
    bn = make_bn(rng, 3, dtype=np.float32)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    w0, b0, state0 = w.copy(), b.copy(), bn.state_dict()
    w2, b2 = normkit.fold_batch_norm(w, b, bn)
    assert w2.dtype == np.float32 and b2.dtype == np.float32
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state0[k])
    w3, b3 = normkit.fold_batch_norm(np.ones((3, 2), np.int64), None, bn)
    assert w3.dtype == np.float64 and b3.dtype == np.float64
    w4, _ = normkit.fold_batch_norm(w.astype(np.float16), None, bn)
    assert w4.dtype == np.float16


def test_refuses_training_mode_and_missing_stats(rng):
    bn = make_bn(rng, 3).train()
    with pytest.raises(ValueError, match="training mode.*eval"):
        normkit.fold_batch_norm(np.ones((3, 2)), None, bn)
    no_stats = normkit.BatchNorm(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        normkit.fold_batch_norm(np.ones((3, 2)), None, no_stats)
    with pytest.raises(TypeError, match="InstanceNorm"):
        normkit.fold_batch_norm(np.ones((3, 2)), None,
                                normkit.InstanceNorm(3, track_running_stats=True).eval())
    with pytest.raises(TypeError, match="expected a BatchNorm"):
        normkit.fold_batch_norm(np.ones((3, 2)), None, normkit.LayerNorm(3))


def test_shape_errors(rng):
    bn = make_bn(rng, 3)
    with pytest.raises(ValueError, match=r"4 output channels but the BatchNorm has 3"):
        normkit.fold_batch_norm(np.ones((4, 2)), None, bn)
    with pytest.raises(ValueError, match=r"bias: expected shape \(3,\), got shape \(4,\)"):
        normkit.fold_batch_norm(np.ones((3, 2)), np.ones(4), bn)
    with pytest.raises(ValueError, match="out of range"):
        normkit.fold_batch_norm(np.ones((3, 2)), None, bn, axis=2)
    with pytest.raises(ValueError, match="groups > 1"):
        normkit.fold_batch_norm(np.ones((2, 3, 3)), None, bn, axis=2, groups=3)
    with pytest.raises(ValueError, match="output channels, expected"):
        normkit.fold_batch_norm(np.ones((4, 1, 3, 3)), None, bn, axis=1, groups=2)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"axis": 1.0}, TypeError, r"axis: expected an int, got float 1\.0"),
    ({"axis": True}, TypeError, r"axis: expected an int, got bool"),
    ({"groups": 0}, ValueError, r"groups: expected an int >= 1, got 0"),
    ({"groups": 2.5}, TypeError, r"groups: expected an int, got float 2\.5"),
    ({"eps": "1e-5"}, TypeError, r"eps: expected a real number, got str '1e-5'"),
    ({"eps": None}, TypeError, r"eps: expected a real number, got NoneType"),
    ({"eps": -1.0}, ValueError, r"eps: expected a number >= 0, got -1\.0"),
    ({"running_mean": np.ma.masked_array(np.zeros(3))}, TypeError,
     r"running_mean: expected a plain array, got a numpy\.ma\.MaskedArray"),
    ({"weight": None}, TypeError, r"weight: expected the weight array.*got None"),
    ({"running_var": np.array(["a", "b", "c"])}, TypeError,
     r"running_var must be a real numeric array, got dtype <U1"),
])
def test_argument_errors_name_the_argument(kwargs, exc, pattern):
    args = {"weight": np.ones((3, 2)), "bias": None, "running_mean": np.zeros(3),
            "running_var": np.ones(3), **kwargs}
    with pytest.raises(exc, match=pattern):
        normkit.fold_batch_norm_stats(**args)


def test_bfloat16_statistics():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    var = np.array([4.0, 1.0, 0.25], ml_dtypes.bfloat16)
    w, _ = normkit.fold_batch_norm_stats(np.ones((3, 2)), None, np.zeros(3), var, eps=0.0)
    # 1 / sqrt(v) for v = 4, 1, 0.25 (exact in bfloat16 and float64) is exact
    np.testing.assert_array_equal(w[:, 0], [0.5, 1.0, 2.0])


# ------------------------------------------------------------------ torch cross-checks
try:
    import torch
    nn = torch.nn
except ImportError:          # torch is an optional peer: only these tests skip
    torch = nn = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch cross-checks need torch")


def _abs_layer_output(layer, x, w_abs, b_abs):
    """The layer applied to |x| with |W|, |b| (the magnitudes of every output's terms)."""
    with torch.no_grad():
        layer.weight.copy_(w_abs)
        if b_abs is not None:
            layer.bias.copy_(b_abs)
        return layer(x.abs()).numpy().astype(np.float64)


def _stats_of(bn):
    """A torch BatchNorm's eval parameters as the attributes fold_bound reads."""
    class Stats:
        num_features, eps = bn.num_features, bn.eps
        weight, bias = bn.weight.detach().numpy(), bn.bias.detach().numpy()
        running_mean, running_var = bn.running_mean.numpy(), bn.running_var.numpy()
    return Stats


def _randomize_bn(bn, gen):
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))
    return bn.eval()


@needs_torch
@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d", "conv2d_nobias",
                                  "conv2d_groups", "convT2d", "linear"])
def test_against_torch_fusion(kind):
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer, bn, shape = {
        "conv1d": (nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 9)),
        "conv2d": (nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), (2, 4, 7, 6)),
        "conv3d": (nn.Conv3d(4, 6, 2), nn.BatchNorm3d(6), (2, 4, 4, 5, 3)),
        "conv2d_nobias": (nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 4, 6, 6)),
        "conv2d_groups": (nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), (2, 4, 6, 6)),
        "convT2d": (nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 4, 4, 4)),
        "linear": (nn.Linear(4, 6), nn.BatchNorm1d(6), (5, 4)),
    }[kind]
    layer.eval()
    _randomize_bn(bn, gen)
    transposed = kind.startswith("convT")
    fused = (fuse_linear_bn_eval(layer, bn) if kind == "linear"
             else fuse_conv_bn_eval(layer, bn, transpose=transposed))
    # the torch BatchNorm module itself is accepted as `bn`
    w2, b2 = normkit.fold_batch_norm(layer.weight, layer.bias, bn, axis=1 if transposed else 0)
    w_abs = layer.weight.detach().abs().clone()
    b_abs = None if layer.bias is None else layer.bias.detach().abs().clone()
    k = layer.weight[0].numel() + 1          # products per output (an upper bound for convT)
    # torch folds in float32 (w * gamma * rsqrt(var + eps); (b - m) * s + beta): a few
    # float32 roundings of each term (K.bound_elementwise), normkit's float64 inside that
    tb = np.zeros(6) if layer.bias is None else layer.bias.detach().numpy().astype(np.float64)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy().astype(np.float64)
    K.assert_within(w2, fused.weight.detach().numpy(),
                    K.bound_elementwise(np.float32, w2), "weight")
    K.assert_within(b2, fused.bias.detach().numpy(), K.bound_elementwise(
        np.float32, tb * s, bn.running_mean.numpy() * s, bn.bias.detach().numpy()), "bias")
    # and the folded layer reproduces layer + BN
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        expected = bn(layer(x)).numpy()
        layer.weight.copy_(torch.from_numpy(w2))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.from_numpy(b2))
        else:
            layer.bias.copy_(torch.from_numpy(b2))
        got = layer(x).numpy()
        abs_out = _abs_layer_output(layer, x, w_abs, b_abs)
    # torch's float32 conv / linear, unfolded then BN vs folded (BX.bound_folded, u32)
    K.assert_within(got, expected, fold_bound(_stats_of(bn), abs_out, k, axis=1,
                                              dtype=np.float32), kind)


@needs_torch
def test_grouped_conv_transpose_against_torch_forward():
    """torch's fuse_conv_bn_eval cannot fold a grouped ConvTranspose; normkit can."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    conv = nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2).eval()
    bn = _randomize_bn(nn.BatchNorm2d(8), gen)
    x = torch.randn(2, 6, 4, 5, generator=gen)
    w_abs, b_abs = conv.weight.detach().abs().clone(), conv.bias.detach().abs().clone()
    w2, b2 = normkit.fold_batch_norm(conv.weight, conv.bias, bn, axis=1, groups=2)
    with torch.no_grad():
        expected = bn(conv(x)).numpy()
        conv.weight.copy_(torch.from_numpy(w2))
        conv.bias.copy_(torch.from_numpy(b2))
        got = conv(x).numpy()
        abs_out = _abs_layer_output(conv, x, w_abs, b_abs)
    K.assert_within(got, expected, fold_bound(_stats_of(bn), abs_out, 3 * 3 * 3 + 1, axis=1,
                                              dtype=np.float32), "grouped convT")


@needs_torch
def test_torch_refusals():
    bn = nn.BatchNorm2d(3)        # training mode
    with pytest.raises(ValueError, match="training mode"):
        normkit.fold_batch_norm(np.ones((3, 1, 1, 1)), None, bn)
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        normkit.fold_batch_norm(np.ones((3, 1, 1, 1)), None, bn)
