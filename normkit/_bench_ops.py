"""The benchmark operations: each norm in each mode, as every implementation runs it.

The interface (:class:`~normkit._bench_op_base.Op`), the bytes model and the dtype
rules are in :mod:`normkit._bench_op_base`; the cases that use these ops are in
:mod:`normkit._bench_cases`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._bench_op_base import (
    EPS,
    RMS_EPS,
    ChannelOp,
    NotApplicable,
    OnnxNode,
    Op,
    bshape,
    channel_axis,
    rand,
    reduce_axes,
    tlayout,
    to_torch,
    torch_fb,
    torch_to_numpy,
    untlayout,
)

__all__ = ["OPS", "BatchNormEval", "BatchNormEvalAddRelu", "BatchNormTrain", "RowsNorm",
           "PerSampleNorm"]


# ---------------------------------------------------------------- BatchNorm eval
class BatchNormEval(ChannelOp):
    key, norm, traffic, running = "bn_eval", "batch_norm", 2, True

    def normkit(self, u, backend):
        import normkit as nk
        x, rm, rv, w, b, ax = u["x"], u["rm"], u["rv"], u["w"], u["b"], channel_axis(u["layout"])
        return lambda: nk.batch_norm(x, rm, rv, w, b, False, 0.1, EPS, axis=ax,
                                     backend=backend)

    def plain(self, u):
        x = u["x"]
        bs = bshape(x.ndim, u["layout"], u["c"])
        rm, rv, w, b = (u[k].reshape(bs) for k in ("rm", "rv", "w", "b"))
        return lambda: (x - rm) / np.sqrt(rv + EPS) * w + b

    def torch(self, u, torch):
        F = torch.nn.functional
        lay = u["layout"]
        xt = tlayout(to_torch(torch, u["x"]), lay)
        rm, rv, w, b = (to_torch(torch, u[k]) for k in ("rm", "rv", "w", "b"))

        def fn():
            with torch.inference_mode():
                return F.batch_norm(xt, rm, rv, w, b, False, 0.1, EPS)
        return fn, lambda y: [torch_to_numpy(untlayout(y, lay))]

    def onnx(self, u):
        if u["layout"] == "nhwc":
            raise NotApplicable("ORT's BatchNormalization is NCHW-only (a transpose would "
                                "not be the same operation)")
        return OnnxNode("BatchNormalization", 15, {"epsilon": EPS},
                        [("x", u["x"], True), ("w", u["w"], False), ("b", u["b"], False),
                         ("rm", u["rm"], False), ("rv", u["rv"], False)])


class BatchNormEvalAddRelu(BatchNormEval):
    """relu(bn(x) + r): the eval BatchNorm of a ResNet block with its residual add and
    ReLU. normkit fuses them into the normalization pass (``activation="relu",
    residual=r``); torch runs them as a user writes them, in place after the norm
    (``bn(x).add_(r).relu_()``, as torchvision's blocks do); ONNX Runtime gets the
    three-node graph and fuses what its graph optimizer can."""

    key, traffic, residual = "bn_eval_add_relu", 3, True

    def normkit(self, u, backend):
        import normkit as nk
        x, rm, rv, w, b, ax = u["x"], u["rm"], u["rv"], u["w"], u["b"], channel_axis(u["layout"])
        r = u["r"]
        return lambda: nk.batch_norm(x, rm, rv, w, b, False, 0.1, EPS, axis=ax,
                                     backend=backend, activation="relu", residual=r)

    def plain(self, u):
        bn, r = super().plain(u), u["r"]
        return lambda: np.maximum(bn() + r, 0)

    def torch(self, u, torch):
        bn, fetch = super().torch(u, torch)
        rt = tlayout(to_torch(torch, u["r"]), u["layout"])

        def fn():
            with torch.inference_mode():
                return bn().add_(rt).relu_()
        return fn, fetch

    def onnx(self, u):
        node = super().onnx(u)
        node.epilogue = [("Add", [("r", u["r"], True)]), ("Relu", [])]
        return node


# ---------------------------------------------------------------- BatchNorm training
class BatchNormTrain(ChannelOp):
    norm, running, training = "batch_norm", True, True

    def __init__(self, backward):
        self.backward = backward
        self.key = "bn_train_fb" if backward else "bn_train_fwd"
        self.traffic = 8 if backward else 3

    def normkit(self, u, backend):
        import normkit as nk
        x, w, b, ax = u["x"], u["w"], u["b"], channel_axis(u["layout"])
        rm, rv = u["rm"].copy(), u["rv"].copy()       # updated in place: own copies
        if not self.backward:
            return lambda: nk.batch_norm(x, rm, rv, w, b, True, 0.1, EPS, axis=ax,
                                         backend=backend)
        dy = u["dy"]

        def fn():
            _, mean, rstd = nk.batch_norm(x, rm, rv, w, b, True, 0.1, EPS, axis=ax,
                                          backend=backend, return_stats=True)
            return nk.batch_norm_backward(dy, x, mean, rstd, w, training=True, axis=ax,
                                          backend=backend)
        return fn

    def plain(self, u):
        x, lay, c = u["x"], u["layout"], u["c"]
        axes, bs = reduce_axes(x.ndim, lay), bshape(x.ndim, lay, c)
        w, b = u["w"].reshape(bs), u["b"].reshape(bs)
        rm, rv = u["rm"].copy(), u["rv"].copy()
        n = x.size // c

        def forward():
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            rm[...] = 0.9 * rm + 0.1 * mean.reshape(c)
            rv[...] = 0.9 * rv + 0.1 * var.reshape(c) * (n / (n - 1))
            rstd = 1.0 / np.sqrt(var + EPS)
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
        rm, rv = to_torch(torch, u["rm"].copy()), to_torch(torch, u["rv"].copy())
        if not self.backward:
            xt = tlayout(to_torch(torch, u["x"]), lay)
            w, b = to_torch(torch, u["w"]), to_torch(torch, u["b"])

            def fwd():
                with torch.no_grad():
                    return F.batch_norm(xt, rm, rv, w, b, True, 0.1, EPS)
            return fwd, lambda y: [torch_to_numpy(untlayout(y, lay))]
        return torch_fb(torch, u, lambda xv, w, b: F.batch_norm(xv, rm, rv, w, b, True,
                                                                 0.1, EPS))

    def onnx(self, u):
        if self.backward:
            raise NotApplicable("ONNX Runtime (inference build) has no backward")
        if u["layout"] == "nhwc":
            raise NotApplicable("ORT's BatchNormalization is NCHW-only")
        # training_mode=1 uses batch statistics; ONNX momentum is the weight of the
        # running value (torch's 1 - momentum). Only Y is compared.
        return OnnxNode("BatchNormalization", 15,
                        {"epsilon": EPS, "momentum": 0.9, "training_mode": 1},
                        [("x", u["x"], True), ("w", u["w"], False), ("b", u["b"], False),
                         ("rm", u["rm"], False), ("rv", u["rv"], False)], n_outputs=3)


# ---------------------------------------------------------------- LayerNorm / RMSNorm
class RowsNorm(Op):
    """LayerNorm (rms=False) or RMSNorm (rms=True) over the last axis."""

    def __init__(self, rms, backward=False):
        self.rms = rms
        self._name("rms_norm" if rms else "layer_norm", "rms" if rms else "ln", backward)

    def make_unit(self, x, layout, rng, params):
        k = x.shape[-1]
        u = {"x": x, "layout": layout, "k": k,
             "w": (1.0 + 0.1 * rng.standard_normal(k)).astype(x.dtype),
             "b": (0.1 * rng.standard_normal(k)).astype(x.dtype)}
        if self.backward:
            u["dy"] = rand(rng, x.shape, x.dtype)
        return u

    def normkit(self, u, backend):
        import normkit as nk
        x, w, b, ns = u["x"], u["w"], u["b"], (u["k"],)
        if not self.backward:
            if self.rms:
                return lambda: nk.rms_norm(x, ns, w, RMS_EPS, backend=backend)
            return lambda: nk.layer_norm(x, ns, w, b, EPS, backend=backend)
        dy = u["dy"]
        if self.rms:
            def rms_fn():
                _, _, rstd = nk.rms_norm(x, ns, w, RMS_EPS, backend=backend,
                                         return_stats=True)
                return nk.rms_norm_backward(dy, x, ns, None, rstd, w, backend=backend)[:2]
            return rms_fn

        def fn():
            _, mean, rstd = nk.layer_norm(x, ns, w, b, EPS, backend=backend,
                                          return_stats=True)
            return nk.layer_norm_backward(dy, x, ns, mean, rstd, w, backend=backend)
        return fn

    def plain(self, u):
        x, w, b = u["x"], u["w"], u["b"]
        rows = tuple(range(x.ndim - 1))

        def forward():
            if self.rms:
                rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)
                return x * rstd, rstd
            mean = x.mean(axis=-1, keepdims=True)
            rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + EPS)
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
        f: Callable
        keys: tuple[str, ...]
        if self.rms:
            def f(xv, w):
                return F.rms_norm(xv, ns, w, RMS_EPS)
            keys = ("w",)
        else:
            def f(xv, w, b):
                return F.layer_norm(xv, ns, w, b, EPS)
            keys = ("w", "b")
        if self.backward:
            return torch_fb(torch, u, f, keys)
        xt = to_torch(torch, u["x"])
        params = [to_torch(torch, u[k]) for k in keys]

        def fn():
            with torch.inference_mode():
                return f(xt, *params)
        return fn, lambda y: [torch_to_numpy(y)]

    def onnx(self, u):
        if self.backward:
            raise NotApplicable("ONNX Runtime (inference build) has no backward")
        if self.rms:
            return OnnxNode("RMSNormalization", 23, {"axis": -1, "epsilon": RMS_EPS},
                            [("x", u["x"], True), ("w", u["w"], False)])
        return OnnxNode("LayerNormalization", 17, {"axis": -1, "epsilon": EPS},
                        [("x", u["x"], True), ("w", u["w"], False), ("b", u["b"], False)])


# ---------------------------------------------------------------- GroupNorm / InstanceNorm
class PerSampleNorm(ChannelOp):
    """GroupNorm (groups > 0 in the case params) or InstanceNorm (instance=True)."""

    def __init__(self, instance, backward=False):
        self.instance = instance
        self._name("instance_norm" if instance else "group_norm", "in" if instance else "gn",
                   backward)

    def _groups(self, u):
        return u["c"] if self.instance else u["groups"]

    def normkit(self, u, backend):
        import normkit as nk
        x, w, b, ax, g = u["x"], u["w"], u["b"], channel_axis(u["layout"]), u["groups"]
        if self.instance:
            def fwd(**kw):
                return nk.instance_norm(x, None, None, w, b, True, 0.1, EPS, axis=ax,
                                        backend=backend, **kw)
        else:
            def fwd(**kw):
                return nk.group_norm(x, g, w, b, EPS, axis=ax, backend=backend, **kw)
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
            rstd = 1.0 / np.sqrt(xg.var(axis=-1, keepdims=True) + EPS)
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
                return F.instance_norm(xv, None, None, w, b, True, 0.1, EPS)
        else:
            def f(xv, w, b):
                return F.group_norm(xv, g, w, b, EPS)
        if self.backward:
            return torch_fb(torch, u, f)
        lay = u["layout"]
        xt = tlayout(to_torch(torch, u["x"]), lay)
        w, b = to_torch(torch, u["w"]), to_torch(torch, u["b"])

        def fn():
            with torch.inference_mode():
                return f(xt, w, b)
        return fn, lambda y: [torch_to_numpy(untlayout(y, lay))]

    def onnx(self, u):
        if self.backward:
            raise NotApplicable("ONNX Runtime (inference build) has no backward")
        if u["layout"] == "nhwc":
            raise NotApplicable(f"ONNX {'Instance' if self.instance else 'Group'}"
                                "Normalization is NCHW-only")
        ins = [("x", u["x"], True), ("w", u["w"], False), ("b", u["b"], False)]
        if self.instance:
            return OnnxNode("InstanceNormalization", 17, {"epsilon": EPS}, ins)
        # opset 21: scale and bias are per channel (opset 18 had them per group)
        return OnnxNode("GroupNormalization", 21, {"epsilon": EPS, "num_groups": u["groups"]},
                        ins)


OPS = {op.key: op for op in (
    BatchNormEval(), BatchNormEvalAddRelu(), BatchNormTrain(False), BatchNormTrain(True),
    RowsNorm(False), RowsNorm(True), RowsNorm(False, True), RowsNorm(True, True),
    PerSampleNorm(False), PerSampleNorm(True), PerSampleNorm(False, True),
    PerSampleNorm(True, True))}


