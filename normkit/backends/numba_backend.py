"""The Numba backend: the kernels of ``_spec.py`` as parallel, cached ``@njit`` code.

The kernels themselves live in ``numba_kernels.py``; this module decides, per call,
whether a call runs on the thread pool or on the serial twin of the same kernel, how
the work is cut into items, and keeps Numba's thread pool usable from many Python
threads and after ``fork()``.

Threading layer (decided here, reported by ``info()``)
------------------------------------------------------
Numba picks its layer once per process, at the first parallel launch, in the order
tbb > omp > workqueue unless ``NUMBA_THREADING_LAYER`` says otherwise. normkit does
not override that choice (it is process-wide and may belong to the application); it
adapts to whichever layer is running:

* ``tbb``: thread-safe and fork-safe. Used as is.
* ``omp`` (the usual Linux choice when the ``tbb`` package is not installed): thread-safe,
  and its launch is cheap (about 2 us per call measured here, against about 110 us for
  ``workqueue``), which matters for the mid-size inputs of normalization layers. With
  the GNU runtime (libgomp) it is *not* fork-safe: Numba kills (SIGTERM) a forked
  child whose parent had started the pool, and libgomp would hang otherwise. So in such a
  child every kernel runs its serial twin instead: correct and single-threaded, which
  is also what a fork-based worker (a data loader) usually wants. Intel's OpenMP is
  fork-safe and keeps running in parallel.
* ``workqueue``: fork-safe but aborts the process when two Python threads run parallel
  code at once, so parallel calls are serialized by a module lock (the lock is
  replaced in a forked child in case another thread held it at fork time). Its launch
  is slow, so the parallel threshold is raised.

``tbb`` is not a dependency: installing it (``pip install tbb``) makes Numba pick it and
keeps a forked child parallel; normkit needs nothing else to use it.

Threads
-------
``numba.set_num_threads`` is thread-local, so ``set_num_threads(n)`` records n (clamped
to ``numba.config.NUMBA_NUM_THREADS``) and bumps a generation counter; each parallel
call applies it in the calling thread when that thread's applied generation is stale
(one attribute check per call). Nothing starts the pool before the first parallel call,
so importing and configuring normkit does not make a later ``fork()`` unsafe.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import numba

from . import numba_kernels as _nk

NAME = "numba"

# Below this many elements a call runs the serial twin: the launch would cost more than
# the second core gains. Measured on the 2-core development VM (rows_forward,
# channels_last_moments, channels_first_affine, float32, serial vs parallel): an omp
# launch costs ~2 us on an idle machine but 10-20 us when other processes compete for
# the cores; the parallel twin won from ~32K elements idle and from ~128K under load,
# so 64K splits the difference. workqueue launches cost ~110 us here.
_PAR_MIN = 1 << 16
_PAR_MIN_WORKQUEUE = 1 << 19
# Moments are two-pass inside a chunk; a chunk of this many elements (256 KiB in
# float32, 512 KiB in float64) is reread from L2 rather than from memory, and few
# enough chunks keep the serial Chan merge of their partials negligible.
_CHUNK = 1 << 16
# Element-wise passes only need enough items to balance the threads.
_CHUNK_EW = 1 << 16
_MIN_CHUNK = 1 << 11            # never split a row into pieces smaller than this
_ITEMS_PER_THREAD = 4
# GroupNorm fused forward: split a (sample, group) block across threads only when there
# are fewer blocks than threads and a block is larger than this (one item per block is
# then too coarse); otherwise each block is one item, read from memory once.
_GROUP_SPLIT = 1 << 18


class _State:
    """Process-wide settings (a tiny class so that hot paths read plain attributes)."""
    threads = 1                 # what set_num_threads asked for, clamped
    gen = 0                     # bumped by set_num_threads; threads compare to it
    par_min = _PAR_MIN
    layer = None                # the threading layer, once the pool is running
    serial_only = False         # True in a fork child that cannot use the pool
    serial_reason = ""
    lock = None                 # a Lock for workqueue, else None


_S = _State()
_tls = threading.local()
_build_lock = threading.Lock()
_dispatchers: dict = {}
_MAX_THREADS = int(numba.config.NUMBA_NUM_THREADS)
_S.threads = _MAX_THREADS


def set_num_threads(n: int) -> None:
    """Use at most n threads in every later call, from any Python thread."""
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads expects a positive int, got {n!r}")
    _S.threads = min(n, _MAX_THREADS)
    _S.gen += 1


def _start_pool() -> None:
    """First parallel call in this process: start Numba's pool and adapt to its layer."""
    with _build_lock:
        if _S.layer is not None:
            return
        numba.set_num_threads(_S.threads)      # launches the pool
        layer = numba.threading_layer()
        if layer == "workqueue":
            _S.lock = threading.Lock()
            _S.par_min = _PAR_MIN_WORKQUEUE
        _S.layer = layer


def _apply_threads() -> None:
    """Make numba's thread-local thread count in *this* thread match _S.threads."""
    if _S.layer is None:
        _start_pool()
    gen = _S.gen
    numba.set_num_threads(_S.threads)
    _tls.gen = gen


def _after_fork_in_child() -> None:
    try:
        from numba.np.ufunc import parallel as _p
        started = bool(_p._is_initialized)
        layer = _p._threading_layer
    except Exception:  # noqa: BLE001 - private API moved: assume the worst
        started, layer = True, _S.layer or "unknown"
    if not started:
        return
    if layer == "omp":
        try:
            from numba.np.ufunc import omppool
            vendor = getattr(omppool, "openmp_vendor", "GNU")
        except Exception:  # noqa: BLE001
            vendor = "GNU"
        if vendor != "Intel":
            _S.serial_only = True
            _S.serial_reason = ("forked after the parent started the GNU OpenMP pool "
                                "(not fork-safe): serial kernels in this process")
    elif layer == "workqueue":
        _S.lock = threading.Lock()
    elif layer != "tbb":
        _S.serial_only = True
        _S.serial_reason = f"forked with threading layer {layer!r}: serial kernels"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _kernel(name, dtype, par):
    key = (name, dtype, par)
    try:
        return _dispatchers[key]
    except KeyError:
        pass
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"normkit numba kernels take float32 or float64 arrays, got {dtype}")
    with _build_lock:
        fn = _dispatchers.get(key)
        if fn is None:
            fn = _nk.build(name, dtype, par)
            _dispatchers[key] = fn
    return fn


def _par(size):
    """Run this call in parallel? (and if so, apply the thread count in this thread)"""
    if size < _S.par_min or _S.threads < 2 or _S.serial_only:
        return False
    if getattr(_tls, "gen", -1) != _S.gen:
        _apply_threads()
    return True


def _run(fn, args):
    lock = _S.lock
    if lock is None:
        fn(*args)
    else:
        with lock:
            fn(*args)


def _split(length, rows, chunk, par):
    """Chunks per row so items are <= chunk elements and, in parallel, enough of them."""
    nc = -(-length // chunk)
    if par:
        want = -(-_ITEMS_PER_THREAD * _S.threads // rows)
        if want > nc:
            nc = min(want, max(1, length // _MIN_CHUNK))
        nc = max(nc, 1)
    return min(nc, length)


def _split_rows(nrows, width, outer, chunk, par):
    """Chunks of rows (each `width` wide) per outer index, for channels-last passes."""
    per = max(1, chunk // max(width, 1))
    nc = -(-nrows // per)
    if par:
        want = -(-_ITEMS_PER_THREAD * _S.threads // outer)
        if want > nc:
            nc = min(want, max(1, nrows * width // _MIN_CHUNK))
        nc = max(nc, 1)
    return min(nc, nrows)


# ============================================================ kernels (see _spec.py)
def plane_moments(x):
    P, S = x.shape
    mean = np.empty(P)
    m2 = np.empty(P)
    par = _par(x.size)
    nc = _split(S, P, _CHUNK, par)
    fn = _kernel("plane_moments", x.dtype, par)
    if par:
        _run(fn, (x, nc, mean, m2))
    else:
        fn(x, nc, mean, m2)
    return mean, m2


def channels_last_moments(x):
    N, S, C = x.shape
    if C == 1:
        mean, m2 = plane_moments(x.reshape(N, S))
        return mean.reshape(N, 1), m2.reshape(N, 1)
    mean = np.empty((N, C))
    m2 = np.empty((N, C))
    par = _par(x.size)
    nc = _split_rows(S, C, N, _CHUNK, par)
    fn = _kernel("channels_last_moments", x.dtype, par)
    if par:
        _run(fn, (x, nc, mean, m2))
    else:
        fn(x, nc, mean, m2)
    return mean, m2


def rows_forward(x, weight, bias, eps, rms, out):
    R = x.shape[0]
    mean = np.empty(R)
    rstd = np.empty(R)
    par = _par(x.size)
    fn = _kernel("rows_forward", x.dtype, par)
    args = (x, weight, bias, float(eps), bool(rms), out, mean, rstd)
    if par:
        _run(fn, args)
    else:
        fn(*args)
    return mean, rstd


def rows_backward(dy, x, mean, rstd, weight, rms, dx):
    R, K = x.shape
    dw = np.empty(K)
    db = np.empty(K)
    par = _par(x.size)
    nch = min(R, _S.threads) if par else 1
    fn = _kernel("rows_backward", x.dtype, par)
    args = (dy, x, mean, rstd, weight, bool(rms), dx, nch, dw, db)
    if par:
        _run(fn, args)
    else:
        fn(*args)
    return dw, db


def _first_as_last(a):
    """(N, C, 1) viewed as channels-last (N, 1, C): same memory, vectorizes along C."""
    return a.reshape(a.shape[0], 1, a.shape[1])


def channels_first_affine(x, shift, scale, offset, out):
    N, C, S = x.shape
    if S == 1 and C > 1:
        return channels_last_affine(_first_as_last(x), shift, scale, offset,
                                    _first_as_last(out))
    par = _par(x.size)
    nc = _split(S, N * C, _CHUNK_EW, par) if par else 1
    fn = _kernel("channels_first_affine", x.dtype, par)
    if par:
        _run(fn, (x, shift, scale, offset, out, nc))
    else:
        fn(x, shift, scale, offset, out, 1)


def channels_last_affine(x, shift, scale, offset, out):
    N, S, C = x.shape
    par = _par(x.size)
    nc = _split_rows(S, C, N, _CHUNK_EW, par) if par else 1
    fn = _kernel("channels_last_affine", x.dtype, par)
    if par:
        _run(fn, (x, shift, scale, offset, out, nc))
    else:
        fn(x, shift, scale, offset, out, 1)


def channels_first_grad_sums(dy, x, shift):
    N, C, S = x.shape
    if S == 1 and C > 1:
        return channels_last_grad_sums(_first_as_last(dy), _first_as_last(x), shift)
    s1 = np.empty((N, C))
    s2 = np.empty((N, C))
    par = _par(x.size)
    nc = _split(S, N * C, _CHUNK, par) if par else 1
    fn = _kernel("channels_first_grad_sums", x.dtype, par)
    if par:
        _run(fn, (dy, x, shift, nc, s1, s2))
    else:
        fn(dy, x, shift, 1, s1, s2)
    return s1, s2


def channels_last_grad_sums(dy, x, shift):
    N, S, C = x.shape
    s1 = np.empty((N, C))
    s2 = np.empty((N, C))
    par = _par(x.size)
    nc = _split_rows(S, C, N, _CHUNK, par) if par else 1
    fn = _kernel("channels_last_grad_sums", x.dtype, par)
    if par:
        _run(fn, (dy, x, shift, nc, s1, s2))
    else:
        fn(dy, x, shift, 1, s1, s2)
    return s1, s2


def channels_first_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx):
    N, C, S = x.shape
    if S == 1 and C > 1:
        return channels_last_grad_apply(_first_as_last(dy), _first_as_last(x), shift,
                                        coef_dy, coef_x, coef_1, _first_as_last(dx))
    par = _par(x.size)
    nc = _split(S, N * C, _CHUNK_EW, par) if par else 1
    fn = _kernel("channels_first_grad_apply", x.dtype, par)
    args = (dy, x, shift, coef_dy, coef_x, coef_1, dx, nc)
    if par:
        _run(fn, args)
    else:
        fn(*args)


def channels_last_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx):
    N, S, C = x.shape
    par = _par(x.size)
    nc = _split_rows(S, C, N, _CHUNK_EW, par) if par else 1
    fn = _kernel("channels_last_grad_apply", x.dtype, par)
    args = (dy, x, shift, coef_dy, coef_x, coef_1, dx, nc)
    if par:
        _run(fn, args)
    else:
        fn(*args)


def channels_first_group_forward(x, groups, weight, bias, eps, out):
    N, C, S = x.shape
    G = int(groups)
    NG = N * G
    L = (C // G) * S
    mean = np.empty(NG)
    rstd = np.empty(NG)
    par = _par(x.size)
    nc = 1
    if par and NG < _S.threads and L > _GROUP_SPLIT:
        nc = _split(L, NG, _CHUNK, par)
    fn = _kernel("channels_first_group_forward", x.dtype, par)
    args = (x, G, weight, bias, float(eps), out, nc, mean, rstd)
    if par:
        _run(fn, args)
    else:
        fn(*args)
    return mean.reshape(N, G), rstd.reshape(N, G)


def channels_first_affine_act(x, shift, scale, offset, residual, relu, out):
    N, C, S = x.shape
    if S == 1 and C > 1:
        return channels_last_affine_act(
            _first_as_last(x), shift, scale, offset,
            None if residual is None else _first_as_last(residual), relu,
            _first_as_last(out))
    has_res = residual is not None
    # No residual: x stands in for it and the kernel takes its residual-free loop.
    res = residual if has_res else x
    par = _par(x.size)
    nc = _split(S, N * C, _CHUNK_EW, par) if par else 1
    fn = _kernel("channels_first_affine_act", x.dtype, par)
    args = (x, shift, scale, offset, res, has_res, bool(relu), out, nc)
    if par:
        _run(fn, args)
    else:
        fn(*args)


def channels_last_affine_act(x, shift, scale, offset, residual, relu, out):
    N, S, C = x.shape
    has_res = residual is not None
    res = residual if has_res else x
    par = _par(x.size)
    nc = _split_rows(S, C, N, _CHUNK_EW, par) if par else 1
    fn = _kernel("channels_last_affine_act", x.dtype, par)
    args = (x, shift, scale, offset, res, has_res, bool(relu), out, nc)
    if par:
        _run(fn, args)
    else:
        fn(*args)


# ============================================================ info
def info() -> dict:
    """What this backend runs with (does not start the thread pool)."""
    cache_dir = None
    for fn in list(_dispatchers.values()):
        cache = getattr(fn, "_cache", None)
        cache_dir = getattr(cache, "_cache_path", None)
        if cache_dir:
            break
    configured = str(numba.config.THREADING_LAYER)
    return {
        "numba": numba.__version__,
        "threading_layer": _S.layer or f"not started yet (numba setting: {configured!r})",
        "threads": _S.threads,
        "max_threads": _MAX_THREADS,
        "parallel_threshold_elements": _S.par_min,
        "parallel_calls_serialized": _S.lock is not None,
        "serial_only": _S.serial_only,
        "serial_reason": _S.serial_reason,
        "fork": ("in a child forked after the pool started: tbb and Intel OpenMP stay "
                 "parallel, GNU OpenMP falls back to the serial kernels"),
        "compiled_kernels": sorted(f"{k}[{np.dtype(d).name}, {'par' if p else 'ser'}]"
                                   for k, d, p in _dispatchers),
        "cache_dir": cache_dir or "numba default (__pycache__ beside numba_kernels.py, "
                                  "else the user cache dir; NUMBA_CACHE_DIR overrides)",
    }
