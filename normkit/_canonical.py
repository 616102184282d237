"""Seeing any input as one of the canonical kernel shapes, and the result back.

Channel-family norms (BatchNorm, GroupNorm, InstanceNorm) work on a 3-D view:

* ``first``: (N, C, S) -- the channel axis is followed by the spatial axes (NCHW);
* ``last``:  (N, S, C) -- channels are the fastest axis (NHWC, or (N, C) input).

Row-family norms (LayerNorm, RMSNorm) work on (rows, K). A contiguous input of the
compute dtype is only reshaped (no copy); anything else (float16, non-contiguous,
negative strides, Fortran order, byte-swapped) is copied once into a C-contiguous
array of the compute dtype. The layout decides which kernel runs: ``ChannelView.call``
is the one place that chooses between the ``channels_first_*`` and ``channels_last_*``
twins.
"""
from __future__ import annotations

import math

import numpy as np


class ChannelView:
    """x as (N, C, S) or (N, S, C) plus what is needed to map results back."""

    __slots__ = ("layout", "data", "n", "c", "s", "user_shape", "moved_axis")

    def __init__(self, data, layout, n, c, s, user_shape, moved_axis=None):
        self.data, self.layout = data, layout
        self.n, self.c, self.s = n, c, s
        self.user_shape, self.moved_axis = user_shape, moved_axis

    def call(self, backend, op, *args):
        """Run ``channels_<layout>_<op>`` of ``backend`` on this view."""
        return getattr(backend, f"channels_{self.layout}_{op}")(*args)

    def like(self, arr, dtype):
        """Another array of the user's shape (e.g. grad_out) in this view's layout."""
        if self.moved_axis is not None:
            arr = np.moveaxis(arr, self.moved_axis, -1)
        return np.ascontiguousarray(arr, dtype=dtype).reshape(self.data.shape)

    def empty(self, out=None):
        """Where a kernel writes its result: ``out`` itself when it can, else a new array."""
        if (out is not None and self.moved_axis is None and out.dtype == self.data.dtype
                and out.flags.c_contiguous):
            return out.reshape(self.data.shape)
        return np.empty(self.data.shape, self.data.dtype)

    def to_user(self, res, out, dtype):
        """The kernel result in the user's shape, axis order and dtype (into ``out``)."""
        if self.moved_axis is None:
            res = res.reshape(self.user_shape)
        else:
            moved = list(self.user_shape)
            moved.append(moved.pop(self.moved_axis))
            res = np.moveaxis(res.reshape(moved), -1, self.moved_axis)
        return finish(res, out, dtype)


def finish(res, out, dtype):
    if out is None:
        return res.astype(dtype, copy=False)
    # a kernel that wrote straight into ``out`` left nothing to copy
    if res.ctypes.data != out.ctypes.data or res.strides != out.strides:
        np.copyto(out, res, casting="unsafe")
    return out


def _contiguous(x, dtype):
    return np.ascontiguousarray(x, dtype=dtype)


def batch_view(x, axis, dtype) -> ChannelView:
    """BatchNorm: statistics per channel over every other axis."""
    shape = x.shape
    pre = math.prod(shape[:axis])
    c = shape[axis]
    post = math.prod(shape[axis + 1:])
    xc = _contiguous(x, dtype)
    if post == 1:   # channels are the fastest axis: (N, C), NHWC, NLC
        return ChannelView(xc.reshape(1, pre, c), "last", 1, c, pre, shape)
    return ChannelView(xc.reshape(pre, c, post), "first", pre, c, post, shape)


def sample_view(x, axis, dtype) -> ChannelView:
    """GroupNorm / InstanceNorm: statistics per sample (axis 0) and channel group."""
    shape = x.shape
    n, c = shape[0], shape[axis]
    s = math.prod(shape[1:]) // c if c else 0
    if axis == 1:
        return ChannelView(_contiguous(x, dtype).reshape(n, c, s), "first", n, c, s, shape)
    if axis == x.ndim - 1:
        return ChannelView(_contiguous(x, dtype).reshape(n, s, c), "last", n, c, s, shape)
    # a channel axis in the middle: one transposed copy to channels-last
    moved = _contiguous(np.moveaxis(x, axis, -1), dtype)
    return ChannelView(moved.reshape(n, s, c), "last", n, c, s, shape, moved_axis=axis)


def rows_view(x, k, dtype):
    """LayerNorm / RMSNorm: (rows, K) with K the product of normalized_shape."""
    return _contiguous(x, dtype).reshape(-1, k) if k else x.reshape(-1, 0)
