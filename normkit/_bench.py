"""Time every normkit backend against a memory copy and the peers (python -m normkit bench).

For each case of the table in :mod:`normkit._bench_cases` it prepares every
implementation on the same arrays -- each available normkit backend, an ``np.copyto``
of the same number of bytes (the memory-bound floor), and the peers that are installed
(PyTorch CPU, ONNX Runtime, and on request a plain vectorized NumPy version) -- checks
each result against the normkit ``numpy`` backend, then times them.

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

PyTorch and ONNX Runtime are imported here, lazily, and only when installed; ``import
normkit`` never imports them or this module. No third-party progress bar either: a
small one is drawn on stderr (plain lines when stderr is not a terminal).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import numpy as np

from . import _bench_cases as C
from ._bench_report import (
    _DISTURBED,
    PLAIN_NUMPY,
    Progress,
    _disturbed,
    format_markdown,
    format_text,
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
               "each result against normkit's numpy backend.")

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


# ====================================================================== implementations
class Impl:
    """One column: ``prepare(case, units)`` returns ``(fn, fetch)`` or raises NotApplicable."""

    def __init__(self, id, kind, label, prepare, version=""):
        self.id, self.kind, self.label, self.prepare, self.version = (
            id, kind, label, prepare, version)


def _backend_impl(name):
    def prepare(case, units):
        return C.normkit_runner(case, units, name), C.to_arrays
    return Impl(name, "backend", name, prepare)


def _copy_impl():
    def prepare(case, units):
        return C.copy_runner(case, units), None
    return Impl("copy", "floor", "copy", prepare)


def _plain_impl():
    def prepare(case, units):
        return C.plain_runner(case, units), C.to_arrays
    return Impl(PLAIN_NUMPY, "peer", PLAIN_NUMPY, prepare, np.__version__)


def _torch_impl(threads):
    import torch
    torch.set_num_threads(threads)

    def prepare(case, units):
        try:
            return C.torch_runner(case, units, torch)
        except (RuntimeError, TypeError, KeyError) as exc:
            raise C.NotApplicable(f"torch cannot run it: {_short(exc)}") from exc
    return Impl("torch", "peer", "torch", prepare, torch.__version__)


def _onnx_model(case, units):
    """One ONNX graph holding every unit of the case; returns (model, feed, output names)."""
    from onnx import helper, numpy_helper
    nodes = C.onnx_units(case, units)
    elem = helper.np_dtype_to_tensor_dtype(units[0]["x"].dtype)
    input_names, feed, value_infos, inits, gnodes, outputs = {}, {}, [], [], [], []
    for i, (node, u) in enumerate(zip(nodes, units, strict=True)):
        names = []
        for role, arr, is_input in node.inputs:
            if is_input:       # units that share an input array share the graph input
                if id(arr) not in input_names:
                    name = f"X{len(input_names)}"
                    input_names[id(arr)] = name
                    feed[name] = arr
                    value_infos.append(helper.make_tensor_value_info(name, elem, arr.shape))
                names.append(input_names[id(arr)])
            else:
                name = f"u{i}_{role}"
                inits.append(numpy_helper.from_array(arr, name))
                names.append(name)
        outs = [f"Y{i}"] + [f"u{i}_extra{j}" for j in range(1, node.n_outputs)]
        gnodes.append(helper.make_node(node.op_type, names, outs, domain=node.domain,
                                       **node.attrs))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", elem, u["x"].shape))
    opsets = [helper.make_opsetid("", max(n.opset for n in nodes))]
    graph = helper.make_graph(gnodes, case.name, value_infos, outputs, inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    return model, nodes[0], feed, [o.name for o in outputs]


def _ort_session(ort, model, first, dtype, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # ORT's workers keep spinning after run() returns (by default), on the cores the
    # next column needs: that made the normkit columns of the BERT case 2.3x slower.
    # Stop spinning at the end of each run; spinning within a run stays on, and ORT's
    # own times did not get worse (measured: 0.31-0.35 ms vs 0.41 ms on ln_8x128x768).
    so.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - e.g. no kernel for this op/dtype
        raise C.NotApplicable(f"ORT cannot load {first.op_type} "
                              f"(opset {first.opset}, {dtype}): {_short(exc)}") from exc


def _ort_impl(threads):
    import onnxruntime as ort

    def prepare(case, units):
        model, first, feed, out_names = _onnx_model(case, units)
        dtype = units[0]["x"].dtype
        sess = _ort_session(ort, model, first, dtype, threads)
        if len(units) == 1:
            return (lambda: sess.run(out_names, feed)), list
        # Real-model cases: one graph holding every layer, one session.run (how ORT runs a
        # model). Its outputs are bound to buffers allocated once (IOBinding), so that ORT,
        # like the eager columns that drop each output as the next layer runs, does not
        # hold 53 fresh outputs per run.
        binding = sess.io_binding()
        for name, arr in feed.items():
            binding.bind_cpu_input(name, arr)
        buffers = [np.empty(u["x"].shape, dtype) for u in units]
        for name, buf in zip(out_names, buffers, strict=True):
            binding.bind_output(name, "cpu", 0, dtype.type, buf.shape, buf.ctypes.data)

        def run_bound():
            sess.run_with_iobinding(binding)
            return buffers
        return run_bound, list

    return Impl("onnxruntime", "peer", "onnxruntime", prepare, ort.__version__)


def _short(exc, limit=160):
    msg = " ".join(str(exc).split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def discover(backends=None, peers=("torch", "onnxruntime"), threads=None):
    """The columns to measure, plus notes on what was asked for but is missing."""
    import normkit
    from normkit.backends import KNOWN_BACKENDS, backend_status

    notes = []
    status = backend_status()
    available = [b for b in KNOWN_BACKENDS if status[b] == "available"]
    if backends is None:
        chosen = available
    else:
        unknown = [b for b in backends if b not in KNOWN_BACKENDS]
        if unknown:
            raise SystemExit(f"normkit bench: unknown backend(s) {unknown}; known: "
                             f"{list(KNOWN_BACKENDS)}, available here: {available}")
        chosen = []
        for b in backends:
            if status[b] == "available":
                chosen.append(b)
            else:
                notes.append(f"backend {b!r} skipped: {status[b]}")
        if not chosen:
            raise SystemExit("normkit bench: none of the requested backends is available "
                             "here:\n  " + "\n  ".join(notes))
    threads = threads or normkit.get_num_threads()
    impls = [_backend_impl(b) for b in chosen] + [_copy_impl()]
    for p in peers:
        if p == PLAIN_NUMPY:
            impls.append(_plain_impl())
        elif p == "torch":
            if importlib.util.find_spec("torch") is None:
                notes.append("PyTorch is not installed: no torch column "
                             "(pip install torch --index-url https://download.pytorch.org/whl/cpu)")
                continue
            try:
                impls.append(_torch_impl(threads))
            except Exception as exc:  # noqa: BLE001 - a broken peer is a note, not a crash
                notes.append(f"PyTorch is installed but failed to import: {_short(exc)}")
        elif p == "onnxruntime":
            missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
            if missing:
                notes.append(f"{' and '.join(missing)} not installed: no onnxruntime column "
                             f"(pip install {' '.join(missing)})")
                continue
            try:
                impls.append(_ort_impl(threads))
            except Exception as exc:  # noqa: BLE001
                notes.append(f"ONNX Runtime is installed but failed to import: {_short(exc)}")
    return impls, notes


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
    """Prepare, check and time every implementation on one case; returns a record."""
    seconds, min_rounds, target = TIERS[tier]
    if budget is not None:
        seconds = budget
    units = C.make_data(case)
    nbytes = C.case_bytes(case, units)
    rec = {"case": case.name, "norm": case.norm, "layout": case.layout, "dtype": case.dtype,
           "tier": case.tier, "category": case.category,
           "shapes": [list(s) for s in case.units], "bytes": nbytes, "results": {}}
    ready = _prepare_all(case, units, impls, rec["results"], check, target, progress)
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


def _prepare_all(case, units, impls, res, check, target, progress):
    """Warm up and check every column; ``[impl, fn, per-call estimate, calls per sample]``
    for those that run, in the original column order (failures are recorded in ``res``)."""
    tol = case.tol()
    ref = None
    # the numpy backend is the oracle: measure it first and reuse its warm-up result
    order = sorted(impls, key=lambda i: not (i.kind == "backend" and i.id == "numpy"))
    if check and not any(i.kind == "backend" and i.id == "numpy" for i in impls):
        if progress:
            progress.step(case.name, "reference")
        ref = C.to_arrays(C.run_for_check(C.normkit_runner(case, units, "numpy")))
    ready = []
    for impl in order:
        if progress:
            progress.step(case.name, impl.label)
        r = res[impl.id] = {"status": "ok"}
        try:
            fn, fetch = impl.prepare(case, units)
            out = C.run_for_check(fn)                  # warm-up (JIT, page faults) + result
            if check and fetch is not None:
                got = fetch(out)
                if ref is None and impl.id == "numpy":
                    ref = got
                r["max_rel_error"] = err = C.max_rel_error(got, ref)
                r["correct"] = bool(err <= tol)
            out = got = None
            t = _time_sample(fn, 1)
            if t < target:
                t = min(t, _time_sample(fn, 1))
        except C.NotApplicable as exc:
            res[impl.id] = {"status": "n/a", "note": str(exc)}
            continue
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing column must not stop the run
            res[impl.id] = _failure(impl, exc)
            continue
        ready.append([impl, fn, t, max(1, int(target / max(t, 1e-9)))])
    ready.sort(key=lambda e: impls.index(e[0]))
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
        return {"status": "n/a", "note": f"torch: {_short(exc)}"}
    return {"status": "error", "note": f"{type(exc).__name__}: {_short(exc)}"}


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
                        "(bn_eval, ln, rms, gn, in, ...) or tier; selects from the whole "
                        "table (--quick/--full then only set the timing)")
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
                   help="skip the correctness check against the numpy backend")
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
            print(f"{c.name:36s} {c.tier:8s} {c.category:10s} {c.dtype:8s} {units}")
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
    if markdown:
        print(f"_{header_line(meta)}_\n")
        print(format_markdown(header, rows))
        print()
        print("\n".join(explained))
        print()
        for line in notes + summary_lines(records, impls):
            print(f"- {line}")
    else:
        print(header_line(meta))
        print()
        print(format_text(header, rows))
        print()
        print("\n".join(explained + notes + summary_lines(records, impls)))


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
