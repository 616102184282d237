"""Data, runners and error measures of the benchmark cases.

:func:`make_data` builds a case's arrays (seeded by the case name, so every run and
every column sees the same numbers); :func:`truth` computes the float64 result that
every column is checked against: normkit's ``numpy`` backend (the readable oracle) on
float64 copies of the same inputs. For a 16-bit case the inputs are exact in float64,
so the truth is the exact answer to the question every column was asked, and the error
of a column is what its arithmetic and its final rounding cost.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from ._bench_op_base import is_16bit, np_dtype, rand, torch_to_numpy

__all__ = [
    "make_data", "widen_units", "truth", "case_bytes", "normkit_runner", "plain_runner",
    "torch_runner", "onnx_units", "copy_runner", "to_arrays", "max_rel_error",
    "run_for_check",
]

#: data kinds: (scale, loc) of the normal values of x. "offset" is a hard case for
#: one-pass variances (mean 1e4, std 1: E[x^2] - E[x]^2 cancels every digit).
DATA_KINDS = {"normal": (1.5, 0.3), "offset": (1.0, 1e4)}


def make_data(case, smoke=False):
    """The units' arrays: inputs of one shape are shared between units (a real network
    hands each layer a fresh activation, but allocating 53 of them would dominate)."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    scale, loc = DATA_KINDS[case.data]
    shared_x = {}
    units = []
    for shape in case.shapes(smoke):
        shape = tuple(shape)
        if shape not in shared_x:
            # normal: mean 0.3, std 1.5: not centred, so a wrong mean shows up
            shared_x[shape] = rand(rng, shape, np_dtype(case.dtype), scale, loc)
        units.append(case.op.make_unit(shared_x[shape], case.layout, rng, case.params))
    return units


def widen_units(units, dtype):
    """Copies of the units with every floating array converted to ``dtype`` (exact when
    widening). Arrays shared between units stay shared."""
    dtype = np.dtype(dtype)
    done = {}

    def conv(a):
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fV":   # V: bfloat16
            return a
        if id(a) not in done:
            done[id(a)] = a.astype(dtype)
        return done[id(a)]
    return [{k: conv(v) for k, v in u.items()} for u in units]


def truth(case, units):
    """Every unit's result in float64: normkit's numpy backend on float64 copies."""
    wide = widen_units(units, np.float64)
    return to_arrays(run_for_check(normkit_runner(case, wide, "numpy")))


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
    """Plain NumPy. NumPy has no fast 16-bit arithmetic, so for 16-bit data it does what
    a user would: widen the inputs to float32, compute, narrow the result (inside the
    timed call)."""
    if not is_16bit(units[0]["x"].dtype):
        return _sequence([case.op.plain(u) for u in units])
    dtype = units[0]["x"].dtype

    def widened(u):
        def fn():
            out = case.op.plain(widen_units([u], np.float32)[0])()
            return tuple(a.astype(dtype) for a in out) if isinstance(out, tuple) \
                else out.astype(dtype)
        return fn
    return _sequence([widened(u) for u in units])


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
        return [torch_to_numpy(result)]
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
