"""Seeing any input as one of the canonical kernel shapes, and the result back.

This module is the one place that decides the memory layout a kernel sees.

Channel-family norms (BatchNorm, GroupNorm, InstanceNorm) work on a 3-D view:

* ``first``: (N, C, S) -- the channel axis is followed by the spatial axes (NCHW);
* ``last``:  (N, S, C) -- channels are the fastest axis (NHWC, or (N, C) input).

Row-family norms (LayerNorm, RMSNorm) work on (rows, K). The data keeps its *storage
dtype* (its own dtype in native byte order: float16 and bfloat16 stay 16-bit, never
widened to a float32 copy). A contiguous, aligned, native-order input is only reshaped
(no copy); anything else (non-contiguous, negative strides, Fortran order,
byte-swapped, a view at an odd byte offset) is copied once into a C-contiguous aligned
array of that dtype. Kernels therefore only ever see C-contiguous, aligned,
native-order memory.

The layout decides which kernel runs: ``ChannelView.call`` is the one place that
chooses between the ``channels_first_*`` and ``channels_last_*`` twins, including the
degenerate shapes: (N, C, 1) runs the channels-last kernel as (N, 1, C) and (N, S, 1)
the channels-first kernel as (N, 1, S) -- the same memory, vectorized along the long
axis.
"""
from __future__ import annotations

import math

import numpy as np


def elementwise_twin(layout, shape):
    """The layout and 3-D shape an elementwise kernel should see for data of ``shape``."""
    n, a, b = shape
    if layout == "first" and b == 1 and a > 1:      # (N, C, 1): C is the fast axis
        return "last", (n, 1, a)
    if layout == "last" and b == 1 and a > 1:       # (N, S, 1): S is the fast axis
        return "first", (n, 1, a)
    return layout, shape


class ChannelView:
    """x as (N, C, S) or (N, S, C) plus what is needed to map results back.

    ``layout`` is what the statistics code reads; ``call`` picks the elementwise
    kernel (and reshapes data-shaped arguments for the degenerate shapes).
    """

    __slots__ = ("_twin", "c", "data", "layout", "moved_axis", "n", "s", "user_shape")

    def __init__(self, data, layout, n, c, s, user_shape, moved_axis=None):
        self.data, self.layout = data, layout
        self.n, self.c, self.s = n, c, s
        self.user_shape, self.moved_axis = user_shape, moved_axis
        self._twin = elementwise_twin(layout, data.shape)

    def call(self, backend, op, *args):
        """Run ``channels_<layout>_<op>`` of ``backend`` on this view.

        Arrays of the view's data shape are the data (x, dy, out, residual); the
        2-D (N', C) coefficients and the (N, C) results are the same in both layouts.
        """
        layout, shape = self._twin
        if shape != self.data.shape:
            data_shape = self.data.shape
            args = [a.reshape(shape) if isinstance(a, np.ndarray) and a.shape == data_shape
                    else a for a in args]
        return getattr(backend, f"channels_{layout}_{op}")(*args)

    def moments(self, backend):
        """Per (sample, channel) mean and M2 over S, float64 (N, C), in either layout."""
        n, c, s = self.n, self.c, self.s
        if self.layout == "first" or c == 1:      # each (n, c) is one contiguous row
            mean, m2 = backend.plane_moments(self.data.reshape(n * c, s))
            return mean.reshape(n, c), m2.reshape(n, c)
        return backend.channels_last_moments(self.data)

    def like(self, arr, dtype):
        """Another array of the user's shape (e.g. grad_out) in this view's layout."""
        if self.moved_axis is not None:
            arr = np.moveaxis(arr, self.moved_axis, -1)
        return kernel_array(arr, dtype).reshape(self.data.shape)

    def empty(self, out=None):
        """Where a kernel writes its result: ``out`` itself when it can, else a new array."""
        if self.moved_axis is None and writable_in_place(out, self.data.dtype):
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


def writable_in_place(out, dtype) -> bool:
    """Whether a kernel may write straight into ``out`` (else it writes a temporary)."""
    return (out is not None and out.dtype == dtype and out.flags.c_contiguous
            and out.flags.aligned)


def finish(res, out, dtype):
    if out is None:
        return res.astype(dtype, copy=False)
    # a kernel that wrote straight into ``out`` left nothing to copy
    if res.ctypes.data != out.ctypes.data or res.strides != out.strides:
        np.copyto(out, res, casting="unsafe")
    return out


def kernel_array(x, dtype):
    """x as a C-contiguous, aligned, native-order array of ``dtype`` (no copy if it is)."""
    xc = np.ascontiguousarray(x, dtype=dtype)
    return xc if xc.flags.aligned else xc.copy()


def batch_layout(shape, axis):
    """BatchNorm's layout for input of ``shape``: ("first" | "last", 3-D view shape)."""
    pre = math.prod(shape[:axis])
    c = shape[axis]
    post = math.prod(shape[axis + 1:])
    if post == 1:   # channels are the fastest axis: (N, C), NHWC, NLC
        return "last", (1, pre, c)
    return "first", (pre, c, post)


def batch_view(x, axis, dtype) -> ChannelView:
    """BatchNorm: statistics per channel over every other axis."""
    layout, shape = batch_layout(x.shape, axis)
    xc = kernel_array(x, dtype).reshape(shape)
    if layout == "last":
        return ChannelView(xc, layout, 1, shape[2], shape[1], x.shape)
    return ChannelView(xc, layout, shape[0], shape[1], shape[2], x.shape)


def sample_view(x, axis, dtype) -> ChannelView:
    """GroupNorm / InstanceNorm: statistics per sample (axis 0) and channel group."""
    shape = x.shape
    n, c = shape[0], shape[axis]
    s = math.prod(shape[1:]) // c if c else 0
    if axis == 1:
        return ChannelView(kernel_array(x, dtype).reshape(n, c, s), "first", n, c, s, shape)
    if axis == x.ndim - 1:
        return ChannelView(kernel_array(x, dtype).reshape(n, s, c), "last", n, c, s, shape)
    # a channel axis in the middle: one transposed copy to channels-last
    moved = kernel_array(np.moveaxis(x, axis, -1), dtype)
    return ChannelView(moved.reshape(n, s, c), "last", n, c, s, shape, moved_axis=axis)


def rows_view(x, k, dtype):
    """LayerNorm / RMSNorm: (rows, K) with K the product of normalized_shape."""
    return kernel_array(x, dtype).reshape(-1, k) if k else x.reshape(-1, 0)


def rows_result(out, xr):
    """Where rows_forward writes: ``out`` viewed as (rows, K) when it can, else new."""
    if writable_in_place(out, xr.dtype):
        return out.reshape(xr.shape)
    return np.empty_like(xr)
