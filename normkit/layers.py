"""Layer objects: parameters, running statistics, train/eval mode and a cached backward.

Each layer is a thin stateful wrapper over ``normkit.functional``; the base class
``Norm`` holds everything the five share (mode, parameters, gradients, state_dict), so
a layer only says how to call its forward and backward functions.
"""
from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _renorm
from . import _validate as V
from . import diagnostics as _diagnostics
from . import functional as F
from .backends import resolve
from .dask import _hook as _dask_hook
from .diagnostics import Thresholds

__all__ = ["Norm", "BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"]


def _check_dtype(dtype):
    """The layer's parameter dtype: float16, bfloat16 (ml_dtypes), float32 or float64."""
    given = dtype
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or not V.is_float(dtype):
        raise TypeError("dtype must be float16, bfloat16 (ml_dtypes.bfloat16), float32 "
                        f"or float64, got {given!r}")
    return dtype.newbyteorder("=")


def _positive_int(value, name, what):
    return V.int_arg(value, name, what, minimum=1)


def _momentum(momentum, what):
    return None if momentum is None else V.real_arg(momentum, "momentum", what)


def _torch_to_numpy(value):
    """A torch tensor as a NumPy array; bfloat16 (which NumPy lacks) bit for bit as
    ml_dtypes.bfloat16 (both are the top 16 bits of a float32)."""
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
        # torch is only imported here, with a torch tensor in hand
        import torch
        return value.contiguous().view(torch.int16).numpy().view(V.BF16)
    return value.numpy()


def _state_value(key, value, target):
    """state_dict[key] as an array that can be copied into ``target``, or a clear error."""
    original = value
    if hasattr(value, "detach") and hasattr(value, "cpu"):     # a torch tensor
        value = _torch_to_numpy(value)
    V.reject_masked(value, f"state_dict[{key!r}]")
    try:
        value = np.asarray(value)
    except (TypeError, ValueError):
        value = None
    if V.is_float(target.dtype):
        ok = value is not None and V.is_float(value.dtype)
        expected = "a float array"
    else:                                   # num_batches_tracked: an integer count
        ok = value is not None and value.dtype.kind in "iu"
        expected = "an integer"
    if not ok:
        raise TypeError(f"state_dict[{key!r}]: expected {expected} of shape "
                        f"{target.shape}, got {V.given(original)}")
    if value.shape != target.shape:
        raise ValueError(f"state_dict[{key!r}]: expected shape {target.shape}, "
                         f"got shape {value.shape}")
    return value


class Norm:
    """Base class of the normalization layers.

    Subclasses set ``self._params`` (name -> array), ``self._buffers`` (running
    statistics), and implement ``_forward(x)`` returning ``(y, cache)`` and
    ``_backward(grad_out, cache)`` returning ``(grad_x, {name: grad})``.
    """

    # what subclasses define (declared for the type checker)
    _forward: Callable[[np.ndarray], tuple[np.ndarray, Any]]
    _backward: Callable[[Any, Any], tuple[np.ndarray, dict]]

    def __init__(self, *, dtype: DTypeLike = np.float32, backend: str | None = None) -> None:
        self.dtype = _check_dtype(dtype)
        if backend is not None:
            resolve(backend)      # an unknown or unavailable backend fails here, not later
        self._backend = backend
        self.training = True
        self.name = None          # optional label, used in diagnostics messages
        self._params: dict[str, np.ndarray] = {}
        self._buffers: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._cache = None

    # ------------------------------------------------------------------ mode
    def train(self, mode: bool = True) -> Norm:
        self.training = bool(mode)
        return self

    def eval(self) -> Norm:
        return self.train(False)

    @property
    def backend(self) -> str:
        """The backend this layer's calls use (resolved now if the default is 'auto')."""
        return resolve(self._backend).NAME

    # ------------------------------------------------------------------ compute
    def forward(self, x: ArrayLike) -> np.ndarray:
        if _dask_hook.is_dask(x):
            return _dask_hook.layer_forward(self, x)
        y, self._cache = self._forward(self._check_input(x))
        return y

    # The input's minimum ndim and, for per-channel layers, where its channels are.
    _min_ndim = 1

    def _check_input(self, x):
        """x converted once (array-likes -> ndarray) and checked against the layer.

        Dask arrays pass through untouched (the functional API handles them lazily).
        """
        if type(x) is not np.ndarray and V.is_dask(x):
            return x
        x = V.as_input(x, min_ndim=self._min_ndim)
        channels = self._channels()
        if channels is not None:
            ax = self.axis
            if type(ax) is int and -x.ndim <= ax < x.ndim:    # the usual case, quickly
                ax %= x.ndim
            else:
                ax = V.channel_axis(x, ax, type(self).__name__)
            if x.shape[ax] != channels:
                raise ValueError(V.wrong_channels(x.shape, ax, channels, self._short_name(),
                                                  "build the layer with"))
        return x

    def _channels(self):
        """Channel count the input must have on ``self.axis``; None: not a channel layer."""
        return None

    def _short_name(self):
        """``BatchNorm(16)``, ``GroupNorm(4, 16)``: the class and its size arguments."""
        return f"{type(self).__name__}({self.extra_repr().split(', eps=')[0]})"

    __call__ = forward

    def backward(self, grad_out: ArrayLike) -> np.ndarray:
        """Gradient w.r.t. the input of the last forward; sets ``self.grads`` afresh."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        grad_x, grads = self._backward(grad_out, self._cache)
        self.grads = {name: np.asarray(grads[name], dtype=p.dtype).reshape(p.shape)
                      for name, p in self._params.items()}
        return grad_x

    # ------------------------------------------------------------------ state
    def parameters(self) -> dict[str, np.ndarray]:
        return dict(self._params)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {name: p.copy() for name, p in self._params.items()}
        state.update({name: b.copy() for name, b in self._buffers.items()})
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Norm:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{type(self).__name__}.load_state_dict: state_dict: expected "
                            f"a mapping of name -> array, got {V.given(state_dict)}")
        own = {**self._params, **self._buffers}
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error loading state_dict into {type(self).__name__}: "
                               f"missing keys {missing}, unexpected keys {unexpected}")
        values = {key: _state_value(key, state_dict[key], target)
                  for key, target in own.items() if key in state_dict}
        for key, value in values.items():          # all checked first: no partial load
            own[key][...] = value                  # in place: live arrays stay live
        return self

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""

    def _init_affine(self, shape, weight=True, bias=True):
        if weight:
            self._params["weight"] = np.ones(shape, self.dtype)
        if bias:
            self._params["bias"] = np.zeros(shape, self.dtype)

    @property
    def weight(self) -> np.ndarray | None:
        return self._params.get("weight")

    @property
    def bias(self) -> np.ndarray | None:
        return self._params.get("bias")


class _RunningStatsNorm(Norm):
    """Shared by BatchNorm and InstanceNorm: running statistics and their momentum."""

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, axis,
                 dtype, backend):
        super().__init__(dtype=dtype, backend=backend)
        what = type(self).__name__
        self.num_features = _positive_int(num_features, "num_features", what)
        self.eps = V.real_arg(eps, "eps", what)
        self.momentum = _momentum(momentum, what)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = V.int_arg(axis, "axis", what)
        if self.affine:
            self._init_affine((self.num_features,))
        if self.track_running_stats:
            self._buffers["running_mean"] = np.zeros(self.num_features, self.dtype)
            self._buffers["running_var"] = np.ones(self.num_features, self.dtype)
            self._buffers["num_batches_tracked"] = np.array(0, dtype=np.int64)

    running_mean = property(lambda self: self._buffers.get("running_mean"))
    running_var = property(lambda self: self._buffers.get("running_var"))
    _min_ndim = 2

    def _channels(self):
        return self.num_features

    @property
    def num_batches_tracked(self):
        nbt = self._buffers.get("num_batches_tracked")
        return None if nbt is None else int(nbt)

    def reset_running_stats(self):
        if self.track_running_stats:
            self._buffers["running_mean"][...] = 0
            self._buffers["running_var"][...] = 1
            self._buffers["num_batches_tracked"][...] = 0

    def _momentum_for_step(self):
        """torch's exponential_average_factor: counts the batch, None = cumulative average.

        Only a training step that tracks statistics updates them; otherwise the value
        is unused and 0.0 is returned.
        """
        if not (self.training and self.track_running_stats):
            return 0.0
        self._buffers["num_batches_tracked"] += 1
        if self.momentum is None:
            return 1.0 / float(self._buffers["num_batches_tracked"])
        return self.momentum

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}")


class BatchNorm(_RunningStatsNorm):
    """Batch normalization (torch's BatchNorm1d/2d/3d in one layer, any channel axis).

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
    momentum : float or None
        None: cumulative moving average over all batches seen.
    affine : bool
        Learnable per-channel weight and bias.
    track_running_stats : bool
        Keep running statistics (used in eval mode). Without them, batch statistics
        are used in eval mode too.
    axis : int, keyword-only
        Channel axis: 1 (NCHW, default) or -1 (channels-last), or any other.
    dtype : numpy dtype, keyword-only
        dtype of parameters and running statistics.
    backend : str, keyword-only
        Backend for this layer (default: the global default at each call).
    renorm : bool, keyword-only
        Batch renormalization (Ioffe 2017) in training mode: the batch-normalized
        values are corrected by ``r``, ``d`` towards moving renorm statistics, kept
        in the extra buffers ``renorm_mean`` and ``renorm_std``. Eval mode is
        unchanged. Needs ``track_running_stats``. Details: ``normkit/_renorm.py``.
    renorm_clipping : dict, keyword-only
        ``{'rmax': ..., 'rmin': ..., 'dmax': ...}`` bounds of ``r`` and ``|d|``
        (missing: no bound; ``rmin`` defaults to ``1 / rmax``). Mutable between
        steps through the ``renorm_clipping`` attribute, to relax it during training.
    renorm_momentum : float, keyword-only
        Weight of the new batch in the renorm statistics (0.01 is Keras's 0.99).
    diagnostics : None, bool, dict or diagnostics.Thresholds, keyword-only
        Small-batch diagnostics in training mode (``UnstableBatchStatisticsWarning``
        when the batch statistics are too noisy to trust). None follows
        ``normkit.diagnostics.configure``; False turns them off for this layer (no
        extra work); a dict overrides thresholds. The ``diagnostics`` attribute can be
        reassigned later. Renorm training steps are not diagnosed. See
        ``docs/diagnostics.md``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = 1,
                 dtype: DTypeLike = np.float32, backend: str | None = None,
                 renorm: bool = False, renorm_clipping: Mapping[str, float] | None = None,
                 renorm_momentum: float = 0.01,
                 diagnostics: bool | dict | Thresholds | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis,
                         dtype, backend)
        self.diagnostics = _diagnostics._check_setting(diagnostics)
        self._diag_state = None
        self.renorm = bool(renorm)
        if self.renorm:
            if not self.track_running_stats:
                raise ValueError("renorm=True needs track_running_stats=True")
            self.renorm_clipping = _renorm.check_clipping(renorm_clipping)
            self.renorm_momentum = _renorm.check_momentum(renorm_momentum)
            self._buffers["renorm_mean"] = np.zeros(self.num_features, self.dtype)
            self._buffers["renorm_std"] = np.ones(self.num_features, self.dtype)

    renorm_mean = property(lambda self: self._buffers.get("renorm_mean"))
    renorm_std = property(lambda self: self._buffers.get("renorm_std"))

    @property
    def renorm_clipping(self):
        """Read-only view of the clipping bounds; assign a new dict to change them."""
        return types.MappingProxyType(self._renorm_clipping) if self.renorm else None

    @renorm_clipping.setter
    def renorm_clipping(self, value):
        self._renorm_clipping = _renorm.check_clipping(value)

    def reset_running_stats(self):
        super().reset_running_stats()
        if self.renorm:
            self._buffers["renorm_mean"][...] = 0
            self._buffers["renorm_std"][...] = 1

    def _forward(self, x):
        if self.renorm and self.training:
            return _renorm.forward(self, x, self._momentum_for_step())
        batch_stats = self.training or not self.track_running_stats
        momentum = self._momentum_for_step()
        probe = _diagnostics._start(self, x) if self.training else None
        try:
            y, mean, rstd = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats,
                momentum, self.eps, axis=self.axis, backend=self._backend, return_stats=True)
        finally:
            if probe is not None:
                probe.release()
        if probe is not None and y.size:    # an empty batch has no statistics to check
            probe.check(mean, rstd)
        return y, (x, mean, rstd, batch_stats)

    def _backward(self, grad_out, cache):
        if isinstance(cache, _renorm.RenormCache):
            return _renorm.backward(self, grad_out, cache)
        x, mean, rstd, batch_stats = cache
        gx, gw, gb = F.batch_norm_backward(grad_out, x, mean, rstd, self.weight,
                                           training=batch_stats, axis=self.axis,
                                           backend=self._backend)
        return gx, {"weight": gw, "bias": gb}


class InstanceNorm(_RunningStatsNorm):
    """Instance normalization (torch's InstanceNorm1d/2d/3d in one layer).

    Parameters are those of :class:`BatchNorm`; defaults follow torch (no affine, no
    running statistics). Input statistics are used in training mode, and in eval mode
    unless running statistics are tracked. ``diagnostics`` (keyword-only) as in
    :class:`BatchNorm`: training steps are checked for too few values per instance,
    near-constant instances and non-finite values.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, *, axis: int = 1,
                 dtype: DTypeLike = np.float32, backend: str | None = None,
                 diagnostics: bool | dict | Thresholds | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis,
                         dtype, backend)
        self.diagnostics = _diagnostics._check_setting(diagnostics)
        self._diag_state = None

    def _momentum_for_step(self):
        """As torch's InstanceNorm: num_batches_tracked is never counted, and
        momentum=None means 0.0 (the running statistics stay as they are)."""
        return 0.0 if self.momentum is None else self.momentum

    def _forward(self, x):
        use_input_stats = self.training or not self.track_running_stats
        momentum = self._momentum_for_step()
        probe = _diagnostics._start(self, x) if self.training else None
        y, mean, rstd = F.instance_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            use_input_stats, momentum, self.eps, axis=self.axis, backend=self._backend,
            return_stats=True)
        if probe is not None and y.size:    # an empty batch has no statistics to check
            probe.check(mean, rstd)
        return y, (x, mean, rstd, use_input_stats)

    def _backward(self, grad_out, cache):
        x, mean, rstd, use_input_stats = cache
        gx, gw, gb = F.instance_norm_backward(grad_out, x, mean, rstd, self.weight,
                                              use_input_stats=use_input_stats,
                                              axis=self.axis, backend=self._backend)
        return gx, {"weight": gw, "bias": gb}


class GroupNorm(Norm):
    """Group normalization over ``num_groups`` groups of ``num_channels`` channels.

    Parameters
    ----------
    num_groups : int
    num_channels : int
        Must be divisible by ``num_groups``.
    eps : float
    affine : bool
        Learnable per-channel weight and bias.
    axis, dtype, backend : keyword-only
        As in :class:`BatchNorm`.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, *, axis: int = 1, dtype: DTypeLike = np.float32,
                 backend: str | None = None) -> None:
        super().__init__(dtype=dtype, backend=backend)
        self.num_groups = _positive_int(num_groups, "num_groups", "GroupNorm")
        self.num_channels = _positive_int(num_channels, "num_channels", "GroupNorm")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        self.eps = V.real_arg(eps, "eps", "GroupNorm")
        self.affine = bool(affine)
        self.axis = V.int_arg(axis, "axis", "GroupNorm")
        if self.affine:
            self._init_affine((self.num_channels,))

    _min_ndim = 2

    def _channels(self):
        return self.num_channels

    def _forward(self, x):
        y, mean, rstd = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                     axis=self.axis, backend=self._backend,
                                     return_stats=True)
        return y, (x, mean, rstd)

    def _backward(self, grad_out, cache):
        x, mean, rstd = cache
        gx, gw, gb = F.group_norm_backward(grad_out, x, self.num_groups, mean, rstd,
                                           self.weight, axis=self.axis,
                                           backend=self._backend)
        return gx, {"weight": gw, "bias": gb}

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine}, axis={self.axis}")


class LayerNorm(Norm):
    """Layer normalization over the trailing ``normalized_shape`` axes.

    Parameters
    ----------
    normalized_shape : int or tuple of int
    eps : float
    elementwise_affine : bool
        Learnable weight (and bias, see ``bias``) of shape ``normalized_shape``.
    bias : bool
        Whether the affine part has a bias.
    dtype, backend : keyword-only
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, *,
                 dtype: DTypeLike = np.float32, backend: str | None = None) -> None:
        super().__init__(dtype=dtype, backend=backend)
        self.normalized_shape = V.shape_arg(normalized_shape, "LayerNorm")
        self.eps = V.real_arg(eps, "eps", "LayerNorm")
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self._init_affine(self.normalized_shape, bias=bool(bias))

    def _forward(self, x):
        y, mean, rstd = F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                                     self.eps, backend=self._backend, return_stats=True)
        return y, (x, mean, rstd)

    def _backward(self, grad_out, cache):
        x, mean, rstd = cache
        gx, gw, gb = F.layer_norm_backward(grad_out, x, self.normalized_shape, mean, rstd,
                                           self.weight, backend=self._backend)
        return gx, {"weight": gw, "bias": gb}

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class RMSNorm(Norm):
    """Root-mean-square normalization (torch.nn.RMSNorm).

    Parameters
    ----------
    normalized_shape : int or tuple of int
    eps : float or None
        None: as torch, ``np.finfo`` eps of the input's dtype for float32/float64
        input and float32's for float16/bfloat16 input (see ``rms_norm``).
    elementwise_affine : bool
        Learnable weight of shape ``normalized_shape``.
    dtype, backend : keyword-only
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, *, dtype: DTypeLike = np.float32,
                 backend: str | None = None) -> None:
        super().__init__(dtype=dtype, backend=backend)
        self.normalized_shape = V.shape_arg(normalized_shape, "RMSNorm")
        self.eps = None if eps is None else V.real_arg(eps, "eps", "RMSNorm")
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self._init_affine(self.normalized_shape, bias=False)

    def _forward(self, x):
        y, _, rstd = F.rms_norm(x, self.normalized_shape, self.weight, self.eps,
                                backend=self._backend, return_stats=True)
        return y, (x, rstd)

    def _backward(self, grad_out, cache):
        x, rstd = cache
        gx, gw, _ = F.rms_norm_backward(grad_out, x, self.normalized_shape, None, rstd,
                                        self.weight, backend=self._backend)
        return gx, {"weight": gw}

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")
