"""Time every normkit backend against a memory copy and the peers (python -m normkit bench).

For each case of the table in :mod:`normkit._bench_cases` it prepares every
implementation on the same arrays -- each available normkit backend, an ``np.copyto``
of the same number of bytes (the memory-bound floor), and the peers that are installed
(PyTorch CPU, ONNX Runtime, and on request a plain vectorized NumPy version) -- checks
each result against the float64 truth (normkit's ``numpy`` backend on float64 copies of
the same inputs, :func:`normkit._bench_data.truth`), then times them. A 16-bit case
also times every backend on its float32 twin, in the same rounds. The columns are
built in :mod:`normkit._bench_columns`; the printed tables in :mod:`normkit._bench_report`.

Timing: one warm-up call (JIT compilation, first-touch page faults), a calibration
call that picks how many calls make one sample (calls of 0.5 ms or more are timed one
by one, shorter ones in a loop lasting ~0.5 ms), then rounds in which every
implementation takes one sample in turn (the order rotates every round), for a time
budget per case. Interleaving makes a burst of load from other processes hit every
column alike, so the *ratios* stay meaningful on a busy machine even when the absolute
times do not; short samples and the median let occasional scheduler stalls spoil single
samples rather than the result. The reported time is the median per-call time over the
rounds (``time.perf_counter``, garbage collector off while a sample runs). Calls
shorter than 10 ms get one untimed call right before each sample, so threads another
library left spinning (OpenMP, ORT) and cold caches do not land on the next column.

PyTorch and ONNX Runtime are imported lazily (in _bench_columns), only when installed; ``import
normkit`` never imports them or this module. No third-party progress bar either: a
small one is drawn on stderr (plain lines when stderr is not a terminal).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import numpy as np

from . import _bench_cases as C
from . import _bench_data as D
from ._bench_columns import Impl, discover, short, unsupported_dtype
from ._bench_op_base import NotApplicable
from ._bench_report import (
    _DISTURBED,
    HALF_HEADER,
    HALF_LEGEND,
    PLAIN_NUMPY,
    Progress,
    _disturbed,
    format_markdown,
    format_text,
    half_rows,
    header_line,
    legend,
    machine_info,
    summary_lines,
    table_rows,
)

__all__ = ["TIERS", "add_arguments", "main", "run"]

#: ``--help`` text: plain words (argparse prints it as is, so no reST markup)
DESCRIPTION = ("Time every normkit backend that loads here against a memory copy of the "
               "same bytes and the installed peers (PyTorch, ONNX Runtime), after checking "
               "each result against a float64 truth. float16 and bfloat16 rows also get "
               "a table of errors and of their time against float32.")

#: (seconds of rounds per case, minimum rounds, target seconds per sample). Samples are
#: short (calls >= 0.5 ms are timed one by one) so that the median over many samples
#: shrugs off the scheduler stalls of a shared machine: a 2-thread call whose second
#: thread is descheduled waits a whole tick (4 ms), and one such stall must spoil one
#: sample, not a long loop of calls.
TIERS = {
    "quick": (0.25, 3, 0.0005),
    "default": (0.6, 5, 0.0005),
    "full": (2.0, 9, 0.0005),
}
_MAX_ROUNDS = 2000
#: ``--peers`` names. The plain-NumPy peer is ``plain-numpy`` everywhere (option, column,
#: JSON), never ``numpy``: that is normkit's own reference backend (``--backends numpy``).
PEERS = (PLAIN_NUMPY, "torch", "onnxruntime")
#: earlier spellings still accepted by ``--peers``
PEER_ALIASES = {"numpy": PLAIN_NUMPY}
_PRECALL_BELOW = 0.010


# ====================================================================== allocator
def tune_malloc():
    """Keep freed memory in the process (glibc only); returns a description or None.

    Every column allocates its output per call, as users call it. With glibc's default,
    adaptive settings a freed multi-MB output may go back to the system (heap trimming,
    or an mmap'ed chunk), and the next call then page-faults its output in again: on the
    BERT case that cost one library 1500 and another 7000 page faults per run, depending
    on allocation history, and moved the result 2-5x between runs. Fixing the mmap
    threshold at its maximum (32 MiB) and trimming at 1 GiB makes every column reuse
    freed memory, as a long-running process with a warm heap (or jemalloc/tcmalloc)
    does. Outputs above 32 MiB are still mmap'ed, page faults included, for everyone.
    """
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        return None
    return "glibc M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=1 GiB" if ok else None


# ====================================================================== other processes


class CpuMeter:
    """CPU time used by *other* processes (and the hypervisor: steal) over an interval.

    On a shared machine a single busy neighbour is enough to stall every call that
    needs both cores: the second thread waits for the neighbour's time slice (whole
    4 ms scheduler ticks; libraries that split work statically suffer most). The load
    average reacts too slowly to tell, so each row measures it: busy CPU time from
    /proc/stat minus this process's own CPU time, per second of wall time. Linux only;
    elsewhere ``value()`` is None.
    """

    def __init__(self):
        self.start = self._snap()

    @staticmethod
    def _snap():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)        # idle + iowait
        busy = (sum(fields[:8]) - idle) / hz                              # to steal
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    def value(self):
        end = self._snap()
        if self.start is None or end is None or end[2] - self.start[2] < 0.05:
            return None
        busy = end[0] - self.start[0]
        own = end[1] - self.start[1]
        return max(0.0, (busy - own) / (end[2] - self.start[2]))


def wait_for_quiet(seconds, threshold=_DISTURBED, progress=None, label=""):
    """Wait up to ``seconds`` for a 1-second window with other processes below threshold."""
    deadline = time.perf_counter() + seconds
    while True:
        m = CpuMeter()
        time.sleep(1.0)
        v = m.value()
        if v is None or v < threshold or time.perf_counter() >= deadline:
            return v
        if progress:
            progress.step(label, f"waiting for a quiet machine (others use {v:.1f} CPU)")


# ====================================================================== measuring
def _time_sample(fn, number):
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number
    finally:
        if gc_was:
            gc.enable()


def measure_case(case, impls, tier="default", check=True, progress=None, budget=None):
    """Prepare, check and time every implementation on one case; returns a record.

    A 16-bit case also times its float32 twin (the same values widened) on every normkit
    backend in the same rounds: ``results["<backend>@float32"]``."""
    seconds, min_rounds, target = TIERS[tier]
    if budget is not None:
        seconds = budget
    units = D.make_data(case)
    nbytes = D.case_bytes(case, units)
    rec = {"case": case.name, "norm": case.norm, "layout": case.layout, "dtype": case.dtype,
           "tier": case.tier, "category": case.category, "data": case.data,
           "shapes": [list(s) for s in case.units], "bytes": nbytes, "results": {}}
    ref = None
    if check:
        if progress:
            progress.step(case.name, "float64 truth")
        ref = D.truth(case, units)
    columns = [(impl, units) for impl in impls]
    if case.dtype in C.HALF_DTYPES:
        wide = D.widen_units(units, np.float32)
        columns += [(_twin(impl), wide) for impl in impls if impl.kind == "backend"]
    ready = _prepare_all(case, columns, rec["results"], ref, target, progress)
    ref = None
    gc.collect()          # the reference is gone: the allocator starts clean for timing
    meter = CpuMeter()
    samples = _time_rounds(case, ready, rec["results"], seconds, min_rounds, progress)
    rec["others_cpu"] = meter.value()
    for impl, _fn, _t, number in ready:
        s = samples[impl.id]
        med = statistics.median(s)
        rec["results"][impl.id].update({
            "median_s": med, "min_s": min(s), "rounds": len(s), "calls_per_sample": number,
            "gbps": nbytes / med / 1e9 if med > 0 else math.inf})
    return rec


def _twin(impl):
    """The same backend on the float32 twin of a 16-bit case (its GB/s count 16-bit bytes:
    compare times, not GB/s)."""
    return Impl(f"{impl.id}@float32", "twin", f"{impl.label}@float32", impl.prepare)


def _prepare_all(case, columns, res, ref, target, progress):
    """Warm up and check every column against the float64 truth ``ref`` (None: no
    check); ``[impl, fn, per-call estimate, calls per sample]`` for those that run, in
    column order (failures, n/a and unsupported dtypes are recorded in ``res``)."""
    tol = case.tol()
    ready = []
    for impl, units in columns:
        if progress:
            progress.step(case.name, impl.label)
        r = res[impl.id] = {"status": "ok"}
        try:
            fn, fetch = impl.prepare(case, units)
            out = D.run_for_check(fn)                  # warm-up (JIT, page faults) + result
            if ref is not None and fetch is not None:
                r["max_rel_error"] = err = D.max_rel_error(fetch(out), ref)
                r["correct"] = bool(err <= tol)
            out = None
            t = _time_sample(fn, 1)
            if t < target:
                t = min(t, _time_sample(fn, 1))
        except NotApplicable as exc:
            res[impl.id] = {"status": "n/a", "note": str(exc)}
            continue
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing column must not stop the run
            why = unsupported_dtype(impl, case, exc)
            res[impl.id] = ({"status": "unsupported", "note": why} if why
                            else _failure(impl, exc))
            continue
        ready.append([impl, fn, t, max(1, int(target / max(t, 1e-9)))])
    return ready


def _time_rounds(case, ready, res, seconds, min_rounds, progress):
    """Rounds in which every ready column takes one sample, the order rotating."""
    samples = {e[0].id: [] for e in ready}
    t_start = time.perf_counter()
    rounds = 0
    while ready:
        if progress:
            progress.step(case.name, f"round {rounds + 1}")
        k = rounds % len(ready)
        for entry in ready[k:] + ready[:k]:
            impl, fn, t, number = entry
            try:
                if t < _PRECALL_BELOW:
                    fn()
                samples[impl.id].append(_time_sample(fn, number))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001
                res[impl.id] = _failure(impl, exc)
                ready.remove(entry)
                del samples[impl.id]
        rounds += 1
        elapsed = time.perf_counter() - t_start
        if rounds >= _MAX_ROUNDS or (rounds >= min_rounds and elapsed >= seconds) \
                or (rounds >= 3 and elapsed >= 3 * seconds):
            break
    return samples


def _failure(impl, exc):
    if impl.id == "torch" and "not implemented for" in str(exc):
        return {"status": "n/a", "note": f"torch: {short(exc)}"}
    return {"status": "error", "note": f"{type(exc).__name__}: {short(exc)}"}


# ====================================================================== CLI
def add_arguments(p: argparse.ArgumentParser):
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--quick", action="store_const", dest="tier", const="quick",
                     help="a few representative cases, short timing (~15 s)")
    sel.add_argument("--full", action="store_const", dest="tier", const="full",
                     help="every case, longer timing (several minutes)")
    p.add_argument("--cases", metavar="PATTERNS",
                   help="comma-separated glob patterns over case names, or a category "
                        "(batchnorm, rows, groupnorm, training, tiny, model), op "
                        "(bn_eval, bn_eval_add_relu, ln, rms, gn, in, ...), dtype "
                        "(float16, bfloat16, float64; 16bit: both 16-bit dtypes) or tier; "
                        "selects from the whole table (--quick/--full then only set the "
                        "timing)")
    p.add_argument("--backends", metavar="NAMES",
                   help="comma-separated normkit backends (default: every available one)")
    p.add_argument("--peers", metavar="NAMES", default="torch,onnxruntime",
                   help="comma-separated peers among torch, onnxruntime, plain-numpy (a "
                        "vectorized NumPy version outside normkit, not the numpy backend); "
                        "'all' or 'none' (default: torch,onnxruntime, those that are "
                        "installed)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for normkit, torch and ONNX Runtime alike "
                        "(default: normkit.get_num_threads())")
    p.add_argument("--json", metavar="PATH", help="also write every measurement to PATH")
    p.add_argument("--markdown", action="store_true",
                   help="print the table as Markdown (for RESULTS.md)")
    p.add_argument("--min-time", type=float, metavar="SECONDS",
                   help="timing budget per case (default: 0.25 quick, 0.6, 2.0 full)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the correctness check against the float64 truth")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.add_argument("--retry", type=int, default=1, metavar="N",
                   help="measure rows disturbed by other processes again, up to N times, "
                        "after waiting (up to 30 s) for a quiet second (default 1; 0: never)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's adaptive malloc settings alone (by default the run "
                        "keeps freed memory in the process so that no column pays page "
                        "faults for re-allocating its output)")
    p.add_argument("--dask", action="store_true",
                   help="the Dask family instead: normkit on Dask arrays against the "
                        "hand-written dask.array expression (normkit/_bench_dask.py)")
    p.add_argument("--dask-ooc", action="store_true",
                   help="with --dask: also the out-of-core case (Zarr on disk, LocalCluster)")
    p.set_defaults(tier="default")


def _split(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def run(args) -> int:
    """The ``bench`` subcommand; exit status 0, 2 (bad options) or 130 (Ctrl-C)."""
    try:
        if args.dask:
            from . import _bench_dask
            return _bench_dask.run(args)
        return _run(args)
    except KeyboardInterrupt:
        print("\nnormkit bench: interrupted before any case was measured", file=sys.stderr)
        return 130
    except BrokenPipeError:          # e.g. `normkit bench --list | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
        return 0


def _run(args) -> int:
    cases = C.select_cases(args.tier or "default", _split(args.cases))
    if not cases:
        print(f"normkit bench: no case matches {args.cases!r}; see "
              "`python -m normkit bench --list --full`", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            units = f"{len(c.units)} layers" if len(c.units) > 1 else "x".join(
                map(str, c.units[0]))
            print(f"{c.name:40s} {c.tier:8s} {c.category:10s} {c.dtype:8s} {units}")
        return 0
    peers, problem = _peers(args.peers)
    if problem is None and args.threads is not None and args.threads < 1:
        problem = "--threads must be a positive integer"
    if problem:
        print(f"normkit bench: {problem}", file=sys.stderr)
        return 2
    progress = Progress(len(cases), enabled=not args.no_progress)
    impls, notes, meta = _setup(args, peers, progress)
    records: list[dict] = []
    interrupted = False
    t0 = time.perf_counter()
    try:
        _measure_all(cases, impls, records, args, progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["interrupted"] = interrupted
    meta["load_avg_1min_end"] = _load_average()
    _print_results(records, impls, notes, meta, args.markdown)
    if interrupted:
        print(f"\ninterrupted: {len(records)} of {len(cases)} cases measured "
              f"({meta['seconds']} s{_end_load(meta)})")
    else:
        print(f"\n{len(records)} cases in {meta['seconds']} s{_end_load(meta)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_finite({"meta": meta, "notes": notes, "records": records}), f,
                      indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 130 if interrupted else 0


def _peers(text):
    """``--peers`` as a list of peer names, or (None, the problem)."""
    peers = _split(text)
    if peers == ["all"]:
        return list(PEERS), None
    if peers == ["none"]:
        return [], None
    peers = [PEER_ALIASES.get(p, p) for p in peers]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        return None, (f"unknown peer(s) {bad}; choose among {list(PEERS)}, 'all' or "
                      "'none' (normkit's own backends are chosen with --backends)")
    return peers, None


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _end_load(meta):
    end = meta["load_avg_1min_end"]
    return f", load average at the end {end}" if end is not None else ""


def _setup(args, peers, progress):
    """Threads, columns, machine description and notes; tells stderr what will run."""
    import normkit
    if args.threads is not None:
        normkit.set_num_threads(args.threads)
    threads = normkit.get_num_threads()
    progress.message(f"normkit bench: loading backends and peers ({threads} threads) ...")
    impls, notes = discover(_split(args.backends) or None, peers, threads)
    meta = machine_info(impls, threads)
    meta["malloc"] = None if args.default_malloc else tune_malloc()
    meta["command"] = "python -m normkit bench " + " ".join(getattr(args, "argv", []) or [])
    meta["tier"] = args.tier or "default"
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if meta["load_avg_1min"] is not None and meta["load_avg_1min"] > 0.75 * (ncpu or 1):
        notes.append(f"the machine was busy when the run started (1-min load average "
                     f"{meta['load_avg_1min']} on {ncpu} CPUs): multi-threaded calls wait for "
                     "descheduled threads, so absolute times are inflated and ratios noisy")
    for n in notes:
        progress.message("note: " + n)
    progress.message(f"normkit bench: {progress.total} cases x {len(impls)} "
                     f"columns ({', '.join(i.label for i in impls)}); Ctrl-C stops with the "
                     "partial table")
    return impls, notes, meta


def _measure_all(cases, impls, records, args, progress):
    """Measure every case into ``records`` (appending, so Ctrl-C keeps what was done)."""
    tier = args.tier or "default"

    def measure(case):
        return measure_case(case, impls, tier, check=not args.no_check, progress=progress,
                            budget=args.min_time)

    for case in cases:
        tc = time.perf_counter()
        progress.step(case.name, "data")
        rec = measure(case)
        records.append(rec)
        bad = [i.label for i in impls
               if rec["results"].get(i.id, {}).get("status") == "error"
               or rec["results"].get(i.id, {}).get("correct") is False]
        progress.finish_case(case.name, time.perf_counter() - tc,
                             f"  (problems: {', '.join(bad)})" if bad else "")
    # rows measured while other processes were busy: measure them again when the
    # machine is quiet (each row's columns always come from one measurement)
    for attempt in range(args.retry):
        disturbed = [i for i, r in enumerate(records) if _disturbed(r)]
        if not disturbed:
            break
        progress.message(f"normkit bench: measuring {len(disturbed)} disturbed row(s) "
                         f"again (attempt {attempt + 1} of {args.retry})")
        progress.total += len(disturbed)
        for i in disturbed:
            case = C.CASE_BY_NAME[records[i]["case"]]
            tc = time.perf_counter()
            wait_for_quiet(30, progress=progress, label=case.name)
            rec = measure(case)
            if (rec.get("others_cpu") or 0) < (records[i].get("others_cpu") or 0):
                records[i] = rec
            progress.finish_case(case.name, time.perf_counter() - tc, " (again)")


def _print_results(records, impls, notes, meta, markdown):
    header, rows = table_rows(records, impls)
    explained = legend(meta, header)
    half = half_rows(records, impls)
    fmt = format_markdown if markdown else format_text
    print(f"_{header_line(meta)}_\n" if markdown else header_line(meta) + "\n")
    print(fmt(header, rows))
    print()
    if markdown:
        print("\n".join(explained))
        print()
        for line in notes + summary_lines(records, impls):
            print(f"- {line}")
    else:
        print("\n".join(explained + notes + summary_lines(records, impls)))
    if half:
        print()
        print(fmt(HALF_HEADER, half))
        print()
        print(HALF_LEGEND)


def _finite(obj):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="normkit bench", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)
