"""The Numba backend: the kernels of ``_spec.py`` as parallel, cached ``@njit`` code.

The kernels themselves live in ``numba_kernels.py``; this module decides, per call,
whether a call runs on the thread pool or on the serial twin of the same kernel, how
the work is cut into items (from the shape alone: results do not depend on the thread
count), launches every kernel through one function driven by one table (``_TABLE``:
driver -> work split, statistics outputs, channels-last twin), and keeps Numba's thread
pool usable from many Python threads and after ``fork()``.

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

float16 / bfloat16
------------------
Numba has no float16 on the CPU and no bfloat16: the launcher passes 16-bit data as a
same-bits int16 / uint16 view (zero copy) and the kernels convert in registers
(``numba_convert.py``). Parameters must then be float32; a mismatched argument gets a
TypeError naming it, what was expected and what was given.
"""
from __future__ import annotations

import operator
import os
import threading

import ml_dtypes
import numba
import numpy as np

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
# Work split: depends on the shape only, never on the thread count, so every thread
# count (and the serial twin) computes the same partials: bit-identical results.
# A piece of at most _CHUNK elements (256 KiB in float32) is reread from L2 by the
# two-pass moments; _ITEMS pieces per call balance up to ~4-8 threads (a machine with
# many more threads gets coarser balance on small calls; results never change), and no
# piece is smaller than _MIN_CHUNK elements, so the partial merges stay negligible.
_CHUNK = 1 << 16
_MIN_CHUNK = 1 << 11
_ITEMS = 16
# GroupNorm fused forward: split (sample, group) blocks into pieces only when there are
# fewer than _GROUP_FEW blocks, each larger than _GROUP_SPLIT elements (such a block does
# not stay in cache, so the split costs no extra read); otherwise one item per block.
_GROUP_FEW = 8
_GROUP_SPLIT = 1 << 18
# rows_backward: fixed blocks of >= 8 rows and >= 32K elements (at most 64 blocks), as
# in the Cython backend: the dweight/dbias partials do not depend on the thread count.
_ROWS_MIN = 8
_ROWS_BLOCK = 1 << 15
_ROWS_MAX_BLOCKS = 64


class _State:
    """Process-wide settings (a tiny class so that hot paths read plain attributes)."""
    threads = 1                 # what set_num_threads asked for, clamped
    gen = 0                     # bumped by set_num_threads; threads compare to it
    par_min = _PAR_MIN
    layer: str | None = None    # the threading layer, once the pool is running
    serial_only = False         # True in a fork child that cannot use the pool
    serial_reason = ""
    lock: threading.Lock | None = None   # a Lock for workqueue, else None


_S = _State()
_tls = threading.local()
_build_lock = threading.Lock()
_dispatchers: dict = {}
_MAX_THREADS = int(numba.config.NUMBA_NUM_THREADS)
_S.threads = _MAX_THREADS


def set_num_threads(n: int) -> None:
    """Use at most n threads in every later call, from any Python thread."""
    if isinstance(n, bool):
        raise TypeError(f"set_num_threads: n must be an integer, got bool {n!r}")
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n!r}")
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


def _par():
    """Run a call of at least par_min elements in parallel? (and if so, apply the thread
    count in this thread)"""
    if _S.threads < 2 or _S.serial_only:
        return False
    if getattr(_tls, "gen", -1) != _S.gen:
        _apply_threads()
    return True


def _chunks(length, width, outer):
    """Pieces to cut each of `outer` runs into: a run is `length` slices of `width`
    contiguous elements (width 1: a plane; C: channels-last rows). Shape-only."""
    per = max(1, _CHUNK // max(width, 1))
    nc = -(-length // per)
    want = -(-_ITEMS // outer)
    if want > nc:
        nc = min(want, max(1, length * width // _MIN_CHUNK))
    return max(1, min(nc, length))


def _split_planes(args):
    """(..., S) data, the last axis split: planes, rows, channels-first (N, C, S)."""
    S = args[0].shape[-1]
    return _chunks(S, 1, args[0].size // S)


def _split_last(args):
    N, S, C = args[0].shape
    return _chunks(S, C, N)


def _split_row_blocks(args):
    R, K = args[0].shape
    rows = max(_ROWS_MIN, -(-_ROWS_BLOCK // K), -(-R // _ROWS_MAX_BLOCKS))
    return -(-R // rows)


def _split_groups(args):
    x, groups = args[0], args[1]
    N, C, S = x.shape
    if N * groups >= _GROUP_FEW or (C // groups) * S <= _GROUP_SPLIT:
        return 1
    return _chunks((C // groups) * S, 1, N * groups)


def _rows(a):
    return a[0].shape[:1]


def _nc_first(a):
    return a[0].shape[:2]


def _nc_last(a):
    return (a[0].shape[0], a[0].shape[2])


def _first_as_last(a):
    """(N, C, 1) viewed as channels-last (N, 1, C): same memory, vectorizes along C."""
    if isinstance(a, np.ndarray) and a.ndim == 3:
        return a.reshape(a.shape[0], 1, a.shape[1])
    return a


# float16 / bfloat16 data reach the kernels as same-bits integer views (zero copy; see
# numba_convert.py): Numba has no float16 on the CPU and no bfloat16 at all.
_VIEW_OF = {np.dtype(np.float16).num: np.dtype(np.int16),
            np.dtype(ml_dtypes.bfloat16).num: np.dtype(np.uint16)}
_STORAGE_NUMS = {np.dtype(np.float32).num, np.dtype(np.float64).num, *_VIEW_OF}


class _Launch:
    """How one driver is launched (every driver takes ``*args[, nc], *stats``) and its
    compiled twins, built on first use: ``compiled[dtype.num, par, read-only inputs]``."""

    def __init__(self, name, split, stats, as_last=None):
        self.name = name
        self.split = split          # args -> pieces per row (shape only); None: whole rows
        self.stats = stats          # args -> shape of the two float64 outputs; None: none
        self.as_last = as_last      # channels-first driver: its channels-last twin, S == 1
        self.data = _nk.data_positions(name)     # the arguments in the storage dtype
        self.compiled: dict = {}

    def build(self, dtype, par, ro):
        """The twin for (dtype, par, read-only inputs), compiled or loaded once."""
        if dtype.num not in _STORAGE_NUMS:
            raise TypeError(f"numba {self.name}: argument {_nk.arg_names(self.name)[0]!r} "
                            f"must be a float32, float64, float16 or bfloat16 array, got "
                            f"{dtype}")
        with _build_lock:
            fn = self.compiled.get((dtype.num, par, ro))
            if fn is None:
                fn = _nk.build(self.name, _VIEW_OF.get(dtype.num, dtype), par, ro)
                self.compiled[dtype.num, par, ro] = fn
                _dispatchers[(self.name, dtype, bool(par), ro)] = fn
        return fn


# Driver name (numba_kernels.DRIVERS) -> launch. The size deciding serial or parallel
# is always args[0].size (x, or dy of x's shape).
_TABLE = {name: _Launch(name, *how) for name, how in {
    "plane_moments": (_split_planes, _rows),
    "channels_last_moments": (_split_last, _nc_last),
    "rows_forward": (None, _rows),
    "rows_backward": (_split_row_blocks, lambda a: a[0].shape[1:]),
    "channels_first_grad_sums": (_split_planes, _nc_first, "channels_last_grad_sums"),
    "channels_last_grad_sums": (_split_last, _nc_last),
    "channels_first_grad_apply": (_split_planes, None, "channels_last_grad_apply"),
    "channels_last_grad_apply": (_split_last, None),
    "channels_first_group_forward": (_split_groups, lambda a: (a[0].shape[0], a[1])),
    "channels_first_batch_forward": (None, lambda a: a[0].shape[1:2]),
    "channels_first_group_backward": (None, lambda a: a[0].shape[:2]),
    "channels_first_batch_backward": (None, lambda a: a[0].shape[:2]),
    "channels_first_affine_act": (_split_planes, None, "channels_last_affine_act"),
    "channels_last_affine_act": (_split_last, None),
}.items()}


def _launch(launch, *args):
    """The one launcher: layout shortcut, serial or parallel, split, outputs, call."""
    x = args[0]
    if launch.as_last and x.shape[2] == 1 and x.shape[1] > 1:
        return _launch(_TABLE[launch.as_last], *map(_first_as_last, args))
    dtype = x.dtype
    size = x.size
    par = size >= _S.par_min and _par()
    ro = True
    if dtype.num in _VIEW_OF:
        # 16-bit: writable inputs take the twin typed writable (faster, see _nk.build)
        args, ro = _views(args, launch.data)
    fn = launch.compiled.get((dtype.num, par, ro))
    if fn is None:
        fn = launch.build(dtype, par, ro)
    stats: tuple = ()
    if launch.stats is not None:
        shape = launch.stats(args)
        stats = (np.empty(shape), np.empty(shape))
    if launch.split is not None:
        # at most _MIN_CHUNK elements: every split rule gives one piece (saves ~1 us)
        args += (1 if size <= _MIN_CHUNK else launch.split(args),)
    try:
        if par and _S.lock is not None:
            with _S.lock:
                fn(*args, *stats)
        else:
            fn(*args, *stats)
    except TypeError as exc:
        raise _bad_argument(launch.name, dtype, args, fn) from exc
    return stats or None


def _views(args, data):
    """16-bit data arguments as their same-bits integer views (zero copy), and whether
    any of them is read-only."""
    args = list(args)
    ro = False
    for i in data:
        a = args[i]
        if isinstance(a, np.ndarray) and a.dtype.num in _VIEW_OF:
            args[i] = a.view(_VIEW_OF[a.dtype.num])
            ro = ro or not a.flags.writeable
    return tuple(args), ro


def _viewed_name(given, data_dtype):
    """The user's name of an argument's dtype (an int16/uint16 view of 16-bit data is
    reported as the float16/bfloat16 the caller passed)."""
    if data_dtype.num in _VIEW_OF and given in (np.int16, np.uint16):
        return "float16" if given == np.int16 else "bfloat16"
    return str(given)


def _bad_argument(name, dtype, args, fn):
    """The TypeError for a call that matches no compiled signature: it names the first
    argument that differs from the signature, what was expected and what was given."""
    names = _nk.arg_names(name)
    for i, (a, want) in enumerate(zip(args, fn.signatures[0], strict=False)):
        if not isinstance(want, numba.types.Array):
            continue
        ok = (isinstance(a, np.ndarray) and a.dtype == numba.np.numpy_support.as_dtype(
            want.dtype) and a.ndim == want.ndim and a.flags.c_contiguous
            and (a.flags.writeable or not want.mutable))
        if ok:
            continue
        expect = (f"a C-contiguous {'writable ' if want.mutable else ''}{want.ndim}-d "
                  f"{_nk.storage_name(want.dtype)} array")
        given = (type(a).__name__ if not isinstance(a, np.ndarray) else
                 f"a {'' if a.flags.c_contiguous else 'non-'}C-contiguous "
                 f"{'' if a.flags.writeable else 'read-only '}{a.ndim}-d "
                 f"{_viewed_name(a.dtype, dtype)} array")
        return TypeError(f"numba {name}: argument {names[i]!r} must be {expect} for "
                         f"{dtype} data, got {given}")
    return TypeError(f"numba {name}: no compiled signature matches the arguments")


# ============================================================ kernels (see _spec.py)
_K = _TABLE


def plane_moments(x):
    return _launch(_K["plane_moments"], x)


def channels_last_moments(x):
    N, S, C = x.shape
    if C == 1:
        return tuple(s.reshape(N, 1) for s in plane_moments(x.reshape(N, S)))
    return _launch(_K["channels_last_moments"], x)


def rows_forward(x, weight, bias, eps, rms, out):
    return _launch(_K["rows_forward"], x, weight, bias, float(eps), bool(rms), out)


def rows_backward(dy, x, mean, rstd, weight, rms, dx):
    return _launch(_K["rows_backward"], dy, x, mean, rstd, weight, bool(rms), dx)


def channels_first_affine(x, shift, scale, offset, out):
    _launch(_K["channels_first_affine_act"], x, shift, scale, offset, x, False, False, out)


def channels_last_affine(x, shift, scale, offset, out):
    _launch(_K["channels_last_affine_act"], x, shift, scale, offset, x, False, False, out)


def channels_first_grad_sums(dy, x, shift):
    return _launch(_K["channels_first_grad_sums"], dy, x, shift)


def channels_last_grad_sums(dy, x, shift):
    return _launch(_K["channels_last_grad_sums"], dy, x, shift)


def channels_first_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx):
    _launch(_K["channels_first_grad_apply"], dy, x, shift, coef_dy, coef_x, coef_1, dx)


def channels_last_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx):
    _launch(_K["channels_last_grad_apply"], dy, x, shift, coef_dy, coef_x, coef_1, dx)


def channels_first_group_forward(x, groups, weight, bias, eps, out):
    return _launch(_K["channels_first_group_forward"], x, int(groups), weight, bias,
                   float(eps), out)


def channels_first_batch_forward(x, weight, bias, eps, out):
    return _launch(_K["channels_first_batch_forward"], x, weight, bias, float(eps), out)


def channels_first_group_backward(dy, x, groups, mean, rstd, weight, dx):
    return _launch(_K["channels_first_group_backward"], dy, x, int(groups), mean, rstd,
                   weight, dx)


def channels_first_batch_backward(dy, x, mean, rstd, weight, dx):
    return _launch(_K["channels_first_batch_backward"], dy, x, mean, rstd, weight, dx)


def channels_first_affine_act(x, shift, scale, offset, residual, relu, out):
    # No residual: x stands in for it and the kernel takes its residual-free loop.
    res = x if residual is None else residual
    _launch(_K["channels_first_affine_act"], x, shift, scale, offset, res,
            residual is not None, bool(relu), out)


def channels_last_affine_act(x, shift, scale, offset, residual, relu, out):
    res = x if residual is None else residual
    _launch(_K["channels_last_affine_act"], x, shift, scale, offset, res,
            residual is not None, bool(relu), out)


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
        "compiled_kernels": sorted(
            f"{k}[{np.dtype(d).name}, {'par' if p else 'ser'}{'' if ro else ', rw'}]"
            for k, d, p, ro in _dispatchers),
        "cache_dir": cache_dir or "numba default (__pycache__ beside numba_kernels.py, "
                                  "else the user cache dir; NUMBA_CACHE_DIR overrides)",
    }
