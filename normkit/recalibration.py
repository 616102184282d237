"""Precise BatchNorm: recompute population statistics exactly over a stream of batches.

Running statistics from training are exponential averages of batch statistics taken
while the weights were still moving; after training (or after pruning, quantization,
folding, a change of input distribution) they are often off. "Precise BN" (Wu &
Johnson 2021, "Rethinking 'Batch' in BatchNorm") recomputes them with the final
weights. Here the per-channel (count, mean, M2) of every batch a layer sees are merged
exactly (Chan et al.'s pairwise update, in float64), so the result is the mean and
unbiased variance of *all* values seen, as if the batches were one big batch, whatever
their sizes, independent of their order, without an exponential average.

Two ways in:

* ``recalibrate(layers, batches)``: ``batches`` are the layers' *inputs*; nothing runs.
* ``recalibrate(forward, batches)``: ``forward(batch)`` runs your model; every normkit
  ``BatchNorm`` it calls (or those named with ``layers=``) records its input. While
  recording, a layer normalizes with the statistics of the current batch, as in
  training (the PreciseBN recipe: each layer then sees the input distribution it was
  trained on), and touches neither its running statistics nor its gradient cache.
"""
from __future__ import annotations

import itertools
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np

from . import _validate as V
from . import functional as F
from .backends.numpy_ref import narrow
from .dask import _hook as _dask_hook
from .layers import BatchNorm

__all__ = ["recalibrate"]


class _Moments:
    """Exact per-channel count, mean and sum of squared deviations (M2), in float64."""

    __slots__ = ("count", "mean", "m2", "batches")

    def __init__(self):
        self.count = 0
        self.mean = None
        self.m2 = None
        self.batches = 0

    def add(self, x, axis, c):
        # the functional API's validation: float dtypes only (complex, object, integer
        # and masked batches are refused), array-likes converted once, here
        x = V.as_input(x, "batch", min_ndim=2)
        ax = V.channel_axis(x, axis, "recalibrate")
        if x.shape[ax] != c:
            raise ValueError(V.wrong_channels(x.shape, ax, c, f"recalibrate: BatchNorm({c})",
                                              "build the layer with"))
        self.batches += 1
        n = x.size // c
        if n == 0:
            return
        axes = tuple(i for i in range(x.ndim) if i != ax)
        bshape = [1] * x.ndim
        bshape[ax] = c
        mean_b = x.mean(axis=axes, dtype=np.float64)
        dev = x - mean_b.reshape(bshape)            # float64: centred, no cancellation
        m2_b = np.square(dev).sum(axis=axes)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean_b, m2_b
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta * delta * (self.count * n / total)
        self.count = total


class _Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second.

    ``enabled=None``: only when stderr is a terminal and the stream has run for more
    than a second (short runs stay silent).
    """

    def __init__(self, total, enabled, desc="recalibrate", stream=None):
        self.total, self.desc = total, desc
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = "auto" if isatty is not None and isatty() else False
        self.enabled = enabled
        self.start = self.last = time.monotonic()
        self.n = 0
        self.drawn = False

    def update(self):
        self.n += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if self.enabled == "auto" and now - self.start < 1.0:
            return
        if now - self.last >= 0.1 or self.n == self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now):
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(round(24 * frac))
            eta = (self.total - self.n) / rate if rate > 0 else math.inf
            text = (f"{self.desc} {self.n}/{self.total} [{'#' * filled}{'.' * (24 - filled)}]"
                    f" {100 * frac:5.1f}% {rate:.1f} batch/s eta {_clock(eta)}")
        else:
            text = f"{self.desc} {self.n} batches {rate:.1f} batch/s {_clock(elapsed)}"
        self.stream.write("\r" + text)
        self.stream.flush()
        self.drawn = True

    def close(self):
        if self.enabled and self.drawn or self.enabled is True:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds):
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


# ------------------------------------------------------------------ recording
# ``recalibrate(forward)`` without ``layers=`` finds the layers by watching every
# BatchNorm forward call *of the recalibrating thread*: the class's ``_forward`` is
# wrapped while at least one recalibration runs, and the wrapper only diverts calls
# made while this thread's recorder is set. Other threads run the original code.
_local = threading.local()
_hook_lock = threading.Lock()
_hook_users = 0
_hook_original = None


def _record_forward(layer, x, moments):
    moments.add(x, layer.axis, layer.num_features)
    y = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps,
                     axis=layer.axis, backend=layer._backend)
    return y, None          # no cache: backward is not meaningful while recalibrating


class _Recorder:
    def __init__(self):
        self.seen = {}                        # id(layer) -> (layer, _Moments)

    def forward(self, layer, x):
        key = id(layer)
        if key not in self.seen:
            self.seen[key] = (layer, _Moments())
        return _record_forward(layer, x, self.seen[key][1])


def _install_hook():
    global _hook_users, _hook_original
    with _hook_lock:
        if _hook_users == 0:
            original = BatchNorm.__dict__["_forward"]

            def _forward(self, x):
                recorder = getattr(_local, "recorder", None)
                if recorder is None or not self.track_running_stats:
                    return original(self, x)
                return recorder.forward(self, x)

            _forward.__wrapped__ = original
            _hook_original = original
            BatchNorm._forward = _forward
        _hook_users += 1


def _remove_hook():
    global _hook_users
    with _hook_lock:
        _hook_users -= 1
        if _hook_users == 0:
            BatchNorm._forward = _hook_original


# ------------------------------------------------------------------ public
def _as_named_layers(layers):
    if isinstance(layers, BatchNorm):
        named = {0: layers}
    elif isinstance(layers, Mapping):
        named = dict(layers)
    elif isinstance(layers, (list, tuple)):
        named = dict(enumerate(layers))
    else:
        raise TypeError("expected a BatchNorm, a dict or list of BatchNorm layers, or a "
                        f"callable, got {type(layers).__name__}")
    for name, layer in named.items():
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}; only BatchNorm "
                            "layers have population statistics to recalibrate")
        if not layer.track_running_stats:
            raise ValueError(f"layer {name!r} has track_running_stats=False: it has no "
                             "running statistics to recalibrate")
    return named


def _batch_for(named, batch, single):
    if single:
        return {next(iter(named)): batch}
    if isinstance(batch, Mapping):
        unknown = [k for k in batch if k not in named]
        if unknown:
            raise KeyError(f"batch has inputs for unknown layers {unknown}")
        return batch
    if isinstance(batch, (list, tuple)) and len(batch) == len(named):
        return dict(zip(named, batch, strict=True))
    raise TypeError("with a dict or list of layers, each batch must be a dict layer name "
                    f"-> input, or a list of {len(named)} input(s) in the layers' order "
                    f"(got {type(batch).__name__}); a single BatchNorm takes plain arrays")


def _finish(named_moments):
    summary = {}
    for name, (layer, mom) in named_moments.items():
        summary[name] = mom.count
        if mom.count < 2:
            warnings.warn(f"recalibrate: layer {name!r} saw {mom.count} value(s) per "
                          "channel; its running statistics are left as they were",
                          RuntimeWarning, stacklevel=3)
            continue
        with np.errstate(invalid="ignore"):
            # float64 statistics rounded once to the buffers' dtype (16-bit included)
            layer.running_mean[...] = narrow(mom.mean, layer.running_mean.dtype)
            layer.running_var[...] = narrow(mom.m2 / (mom.count - 1), layer.running_var.dtype)
        layer._buffers["num_batches_tracked"] += mom.batches
    return summary


def recalibrate(layers_or_callable, batches, *, layers=None, num_batches=None,
                progress=None):
    """Recompute BatchNorm population statistics exactly over a stream of batches.

    Parameters
    ----------
    layers_or_callable : BatchNorm, dict, list or callable
        Either the layers (a ``BatchNorm``, a dict name -> ``BatchNorm`` such as
        :func:`normkit.from_torch` returns, or a list), with ``batches`` holding
        their inputs; or a function ``forward(batch)`` that runs a model made of
        normkit layers (its return value is ignored).
    batches : iterable
        For a single ``BatchNorm``: its inputs. For a dict of layers: dicts name ->
        input (any subset of the layers); for a list of layers: lists of inputs in
        the layers' order.
        For a callable: whatever ``forward`` takes.
    layers : dict or list of BatchNorm, keyword-only
        With a callable: recalibrate only these layers (the others run as usual).
        Default: every BatchNorm the callable runs in this thread.
    num_batches : int, keyword-only
        Stop after this many batches (for endless data loaders).
    progress : bool or None, keyword-only
        Progress bar on stderr: ``True`` always, ``False`` never, ``None`` (default)
        when stderr is a terminal and the stream lasts more than a second.

    Returns
    -------
    dict
        Layer name (dict key, list index, ``layer.name`` or ``"BatchNorm_<i>"`` in order
        of first call) -> number of values per channel the statistics were computed
        from.

    Each layer's ``running_mean`` becomes the mean and ``running_var`` the unbiased
    variance (torch's convention) of every value per channel it saw, and
    ``num_batches_tracked`` grows by the number of batches it saw. Layers keep their
    mode and parameters; if the stream raises, no statistics are changed.
    """
    if _dask_hook.wants_dask(layers_or_callable, batches):
        return _dask_hook.recalibrate(layers_or_callable, batches, layers=layers,
                                      num_batches=num_batches, progress=progress)
    bar = _Progress(_total(batches, num_batches), progress)

    def stream():
        items = batches if num_batches is None else itertools.islice(batches, num_batches)
        for batch in items:
            yield batch
            bar.update()

    try:
        if isinstance(layers_or_callable, Callable) and not isinstance(layers_or_callable,
                                                                       BatchNorm):
            return _recalibrate_callable(layers_or_callable, stream(), layers)
        if layers is not None:
            raise TypeError("layers= is only for a callable; pass the layers first")
        return _recalibrate_layers(layers_or_callable, stream())
    finally:
        bar.close()


def _total(batches, num_batches):
    """How many batches the stream will give, for the progress bar (None: unknown)."""
    if num_batches is not None and (isinstance(num_batches, bool) or
                                    not isinstance(num_batches, int) or num_batches < 0):
        raise ValueError(f"num_batches must be a non-negative int, got {num_batches!r}")
    if not hasattr(batches, "__len__"):
        return num_batches
    return len(batches) if num_batches is None else min(num_batches, len(batches))


def _recalibrate_layers(layers, batches):
    named = _as_named_layers(layers)
    single = isinstance(layers, BatchNorm)
    moments = {name: (layer, _Moments()) for name, layer in named.items()}
    for batch in batches:
        for name, x in _batch_for(named, batch, single).items():
            layer, mom = moments[name]
            mom.add(x, layer.axis, layer.num_features)
    return _finish(moments)


def _recalibrate_callable(forward, batches, layers):
    if getattr(_local, "recorder", None) is not None:
        raise RuntimeError("recalibrate is already running in this thread")
    if layers is not None:
        named = _as_named_layers(layers)
        recorder = _Recorder()
        originals = {}
        for layer in named.values():          # divert only these instances
            originals[id(layer)] = layer
            layer._forward = (lambda lyr: lambda x: recorder.forward(lyr, x))(layer)
        try:
            for batch in batches:
                forward(batch)
        finally:
            for layer in originals.values():
                del layer._forward
        seen = recorder.seen
        return _finish({name: seen.get(id(layer), (layer, _Moments()))
                        for name, layer in named.items()})
    recorder = _Recorder()
    _install_hook()
    _local.recorder = recorder
    try:
        for batch in batches:
            forward(batch)
    finally:
        _local.recorder = None
        _remove_hook()
    named, used = {}, set()
    for i, (layer, mom) in enumerate(recorder.seen.values()):
        name = layer.name if layer.name and layer.name not in used else f"BatchNorm_{i}"
        used.add(name)
        named[name] = (layer, mom)
    return _finish(named)
