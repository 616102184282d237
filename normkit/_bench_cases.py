"""The one table of benchmark cases, shared by ``python -m normkit bench`` and ``benchmarks/``.

Each :class:`Case` is a norm in one mode (an :class:`Op`) applied to one or more input
shapes ("units": one for an ordinary case, 53 for the ResNet-50 case). An ``Op`` knows,
for every implementation we compare:

* ``normkit``  -- the public normkit call, with ``backend=`` set (one per backend);
* ``plain``    -- a straightforward vectorized NumPy implementation (what a user would
  write in ten lines: broadcasting, ``mean``/``var``, temporaries; float32 math);
* ``torch``    -- ``torch.nn.functional`` on the same memory (``torch.from_numpy``;
  NHWC is a channels-last view, not a copy), threads set to the same count;
* ``onnx``     -- one ONNX node (op type, attributes, opset) for ONNX Runtime, or the
  reason it does not apply (:class:`NotApplicable`);

plus the bytes that must move and a correctness tolerance. The correctness check
compares every implementation with the normkit ``numpy`` backend (the readable oracle).

Bytes model (what *must* move between memory and the core, per call; parameters and
statistics are O(C) and left out; ``n`` = bytes of x):

==============================  ============  =============================================
op                              bytes         why
==============================  ============  =============================================
BatchNorm eval                  2n            read x, write y (per-channel a, b precomputed)
LN / RMS / GN / IN forward      2n            read x, write y: one row / group fits in
                                              cache between the statistics and the output
BatchNorm training forward      3n            the statistics span the whole batch (does not
                                              fit in cache): read x twice, write y
BatchNorm training fwd + bwd    8n            forward 3n; backward reads x, dy for the sums,
                                              then x, dy again and writes dx (5n)
LN / RMS / GN / IN fwd + bwd    5n            forward 2n; backward reads x, dy, writes dx
                                              (the row / group stays in cache)
==============================  ============  =============================================

GB/s in the reports is ``bytes / median time``; the "copy" column is ``np.copyto`` of
the same number of bytes (half read, half written), the memory-bound floor.

This module imports only NumPy and normkit; torch and onnx are passed in by the caller
(imported lazily, only when installed).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Case", "Op", "NotApplicable", "OnnxNode", "CASES", "CASE_BY_NAME", "TAGS", "CATEGORIES",
    "RESNET50_BN_LAYERS", "BERT_BASE_LAYERNORMS", "select_cases", "make_data", "case_bytes",
    "normkit_runner", "plain_runner", "torch_runner", "onnx_units", "copy_runner",
    "to_arrays", "max_rel_error", "run_for_check",
]


class NotApplicable(Exception):
    """This implementation does not offer this case (the message says why)."""


@dataclass
class OnnxNode:
    """One ONNX node for one unit: ``inputs`` is a list of (role, array, is_graph_input)."""
    op_type: str
    opset: int
    attrs: dict
    inputs: list
    n_outputs: int = 1
    domain: str = ""


# ====================================================================== helpers
_EPS = 1e-5
_RMS_EPS = 1e-6          # LLaMA-style; passed explicitly so every implementation agrees


def _channel_axis(layout):
    return -1 if layout == "nhwc" else 1


def _reduce_axes(ndim, layout):
    """Axes BatchNorm reduces over (all but the channel axis)."""
    ax = _channel_axis(layout) % ndim
    return tuple(i for i in range(ndim) if i != ax)


def _bshape(ndim, layout, c):
    """Shape that broadcasts a per-channel vector against x."""
    s = [1] * ndim
    s[_channel_axis(layout)] = c
    return tuple(s)


def _to_nchw_perm(ndim):
    return (0, ndim - 1, *range(1, ndim - 1))


def _from_nchw_perm(ndim):
    return (0, *range(2, ndim), 1)


def _torch_dtype(torch, dtype):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
            np.dtype(np.float16): torch.float16}[np.dtype(dtype)]


def _t(torch, a):
    """numpy -> torch without a copy (a fresh tensor that shares memory)."""
    return torch.from_numpy(a)


def _tlayout(xt, layout):
    """NHWC arrays become channels-last NCHW views for torch (same memory, no copy)."""
    return xt.permute(*_to_nchw_perm(xt.ndim)) if layout == "nhwc" else xt


def _untlayout(yt, layout):
    return yt.permute(*_from_nchw_perm(yt.ndim)) if layout == "nhwc" else yt


# ====================================================================== ops
class Op:
    """A norm in one mode. Subclasses fill in the implementations."""

    key = ""
    norm = ""
    #: bytes that must move, in units of x's bytes (see the module docstring)
    traffic = 2
    training = False
    backward = False
    #: correctness tolerance (max |a - ref| / max(1, max |ref|)) by dtype
    tols = {"float32": 2e-4, "float64": 1e-9, "float16": 4e-3}

    def tol(self, dtype):
        t = self.tols[np.dtype(dtype).name]
        return t * 10 if self.backward else t

    # --- data
    def make_unit(self, x, layout, rng, params):
        """The unit's arrays besides ``x`` (parameters, running statistics, dy)."""
        raise NotImplementedError

    # --- implementations: each returns a zero-argument callable
    def normkit(self, u, backend):
        raise NotImplementedError

    def plain(self, u):
        raise NotImplementedError

    def torch(self, u, torch):
        """Returns (fn, fetch): fetch turns fn's result into NumPy arrays in user layout."""
        raise NotImplementedError

    def onnx(self, u):
        raise NotApplicable("no ONNX operator")


def _rand(rng, shape, dtype, scale=1.0, loc=0.0):
    a = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        a *= scale
    if loc:
        a += loc
    return a.astype(dtype, copy=False)


def _channel_params(rng, c, dtype, running=True):
    p = {"w": (1.0 + 0.1 * rng.standard_normal(c)).astype(dtype),
         "b": (0.1 * rng.standard_normal(c)).astype(dtype)}
    if running:
        p["rm"] = (0.1 * rng.standard_normal(c)).astype(dtype)
        p["rv"] = (0.5 + rng.random(c)).astype(dtype)
    return p


class _ChannelOp(Op):
    """Ops whose parameters are per channel (BN, GN, IN)."""

    running = False

    def make_unit(self, x, layout, rng, params):
        c = x.shape[_channel_axis(layout)]
        u = {"x": x, "layout": layout, "c": c, "groups": params.get("groups", 0)}
        u.update(_channel_params(rng, c, x.dtype, self.running))
        if self.backward:
            u["dy"] = _rand(rng, x.shape, x.dtype)
        return u


# ---------------------------------------------------------------- BatchNorm eval
class BatchNormEval(_ChannelOp):
    key, norm, traffic, running = "bn_eval", "batch_norm", 2, True

    def normkit(self, u, backend):
        import normkit as nk
        x, rm, rv, w, b, ax = u["x"], u["rm"], u["rv"], u["w"], u["b"], _channel_axis(u["layout"])
        return lambda: nk.batch_norm(x, rm, rv, w, b, False, 0.1, _EPS, axis=ax,
                                     backend=backend)

    def plain(self, u):
        x = u["x"]
        bs = _bshape(x.ndim, u["layout"], u["c"])
        rm, rv, w, b = (u[k].reshape(bs) for k in ("rm", "rv", "w", "b"))
        return lambda: (x - rm) / np.sqrt(rv + _EPS) * w + b

    def torch(self, u, torch):
        F = torch.nn.functional
        lay = u["layout"]
        xt = _tlayout(_t(torch, u["x"]), lay)
        rm, rv, w, b = (_t(torch, u[k]) for k in ("rm", "rv", "w", "b"))

        def fn():
            with torch.inference_mode():
                return F.batch_norm(xt, rm, rv, w, b, False, 0.1, _EPS)
        return fn, lambda y: [_untlayout(y, lay).numpy()]

    def onnx(self, u):
        if u["layout"] == "nhwc":
            raise NotApplicable("ORT's BatchNormalization is NCHW-only (a transpose would "
                                "not be the same operation)")
        return OnnxNode("BatchNormalization", 15, {"epsilon": _EPS},
                        [("x", u["x"], True), ("w", u["w"], False), ("b", u["b"], False),
                         ("rm", u["rm"], False), ("rv", u["rv"], False)])


# ---------------------------------------------------------------- BatchNorm training
class BatchNormTrain(_ChannelOp):
    norm, running, training = "batch_norm", True, True

    def __init__(self, backward):
        self.backward = backward
        self.key = "bn_train_fb" if backward else "bn_train_fwd"
        self.traffic = 8 if backward else 3

    def normkit(self, u, backend):
        import normkit as nk
        x, w, b, ax = u["x"], u["w"], u["b"], _channel_axis(u["layout"])
        rm, rv = u["rm"].copy(), u["rv"].copy()       # updated in place: own copies
        if not self.backward:
            return lambda: nk.batch_norm(x, rm, rv, w, b, True, 0.1, _EPS, axis=ax,
                                         backend=backend)
        dy = u["dy"]

        def fn():
            _, mean, rstd = nk.batch_norm(x, rm, rv, w, b, True, 0.1, _EPS, axis=ax,
                                          backend=backend, return_stats=True)
            return nk.batch_norm_backward(dy, x, mean, rstd, w, training=True, axis=ax,
                                          backend=backend)
        return fn

    def plain(self, u):
        x, lay, c = u["x"], u["layout"], u["c"]
        axes, bs = _reduce_axes(x.ndim, lay), _bshape(x.ndim, lay, c)
        w, b = u["w"].reshape(bs), u["b"].reshape(bs)
        rm, rv = u["rm"].copy(), u["rv"].copy()
        n = x.size // c

        def forward():
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            rm[...] = 0.9 * rm + 0.1 * mean.reshape(c)
            rv[...] = 0.9 * rv + 0.1 * var.reshape(c) * (n / (n - 1))
            rstd = 1.0 / np.sqrt(var + _EPS)
            return (x - mean) * rstd, rstd

        if not self.backward:
            return lambda: forward()[0] * w + b
        dy = u["dy"]

        def fn():
            xhat, rstd = forward()
            _ = xhat * w + b
            gb = dy.sum(axis=axes)
            gw = (dy * xhat).sum(axis=axes)
            gx = (w * rstd / n) * (n * dy - gb.reshape(bs) - xhat * gw.reshape(bs))
            return gx, gw, gb
        return fn

    def torch(self, u, torch):
        F = torch.nn.functional
        lay = u["layout"]
        rm, rv = _t(torch, u["rm"].copy()), _t(torch, u["rv"].copy())
        if not self.backward:
            xt = _tlayout(_t(torch, u["x"]), lay)
            w, b = _t(torch, u["w"]), _t(torch, u["b"])

            def fwd():
                with torch.no_grad():
                    return F.batch_norm(xt, rm, rv, w, b, True, 0.1, _EPS)
            return fwd, lambda y: [_untlayout(y, lay).numpy()]
        return _torch_fb(torch, u, lambda xv, w, b: F.batch_norm(xv, rm, rv, w, b, True,
                                                                 0.1, _EPS))

    def onnx(self, u):
        if self.backward:
            raise NotApplicable("ONNX Runtime (inference build) has no backward")
        if u["layout"] == "nhwc":
            raise NotApplicable("ORT's BatchNormalization is NCHW-only")
        # training_mode=1 uses batch statistics; ONNX momentum is the weight of the
        # running value (torch's 1 - momentum). Only Y is compared.
        return OnnxNode("BatchNormalization", 15,
                        {"epsilon": _EPS, "momentum": 0.9, "training_mode": 1},
                        [("x", u["x"], True), ("w", u["w"], False), ("b", u["b"], False),
                         ("rm", u["rm"], False), ("rv", u["rv"], False)], n_outputs=3)


def _torch_fb(torch, u, forward, weight_keys=("w", "b")):
    """Training forward + backward through autograd; grads are reset (set to None) first."""
    lay = u["layout"]
    xt = _t(torch, u["x"]).requires_grad_(True)
    xv = _tlayout(xt, lay)
    dyv = _tlayout(_t(torch, u["dy"]), lay)
    params = [_t(torch, u[k]).requires_grad_(True) for k in weight_keys]

    def fn():
        xt.grad = None
        for p in params:
            p.grad = None
        y = forward(xv, *params)
        y.backward(dyv)
        return (xt.grad, *(p.grad for p in params))
    return fn, lambda r: [a.numpy() for a in r]


# ---------------------------------------------------------------- LayerNorm / RMSNorm
class RowsNorm(Op):
    """LayerNorm (rms=False) or RMSNorm (rms=True) over the last axis."""

    def __init__(self, rms, backward=False):
        self.rms, self.backward = rms, backward
        self.norm = "rms_norm" if rms else "layer_norm"
        base = "rms" if rms else "ln"
        self.key = base + ("_train_fb" if backward else "")
        self.training = backward
        self.traffic = 5 if backward else 2

    def make_unit(self, x, layout, rng, params):
        k = x.shape[-1]
        u = {"x": x, "layout": layout, "k": k,
             "w": (1.0 + 0.1 * rng.standard_normal(k)).astype(x.dtype),
             "b": (0.1 * rng.standard_normal(k)).astype(x.dtype)}
        if self.backward:
            u["dy"] = _rand(rng, x.shape, x.dtype)
        return u

    def normkit(self, u, backend):
        import normkit as nk
        x, w, b, ns = u["x"], u["w"], u["b"], (u["k"],)
        if not self.backward:
            if self.rms:
                return lambda: nk.rms_norm(x, ns, w, _RMS_EPS, backend=backend)
            return lambda: nk.layer_norm(x, ns, w, b, _EPS, backend=backend)
        dy = u["dy"]
        if self.rms:
            def fn():
                _, _, rstd = nk.rms_norm(x, ns, w, _RMS_EPS, backend=backend,
                                         return_stats=True)
                return nk.rms_norm_backward(dy, x, ns, None, rstd, w, backend=backend)[:2]
            return fn

        def fn():
            _, mean, rstd = nk.layer_norm(x, ns, w, b, _EPS, backend=backend,
                                          return_stats=True)
            return nk.layer_norm_backward(dy, x, ns, mean, rstd, w, backend=backend)
        return fn

    def plain(self, u):
        x, w, b = u["x"], u["w"], u["b"]
        rows = tuple(range(x.ndim - 1))

        def forward():
            if self.rms:
                rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + _RMS_EPS)
                return x * rstd, rstd
            mean = x.mean(axis=-1, keepdims=True)
            rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + _EPS)
            return (x - mean) * rstd, rstd

        if not self.backward:
            if self.rms:
                return lambda: forward()[0] * w
            return lambda: forward()[0] * w + b
        dy = u["dy"]

        def fn():
            xhat, rstd = forward()
            _ = xhat * w if self.rms else xhat * w + b
            g = dy * w
            proj = (g * xhat).mean(axis=-1, keepdims=True)
            if self.rms:
                gx = rstd * (g - xhat * proj)
            else:
                gx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * proj)
            gw = (dy * xhat).sum(axis=rows)
            return (gx, gw) if self.rms else (gx, gw, dy.sum(axis=rows))
        return fn

    def torch(self, u, torch):
        F = torch.nn.functional
        ns = (u["k"],)
        if self.rms:
            def f(xv, w):
                return F.rms_norm(xv, ns, w, _RMS_EPS)
            keys = ("w",)
        else:
            def f(xv, w, b):
                return F.layer_norm(xv, ns, w, b, _EPS)
            keys = ("w", "b")
        if self.backward:
            return _torch_fb(torch, u, f, keys)
        xt = _t(torch, u["x"])
        params = [_t(torch, u[k]) for k in keys]

        def fn():
            with torch.inference_mode():
                return f(xt, *params)
        return fn, lambda y: [y.numpy()]

    def onnx(self, u):
        if self.backward:
            raise NotApplicable("ONNX Runtime (inference build) has no backward")
        if self.rms:
            return OnnxNode("RMSNormalization", 23, {"axis": -1, "epsilon": _RMS_EPS},
                            [("x", u["x"], True), ("w", u["w"], False)])
        return OnnxNode("LayerNormalization", 17, {"axis": -1, "epsilon": _EPS},
                        [("x", u["x"], True), ("w", u["w"], False), ("b", u["b"], False)])


# ---------------------------------------------------------------- GroupNorm / InstanceNorm
class PerSampleNorm(_ChannelOp):
    """GroupNorm (groups > 0 in the case params) or InstanceNorm (instance=True)."""

    def __init__(self, instance, backward=False):
        self.instance, self.backward = instance, backward
        self.norm = "instance_norm" if instance else "group_norm"
        base = "in" if instance else "gn"
        self.key = base + ("_train_fb" if backward else "")
        self.training = backward
        self.traffic = 5 if backward else 2

    def _groups(self, u):
        return u["c"] if self.instance else u["groups"]

    def normkit(self, u, backend):
        import normkit as nk
        x, w, b, ax, g = u["x"], u["w"], u["b"], _channel_axis(u["layout"]), u["groups"]
        if self.instance:
            def fwd(**kw):
                return nk.instance_norm(x, None, None, w, b, True, 0.1, _EPS, axis=ax,
                                        backend=backend, **kw)
        else:
            def fwd(**kw):
                return nk.group_norm(x, g, w, b, _EPS, axis=ax, backend=backend, **kw)
        if not self.backward:
            return fwd
        dy = u["dy"]

        def fn():
            _, mean, rstd = fwd(return_stats=True)
            if self.instance:
                return nk.instance_norm_backward(dy, x, mean, rstd, w, axis=ax,
                                                 backend=backend)
            return nk.group_norm_backward(dy, x, g, mean, rstd, w, axis=ax, backend=backend)
        return fn

    def plain(self, u):
        x, lay, c = u["x"], u["layout"], u["c"]
        g = self._groups(u)
        nhwc = lay == "nhwc"
        n = x.shape[0]
        xc = np.moveaxis(x, -1, 1) if nhwc else x          # NCHW view
        cs = (1, c) + (1,) * (x.ndim - 2)
        w, b = u["w"].reshape(cs), u["b"].reshape(cs)

        def forward():
            xg = xc.reshape(n, g, -1)
            mean = xg.mean(axis=-1, keepdims=True)
            rstd = 1.0 / np.sqrt(xg.var(axis=-1, keepdims=True) + _EPS)
            return ((xg - mean) * rstd).reshape(xc.shape), rstd

        def back(a):
            return np.moveaxis(a, 1, -1) if nhwc else a

        if not self.backward:
            return lambda: back(forward()[0] * w + b)
        dyc = np.moveaxis(u["dy"], -1, 1) if nhwc else u["dy"]
        sp = (0,) + tuple(range(2, x.ndim))

        def fn():
            xhat, rstd = forward()
            _ = xhat * w + b
            gr = (dyc * w).reshape(n, g, -1)
            xh = xhat.reshape(n, g, -1)
            gx = rstd * (gr - gr.mean(axis=-1, keepdims=True)
                         - xh * (gr * xh).mean(axis=-1, keepdims=True))
            return (back(gx.reshape(xc.shape)), (dyc * xhat).sum(axis=sp), dyc.sum(axis=sp))
        return fn

    def torch(self, u, torch):
        F = torch.nn.functional
        g = u["groups"]
        if self.instance:
            def f(xv, w, b):
                return F.instance_norm(xv, None, None, w, b, True, 0.1, _EPS)
        else:
            def f(xv, w, b):
                return F.group_norm(xv, g, w, b, _EPS)
        if self.backward:
            return _torch_fb(torch, u, f)
        lay = u["layout"]
        xt = _tlayout(_t(torch, u["x"]), lay)
        w, b = _t(torch, u["w"]), _t(torch, u["b"])

        def fn():
            with torch.inference_mode():
                return f(xt, w, b)
        return fn, lambda y: [_untlayout(y, lay).numpy()]

    def onnx(self, u):
        if self.backward:
            raise NotApplicable("ONNX Runtime (inference build) has no backward")
        if u["layout"] == "nhwc":
            raise NotApplicable(f"ONNX {'Instance' if self.instance else 'Group'}"
                                "Normalization is NCHW-only")
        ins = [("x", u["x"], True), ("w", u["w"], False), ("b", u["b"], False)]
        if self.instance:
            return OnnxNode("InstanceNormalization", 17, {"epsilon": _EPS}, ins)
        # opset 21: scale and bias are per channel (opset 18 had them per group)
        return OnnxNode("GroupNormalization", 21, {"epsilon": _EPS, "num_groups": u["groups"]},
                        ins)


OPS = {op.key: op for op in (
    BatchNormEval(), BatchNormTrain(False), BatchNormTrain(True),
    RowsNorm(False), RowsNorm(True), RowsNorm(False, True), RowsNorm(True, True),
    PerSampleNorm(False), PerSampleNorm(True), PerSampleNorm(False, True),
    PerSampleNorm(True, True))}


# ====================================================================== real models
def _resnet50_bn_layers():
    """(channels, spatial) of the 53 BatchNorm layers of torchvision's ResNet-50 (v1.5,
    224x224 input, stride in the 3x3 conv), in forward order."""
    layers = [(64, 112)]                                   # stem bn1
    size = 56
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            out = size // s
            layers += [(planes, size), (planes, out), (planes * 4, out)]   # bn1, bn2, bn3
            if i == 0:
                layers.append((planes * 4, out))                           # downsample bn
            size = out
    return layers


RESNET50_BN_LAYERS = _resnet50_bn_layers()
assert len(RESNET50_BN_LAYERS) == 53
#: BERT-base: embedding LayerNorm + 2 per encoder layer x 12 layers, hidden 768
BERT_BASE_LAYERNORMS = 25


# ====================================================================== cases
TAGS = ("quick", "default", "full")
CATEGORIES = ("batchnorm", "rows", "groupnorm", "training", "tiny", "model")


@dataclass
class Case:
    """One row of the table.

    ``units``: the input shapes (in the case's layout) run back to back in one call of the
    case; ``smoke_units`` the small stand-ins the ordinary ``pytest`` run uses.
    ``tier``: ``quick`` (also in default and full), ``default`` (also in full) or ``full``.
    """
    name: str
    op: Op
    layout: str
    units: list
    dtype: str = "float32"
    tier: str = "default"
    category: str = ""
    params: dict = field(default_factory=dict)
    smoke_units: list = None
    description: str = ""

    @property
    def tags(self):
        return {"quick": ("quick", "default", "full"), "default": ("default", "full"),
                "full": ("full",)}[self.tier]

    @property
    def norm(self):
        return self.op.norm

    def shapes(self, smoke=False):
        return self.smoke_units if smoke else self.units

    def tol(self):
        return self.op.tol(self.dtype)


def _smoke_shape(shape, layout):
    """A small stand-in that keeps the channel count / row length (the kernel paths)."""
    s = list(shape)
    s[0] = min(s[0], 2)
    if layout in ("nchw", "nhwc"):
        sp = range(2, len(s)) if layout == "nchw" else range(1, len(s) - 1)
        for i in sp:
            s[i] = min(s[i], 6)
    elif layout == "rows":
        for i in range(1, len(s) - 1):
            s[i] = min(s[i], 4)
    return tuple(s)


def _name_shape(shape):
    return "x".join(map(str, shape))


def _case(op_key, layout, shape, tier="default", dtype="float32", category=None, prefix="",
          name=None, **params):
    op = OPS[op_key]
    shape = tuple(shape)
    if name is None:
        label = op_key
        if op_key.startswith("gn"):
            label = f"gn{params['groups']}" + op_key[2:]
        parts = [prefix + label]
        if layout != "rows":
            parts.append(layout)
        parts.append(_name_shape(shape))
        if dtype != "float32":
            parts.append({"float64": "f64", "float16": "f16"}[dtype])
        name = "_".join(parts)
    if category is None:
        category = ("training" if op.training else
                    {"batch_norm": "batchnorm", "layer_norm": "rows", "rms_norm": "rows",
                     "group_norm": "groupnorm", "instance_norm": "groupnorm"}[op.norm])
    return Case(name, op, layout, [shape], dtype, tier, category, params,
                [_smoke_shape(shape, layout)])


def _nhwc(n, c, h, w):
    return (n, h, w, c)


def _build_cases():
    cs = []
    add = cs.append
    # --- BatchNorm eval, ResNet shapes (CPU inference)
    for n, tier in ((1, "quick"), (8, "default"), (32, "default")):
        add(_case("bn_eval", "nchw", (n, 64, 56, 56), tier))
        add(_case("bn_eval", "nhwc", _nhwc(n, 64, 56, 56), tier))
    for c, hw in ((256, 56), (512, 28), (1024, 14)):
        add(_case("bn_eval", "nchw", (8, c, hw, hw), "full"))
        add(_case("bn_eval", "nhwc", _nhwc(8, c, hw, hw), "full"))
    add(_case("bn_eval", "nchw", (8, 2048, 7, 7)))
    add(_case("bn_eval", "nhwc", _nhwc(8, 2048, 7, 7)))
    add(_case("bn_eval", "nchw", (32, 256, 56, 56), "full"))
    add(_case("bn_eval", "nchw", (8, 64, 56, 56), "full", "float64"))
    add(_case("bn_eval", "nchw", (8, 64, 56, 56), "full", "float16"))
    add(_case("bn_eval", "nc", (256, 1024), "full"))                 # BatchNorm1d on (N, C)
    # --- LayerNorm / RMSNorm, transformer shapes (batch x seq x hidden)
    add(_case("ln", "rows", (1, 128, 768), "quick"))
    add(_case("ln", "rows", (8, 128, 768)))
    add(_case("ln", "rows", (8, 512, 1024)))
    add(_case("ln", "rows", (4, 128, 4096)))
    add(_case("ln", "rows", (32, 512, 1024), "full"))
    add(_case("ln", "rows", (1, 2048, 4096), "full"))
    add(_case("ln", "rows", (8, 128, 768), "default", "float16"))
    add(_case("ln", "rows", (8, 128, 768), "full", "float64"))
    add(_case("rms", "rows", (1, 512, 4096), "quick"))
    add(_case("rms", "rows", (8, 128, 768)))
    add(_case("rms", "rows", (8, 512, 1024)))
    add(_case("rms", "rows", (4, 512, 4096), "full"))
    add(_case("rms", "rows", (1, 2048, 4096), "full"))
    # --- GroupNorm (32 groups) and InstanceNorm
    add(_case("gn", "nchw", (1, 256, 56, 56), "quick", groups=32))
    add(_case("gn", "nchw", (8, 256, 28, 28), groups=32))
    add(_case("gn", "nhwc", _nhwc(8, 256, 28, 28), groups=32))
    add(_case("gn", "nchw", (2, 320, 64, 64), groups=32))          # Stable Diffusion UNet
    add(_case("gn", "nhwc", _nhwc(2, 320, 64, 64), groups=32))
    add(_case("gn", "nchw", (8, 512, 28, 28), "full", groups=32))
    add(_case("in", "nchw", (1, 64, 256, 256)))                     # style transfer
    add(_case("in", "nchw", (8, 128, 64, 64)))
    add(_case("in", "nhwc", _nhwc(8, 128, 64, 64), "full"))
    add(_case("in", "nchw", (1, 3, 512, 512), "full"))
    # --- training: forward, and forward + backward
    add(_case("bn_train_fwd", "nchw", (8, 64, 56, 56), "quick"))
    add(_case("bn_train_fwd", "nchw", (32, 64, 56, 56)))
    add(_case("bn_train_fwd", "nhwc", _nhwc(32, 64, 56, 56)))
    add(_case("bn_train_fb", "nchw", (8, 64, 56, 56), "quick"))
    add(_case("bn_train_fb", "nchw", (32, 64, 56, 56)))
    add(_case("bn_train_fb", "nhwc", _nhwc(32, 64, 56, 56), "full"))
    add(_case("ln_train_fb", "rows", (8, 128, 768)))
    add(_case("rms_train_fb", "rows", (8, 512, 1024)))
    add(_case("gn_train_fb", "nchw", (8, 256, 28, 28), groups=32))
    add(_case("in_train_fb", "nchw", (8, 64, 56, 56), "full"))
    # --- tiny inputs: per-call overhead
    add(_case("bn_eval", "nchw", (1, 16, 4, 4), "quick", category="tiny", prefix="tiny_"))
    add(_case("ln", "rows", (1, 1, 768), "quick", category="tiny", prefix="tiny_"))
    add(_case("rms", "rows", (1, 1, 4096), "quick", category="tiny", prefix="tiny_"))
    add(_case("gn", "nchw", (1, 32, 4, 4), category="tiny", prefix="tiny_", groups=8))
    add(_case("in", "nchw", (1, 8, 8, 8), category="tiny", prefix="tiny_"))
    add(_case("ln_train_fb", "rows", (2, 4, 64), category="tiny", prefix="tiny_"))
    # --- real models: every BN layer of ResNet-50; the LayerNorms of one BERT-base pass
    for n, tier in ((1, "quick"), (8, "default")):
        units = [(n, c, hw, hw) for c, hw in RESNET50_BN_LAYERS]
        cs.append(Case(f"resnet50_bn_eval_b{n}", OPS["bn_eval"], "nchw", units, "float32",
                       tier, "model", {}, [(1, c, min(hw, 4), min(hw, 4))
                                           for c, hw in RESNET50_BN_LAYERS],
                       f"the 53 BatchNorm layers of ResNet-50 (eval, batch {n}, 224x224)"))
    cs.append(Case("bert_base_ln_b8x128", OPS["ln"], "rows",
                   [(8, 128, 768)] * BERT_BASE_LAYERNORMS, "float32", "default", "model", {},
                   [(1, 4, 768)] * BERT_BASE_LAYERNORMS,
                   "the 25 LayerNorms of one BERT-base encoder pass (batch 8, seq 128)"))
    names = [c.name for c in cs]
    assert len(names) == len(set(names)), "duplicate case names"
    return cs


CASES = _build_cases()
CASE_BY_NAME = {c.name: c for c in CASES}


def select_cases(tier="default", patterns=None):
    """Cases of a tier (``quick``/``default``/``full``); ``patterns`` (fnmatch globs over
    names, or a tag / category name) select from the whole table instead."""
    import fnmatch
    if not patterns:
        return [c for c in CASES if tier in c.tags]
    out = []
    for c in CASES:
        for p in patterns:
            if (fnmatch.fnmatchcase(c.name, p) or p == c.category or p in c.tags
                    or p == c.op.key):
                out.append(c)
                break
    return out


# ====================================================================== data and runners
def make_data(case, smoke=False):
    """The units' arrays: inputs of one shape are shared between units (a real network
    hands each layer a fresh activation, but allocating 53 of them would dominate)."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    shared_x = {}
    units = []
    for shape in case.shapes(smoke):
        shape = tuple(shape)
        if shape not in shared_x:
            # mean 0.3, std 1.5: not centred, so a wrong mean shows up
            shared_x[shape] = _rand(rng, shape, np.dtype(case.dtype), 1.5, 0.3)
        units.append(case.op.make_unit(shared_x[shape], case.layout, rng, case.params))
    return units


def case_bytes(case, units):
    return sum(case.op.traffic * u["x"].nbytes for u in units)


class _Sequence:
    """Run the units back to back, as an eager framework runs layers: each output is
    dropped as soon as the next unit has run (so the allocator reuses its memory, as it
    would for activations consumed by the next layer). ``collect()`` keeps them all,
    for the correctness check."""

    __slots__ = ("fns",)

    def __init__(self, fns):
        self.fns = fns

    def __call__(self):
        out = None
        for f in self.fns:
            out = f()
        return out

    def collect(self):
        return [f() for f in self.fns]


def _sequence(fns):
    return fns[0] if len(fns) == 1 else _Sequence(fns)


def run_for_check(fn):
    """Call ``fn`` once and return what its ``fetch`` expects (all units' outputs)."""
    return fn.collect() if isinstance(fn, _Sequence) else fn()


def normkit_runner(case, units, backend):
    """The normkit call(s) of a case; ``run_for_check(fn)`` gives every unit's output."""
    return _sequence([case.op.normkit(u, backend) for u in units])


def plain_runner(case, units):
    return _sequence([case.op.plain(u) for u in units])


def torch_runner(case, units, torch):
    """(fn, fetch) for torch; raises NotApplicable if torch lacks the dtype etc."""
    pairs = [case.op.torch(u, torch) for u in units]
    fn = _sequence([p[0] for p in pairs])
    if len(pairs) == 1:
        return fn, pairs[0][1]
    return fn, lambda rs: [a for (_, fetch), r in zip(pairs, rs, strict=True) for a in fetch(r)]


def onnx_units(case, units):
    """The ONNX node of every unit (raises NotApplicable)."""
    return [case.op.onnx(u) for u in units]


def copy_runner(case, units):
    """np.copyto moving the same bytes as the case (half read, half written), unit by unit."""
    bufs = {}
    fns = []
    for u in units:
        nb = case.op.traffic * u["x"].nbytes // 2
        if nb not in bufs:
            bufs[nb] = (np.ones(nb, np.uint8), np.empty(nb, np.uint8))
        src, dst = bufs[nb]
        fns.append(lambda src=src, dst=dst: np.copyto(dst, src))
    return _sequence(fns)


def to_arrays(result):
    """Flatten a result (array, tuple/list of arrays or tensors) into NumPy arrays."""
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in to_arrays(r)]
    if result is None:
        return []
    if hasattr(result, "detach"):
        return [result.detach().numpy()]
    return [np.asarray(result)]


def max_rel_error(got, ref):
    """max |got - ref| / max(1, max |ref|) over matching arrays (inf on shape mismatch/NaN)."""
    if len(got) != len(ref):
        return math.inf
    worst = 0.0
    for a, r in zip(got, ref, strict=True):
        if a.shape != r.shape:
            return math.inf
        a64, r64 = a.astype(np.float64), r.astype(np.float64)
        if a.size == 0:
            continue
        with np.errstate(all="ignore"):
            err = np.max(np.abs(a64 - r64))
            scale = max(1.0, float(np.max(np.abs(r64))))
        if not np.isfinite(err):
            return math.inf
        worst = max(worst, float(err) / scale)
    return worst
