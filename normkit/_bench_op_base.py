"""What every benchmark operation shares: the :class:`Op` interface, data helpers, dtypes.

An ``Op`` is a norm in one mode (the concrete ones are in :mod:`normkit._bench_ops`).
It knows, for every implementation we compare:

* ``normkit``  -- the public normkit call, with ``backend=`` set (one per backend);
* ``plain``    -- a straightforward vectorized NumPy implementation (what a user would
  write in ten lines: broadcasting, ``mean``/``var``, temporaries);
* ``torch``    -- ``torch.nn.functional`` on the same memory (``torch.from_numpy``;
  NHWC is a channels-last view, not a copy; bfloat16 is shared through a uint16 view),
  threads set to the same count;
* ``onnx``     -- one ONNX node, possibly followed by elementwise nodes (op type,
  attributes, opset) for ONNX Runtime, or the reason it does not apply
  (:class:`NotApplicable`);

plus the bytes that must move and a correctness tolerance.

Bytes model (what *must* move between memory and the core, per call; parameters and
statistics are O(C) and left out; ``n`` = bytes of x, in its own dtype):

==============================  ============  =============================================
op                              bytes         why
==============================  ============  =============================================
BatchNorm eval                  2n            read x, write y (per-channel a, b precomputed)
BatchNorm eval + residual       3n            read x and the residual, write y
+ ReLU (fused epilogue)
LN / RMS / GN / IN forward      2n            read x, write y: one row / group fits in
                                              cache between the statistics and the output
BatchNorm training forward      3n            the statistics span the whole batch (does not
                                              fit in cache): read x twice, write y
BatchNorm training fwd + bwd    8n            forward 3n; backward reads x, dy for the sums,
                                              then x, dy again and writes dx (5n)
LN / RMS / GN / IN fwd + bwd    5n            forward 2n; backward reads x, dy, writes dx
                                              (the row / group stays in cache)
==============================  ============  =============================================

Dtypes: data (x, dy, residual) and parameters are in the case's dtype (float32, float64,
float16 or bfloat16 -- ``ml_dtypes.bfloat16``); a 16-bit case is a model stored in 16
bits, as an exported float16 ONNX model or a bfloat16 checkpoint holds it, so every peer
gets the same arrays.

This module imports only NumPy (and ml_dtypes for bfloat16); torch is passed in by the
caller (imported lazily, only when installed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "EPS", "RMS_EPS", "NotApplicable", "OnnxNode", "Op", "ChannelOp", "channel_axis",
    "reduce_axes", "bshape", "np_dtype", "is_16bit", "short_dtype", "to_torch",
    "torch_to_numpy", "tlayout", "untlayout", "rand", "channel_params", "torch_fb",
]

EPS = 1e-5
RMS_EPS = 1e-6          # LLaMA-style; passed explicitly so every implementation agrees


class NotApplicable(Exception):
    """This implementation does not offer this case (the message says why)."""


@dataclass
class OnnxNode:
    """The ONNX node(s) for one unit.

    ``inputs`` is a list of (role, array, is_graph_input). ``epilogue`` lists elementwise
    nodes applied to the first output in turn, each as (op_type, extra inputs in the
    same form), e.g. ``[("Add", [("r", r, True)]), ("Relu", [])]``.
    """
    op_type: str
    opset: int
    attrs: dict
    inputs: list
    n_outputs: int = 1
    domain: str = ""
    epilogue: list = field(default_factory=list)


# ====================================================================== layouts
def channel_axis(layout):
    return -1 if layout == "nhwc" else 1


def reduce_axes(ndim, layout):
    """Axes BatchNorm reduces over (all but the channel axis)."""
    ax = channel_axis(layout) % ndim
    return tuple(i for i in range(ndim) if i != ax)


def bshape(ndim, layout, c):
    """Shape that broadcasts a per-channel vector against x."""
    s = [1] * ndim
    s[channel_axis(layout)] = c
    return tuple(s)


def _to_nchw_perm(ndim):
    return (0, ndim - 1, *range(1, ndim - 1))


def _from_nchw_perm(ndim):
    return (0, *range(2, ndim), 1)


# ====================================================================== dtypes
def np_dtype(name):
    """The NumPy dtype of a case's dtype name (``bfloat16`` is ml_dtypes')."""
    if str(name) == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_16bit(dtype):
    return np.dtype(dtype).itemsize == 2


def short_dtype(name):
    """Suffix of a case name: f64, f16, bf16 (float32 has none)."""
    return {"float32": "", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}[name]


def to_torch(torch, a):
    """NumPy -> torch without a copy (a fresh tensor that shares memory). torch does not
    know ml_dtypes' bfloat16, so it goes through a uint16 view of the same bytes."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_to_numpy(t):
    """torch -> NumPy (shares memory; bfloat16 comes back as ml_dtypes.bfloat16)."""
    import torch  # only called on torch results: torch is installed
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.numpy()


def tlayout(xt, layout):
    """NHWC arrays become channels-last NCHW views for torch (same memory, no copy)."""
    return xt.permute(*_to_nchw_perm(xt.ndim)) if layout == "nhwc" else xt


def untlayout(yt, layout):
    return yt.permute(*_from_nchw_perm(yt.ndim)) if layout == "nhwc" else yt


# ====================================================================== data
def rand(rng, shape, dtype, scale=1.0, loc=0.0):
    a = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        a *= scale
    if loc:
        a += loc
    return a.astype(dtype, copy=False)


def channel_params(rng, c, dtype, running=True):
    p = {"w": (1.0 + 0.1 * rng.standard_normal(c)).astype(dtype),
         "b": (0.1 * rng.standard_normal(c)).astype(dtype)}
    if running:
        p["rm"] = (0.1 * rng.standard_normal(c)).astype(dtype)
        p["rv"] = (0.5 + rng.random(c)).astype(dtype)
    return p


# ====================================================================== ops
class Op:
    """A norm in one mode. Subclasses fill in the implementations."""

    key = ""
    norm = ""
    #: bytes that must move, in units of x's bytes (see the module docstring)
    traffic = 2
    training = False
    backward = False
    #: correctness tolerance (max |a - ref| / max(1, max |ref|)) by dtype, against the
    #: float64 truth. float32/64: reduction error of the plain-NumPy peer dominates.
    #: 16-bit: the output is rounded once (half an ulp, eps/2 relative to max|ref|), the
    #: float32 arithmetic before it adds ~1e-6; 4 eps leaves room for a peer that rounds
    #: an intermediate (torch rounds the normalized value before the affine in 16 bits).
    tols = {"float32": 2e-4, "float64": 1e-9, "float16": 4 * 2.0 ** -10,
            "bfloat16": 4 * 2.0 ** -7}

    def _name(self, norm, base, backward):
        """norm, case-name key and traffic of a forward op, or of forward+backward
        (training mode: reads x and dy, writes y and dx, reads x again)."""
        self.norm, self.backward, self.training = norm, backward, backward
        self.key = base + ("_train_fb" if backward else "")
        self.traffic = 5 if backward else 2

    def tol(self, dtype):
        t = self.tols[np_dtype(dtype).name]
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


class ChannelOp(Op):
    """Ops whose parameters are per channel (BN, GN, IN)."""

    running = False
    residual = False

    def make_unit(self, x, layout, rng, params):
        c = x.shape[channel_axis(layout)]
        u = {"x": x, "layout": layout, "c": c, "groups": params.get("groups", 0)}
        u.update(channel_params(rng, c, x.dtype, self.running))
        if self.backward:
            u["dy"] = rand(rng, x.shape, x.dtype)
        if self.residual:
            u["r"] = rand(rng, x.shape, x.dtype)
        return u


def torch_fb(torch, u, forward, weight_keys=("w", "b")):
    """Training forward + backward through autograd; grads are reset (set to None) first."""
    lay = u["layout"]
    xt = to_torch(torch, u["x"]).requires_grad_(True)
    xv = tlayout(xt, lay)
    dyv = tlayout(to_torch(torch, u["dy"]), lay)
    params = [to_torch(torch, u[k]).requires_grad_(True) for k in weight_keys]

    def fn():
        xt.grad = None
        for p in params:
            p.grad = None
        y = forward(xv, *params)
        y.backward(dyv)
        return (xt.grad, *(p.grad for p in params))
    return fn, lambda r: [torch_to_numpy(a) for a in r]
