"""``python -m normkit bench --dask``: normkit on Dask arrays against what Dask users write.

Cases (``docs/dask.md`` has the numbers from this machine):

1. overhead: the same in-memory (N, 64, 32, 32) float32 array (16, 64, 256 MiB; 8 chunks
   along N) normalized by plain normkit (NumPy), by normkit through ``dask.array`` on
   the threaded scheduler -- ``compute()`` (blocks, then their concatenation into a new
   array) and ``out=`` (the kernels write every block into one NumPy array) -- and by
   the hand-written Dask expression; ratio = time / NumPy time (target <= 1.5x; plain
   normkit with ``out=`` too, the fair partner of Dask's ``out=``). Dask's
   floor on the same chunks: an identity ``map_blocks`` computed (scheduling, plus the
   final concatenation: one full copy), and a graph whose tasks return one byte each
   (scheduling only), next to one ``np.copy`` of x. Training BatchNorm runs two graphs
   (eager statistics, then the lazy output); the others one.
2. peers: training-BatchNorm-style standardization of the same Dask array by normkit,
   by the hand-written ``(x - x.mean(axes, keepdims=True)) / x.std(axes, keepdims=True)``
   and, on (N, C) data, by dask-ml's ``StandardScaler`` (if installed).
3. accuracy: float32 data with mean 1e4 and std 1: max |error| of each result against
   the float64 truth, in units of the output's std.
4. out of core (``--dask-ooc``): a Zarr array 4x the total memory limit of a 2-process
   ``LocalCluster``, recalibrated and normalized back to disk; peak RSS per worker.

Timings: medians of per-repeat ratios, implementations interleaved in each repeat.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import warnings

import numpy as np

import normkit as nk

__all__ = [
    "accuracy",
    "local_cluster",
    "out_of_core",
    "overhead_cases",
    "peak_rss_mib",
    "peer_cases",
    "reset_peak_rss",
    "run",
]


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _ratios(impls, repeats, partners=None):
    """Median time of each impl and median ratio to the first, interleaved; for the
    impls named in ``partners`` ({impl: other impl}), also the median ratio to that one."""
    for fn in impls.values():           # warm-up: compile, load backends, build caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(repeats):
        for k, fn in impls.items():
            times[k].append(_time(fn))

    def ratio(k, base):
        return statistics.median(a / b for a, b in zip(times[k], times[base], strict=True))

    first = next(iter(impls))
    partners = partners or {}
    return {k: (statistics.median(v), ratio(k, first))
            + ((ratio(k, partners[k]),) if k in partners else ())
            for k, v in times.items()}


OVERHEAD_SIZES_MIB = (16, 64, 256)
OVERHEAD_CHUNKS = 8          # along the batch axis: 4 tasks per thread of a 2-core machine


def _expressions(d, rm, rv, eps=1e-5):
    """What a Dask user writes for each norm (centered variance, float32 throughout)."""
    def standardize(a, axes):
        return (a - a.mean(axes, keepdims=True)) / (a.var(axes, keepdims=True) + eps) ** 0.5

    n, c, h, w = d.shape
    return {
        "batch_norm (training)": lambda: standardize(d, (0, 2, 3)),
        "batch_norm (eval)": lambda: ((d - rm[:, None, None])
                                      / np.sqrt(rv + eps)[:, None, None]).astype(d.dtype),
        "layer_norm (C,H,W)": lambda: standardize(d, (1, 2, 3)),
        "group_norm (8 groups)": lambda: standardize(d.reshape(n, 8, c // 8, h, w),
                                                     (2, 3, 4)).reshape(d.shape),
    }


def _floor_impls(x, d):
    """Dask's own cost on the same chunks, next to one NumPy pass over x."""
    import dask.array as da
    ones = tuple((1,) * len(c) for c in d.chunks)
    return {
        "np.copy(x) (one pass)": lambda: np.copy(x),
        "identity map_blocks": lambda: d.map_blocks(lambda b: b).compute(),
        "scheduling only": lambda: da.map_blocks(lambda b: np.zeros((1,) * b.ndim, bool), d,
                                                 chunks=ones, dtype=bool).compute(),
    }


def _one_thread(fn):
    """fn with normkit's kernels on one thread (docs/dask.md: with Dask's threads)."""
    before = nk.get_num_threads()
    nk.set_num_threads(1)
    try:
        return fn()
    finally:
        nk.set_num_threads(before)


def _one_size(mib, repeats, chunks=OVERHEAD_CHUNKS):
    import dask.array as da
    n = max(chunks, mib * 2 ** 20 // (64 * 32 * 32 * 4))
    x = np.random.default_rng(0).normal(2.0, 3.0, (n, 64, 32, 32)).astype(np.float32)
    d = da.from_array(x, chunks=(n // chunks, 64, 32, 32))
    out = np.empty_like(x)
    rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)
    calls = {
        "batch_norm (training)": lambda a, **k: nk.batch_norm(a, None, None, None, None,
                                                              True, **k),
        "batch_norm (eval)": lambda a, **k: nk.batch_norm(a, rm, rv, **k),
        "layer_norm (C,H,W)": lambda a, **k: nk.layer_norm(a, a.shape[1:], **k),
        "group_norm (8 groups)": lambda a, **k: nk.group_norm(a, 8, **k),
    }
    rows = {}
    for (name, call), expr in zip(calls.items(), _expressions(d, rm, rv).values(),
                                  strict=True):
        rows[name] = _ratios({"numpy": lambda c=call: c(x),
                              "numpy out=": lambda c=call: c(x, out=out),
                              "dask compute()": lambda c=call: c(d).compute(),
                              "dask compute(), 1 thr": lambda c=call: _one_thread(
                                  lambda: c(d).compute()),
                              "dask out=": lambda c=call: c(d, out=out),
                              "dask expression": lambda e=expr: e().compute()}, repeats,
                             {"dask out=": "numpy out="})
    return {"shape": x.shape, "chunks": d.chunks, "calls": rows,
            "floor": _ratios(_floor_impls(x, d), repeats)}


def overhead_cases(sizes_mib=OVERHEAD_SIZES_MIB, repeats=3):
    """normkit on NumPy against normkit on Dask (``compute()``, which concatenates the
    blocks into a new array, and ``out=``, which writes them into one) and the Dask
    expression, per size; plus Dask's floor on the same chunks. Threaded scheduler."""
    import dask
    with dask.config.set(scheduler="threads"):
        return {mib: _one_size(mib, repeats) for mib in sizes_mib}


def peer_cases(repeats=9):
    import dask
    import dask.array as da
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (64, 64, 32, 32)).astype(np.float32)
    d = da.from_array(x, chunks=(8, 64, 32, 32))
    ax = (0, 2, 3)
    impls = {
        "normkit batch_norm": lambda: nk.batch_norm(d, None, None, None, None, True,
                                                    eps=0.0).compute(),
        "dask expression": lambda: ((d - d.mean(ax, keepdims=True))
                                    / d.std(ax, keepdims=True)).compute(),
    }
    x2 = rng.normal(2.0, 3.0, (1 << 20, 16)).astype(np.float32)
    d2 = da.from_array(x2, chunks=(1 << 17, 16))
    impls2 = {
        "normkit batch_norm": lambda: nk.batch_norm(d2, None, None, None, None, True,
                                                    eps=0.0).compute(),
        "dask expression": lambda: ((d2 - d2.mean(0, keepdims=True))
                                    / d2.std(0, keepdims=True)).compute(),
    }
    scaler = _dask_ml_scaler()
    if scaler is not None:
        impls2["dask-ml StandardScaler"] = lambda: scaler().fit_transform(d2).compute()
    with dask.config.set(scheduler="threads"):
        return {"(64, 64, 32, 32) float32, 8 chunks": _ratios(impls, repeats),
                "(1048576, 16) float32, 8 chunks": _ratios(impls2, repeats)}


def _dask_ml_scaler():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from dask_ml.preprocessing import StandardScaler
    except Exception:  # noqa: BLE001 - any import failure: the peer is absent
        return None
    return StandardScaler


def accuracy():
    """Max |y - truth| / std(truth) on float32 data with mean 1e4 and std 1."""
    import dask
    import dask.array as da
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(0.0, 1.0, (1 << 18, 16))).astype(np.float32)
    x64 = x.astype(np.float64)
    truth = (x64 - x64.mean(0)) / x64.std(0)
    d = da.from_array(x, chunks=(1 << 15, 16))
    res = {"normkit batch_norm": nk.batch_norm(d, None, None, None, None, True, eps=0.0),
           "dask expression": (d - d.mean(0, keepdims=True)) / d.std(0, keepdims=True)}
    scaler = _dask_ml_scaler()
    if scaler is not None:
        res["dask-ml StandardScaler"] = scaler().fit_transform(d)
    with dask.config.set(scheduler="threads"):
        return {k: float(np.abs(np.asarray(v.compute(), np.float64) - truth).max())
                for k, v in res.items()}


# ---------------------------------------------------------------- out of core
def peak_rss_mib():
    """This process's peak RSS since the last reset (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def local_cluster(memory_mib, n_workers=2):
    """A LocalCluster of single-threaded worker processes that never spill to disk nor
    pause (a memory bound must come from streaming, not from spilling; a paused worker
    whose RSS is mostly its idle footprint would wait forever). The nanny still kills a
    worker at 95% of ``memory_mib`` (None: no limit)."""
    import dask
    import distributed
    config = {"distributed.worker.memory.target": False,
              "distributed.worker.memory.spill": False,
              "distributed.worker.memory.pause": False}
    with dask.config.set(config), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with distributed.LocalCluster(n_workers=n_workers, processes=True,
                                      threads_per_worker=1,
                                      memory_limit=0 if memory_mib is None else f"{memory_mib}MiB",
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            yield client


def idle_worker_mib():
    """RSS of an idle worker process that has run a normkit task (imports, kernels)."""
    import dask.array as da
    with local_cluster(None, n_workers=1) as client:
        nk.batch_norm(da.ones((8, 4, 16), chunks=4), None, None, None, None, True).compute()
        return max(client.run(peak_rss_mib).values())


def out_of_core(client, directory, factor=4.0, channels=16, hw=64, chunk=16, seed=7):
    """Write a Zarr dataset ``factor`` x the workers' total memory limit, then
    recalibrate a BatchNorm on it and normalize it back to disk (eval mode).

    Returns a dict: the layer, the arrays, sizes, seconds and per-worker peak RSS (MiB)
    of the normkit part (recalibrate + normalize), and the idle RSS before it.
    """
    import dask.array as da
    info = client.scheduler_info()["workers"].values()
    total = sum(w["memory_limit"] for w in info)
    sample = channels * hw * hw * 4
    n = int(factor * total) // sample + 1
    x = da.random.default_rng(seed).random((n, channels, hw, hw), dtype=np.float32,
                                           chunks=(chunk, channels, hw, hw)) * 4 + 1e3
    xpath, ypath = os.path.join(directory, "x.zarr"), os.path.join(directory, "y.zarr")
    x.to_zarr(xpath, compressors=None, overwrite=True)
    xz = da.from_zarr(xpath)
    client.run(reset_peak_rss)
    idle = client.run(peak_rss_mib)
    t0 = time.perf_counter()
    bn = nk.BatchNorm(channels)
    counts = nk.recalibrate(bn, xz)
    t1 = time.perf_counter()
    bn.eval()
    da.to_zarr(bn(xz), ypath, compressors=None, overwrite=True)
    t2 = time.perf_counter()
    return {"layer": bn, "x": xz, "y": da.from_zarr(ypath), "counts": counts, "n": n,
            "dataset_mib": xz.nbytes / 2 ** 20, "limit_mib": total / 2 ** 20 / len(info),
            "chunk_mib": chunk * sample / 2 ** 20, "recalibrate_s": t1 - t0,
            "normalize_s": t2 - t1, "idle_mib": idle, "peak_mib": client.run(peak_rss_mib)}


# ---------------------------------------------------------------- report
def _print_ratios(title, rows, out):
    out.write(f"\n{title}\n")
    for case, res in rows.items():
        out.write(f"  {case}\n")
        for impl, (t, ratio, *partner) in res.items():
            also = f"   (x{partner[0]:5.2f} of numpy out=)" if partner else ""
            out.write(f"    {impl:26s} {t * 1e3:9.2f} ms   x{ratio:5.2f}{also}\n")


def run(args=None, out=sys.stdout) -> int:
    """Entry point of ``python -m normkit bench --dask`` (``--dask-ooc`` adds case 4)."""
    try:
        import dask
    except ImportError:
        out.write("bench --dask needs Dask: pip install 'normkit[dask]'\n")
        return 1
    out.write(f"normkit {nk.__version__} on Dask {dask.__version__}; backend "
              f"{nk.backends.resolve().NAME}, {nk.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    for mib, res in overhead_cases().items():
        _print_ratios(f"1. overhead, threaded scheduler, {res['shape']} float32 ({mib} MiB) "
                      f"in {len(res['chunks'][0])} chunks of {res['chunks'][0][0]} samples "
                      "(ratio to plain normkit on the NumPy array)", res["calls"], out)
        _print_ratios(f"   Dask's floor on the same chunks ({mib} MiB; ratio to np.copy)",
                      {"floor": res["floor"]}, out)
    _print_ratios("2. against the hand-written Dask expression and dask-ml "
                  f"(ratio to normkit){'' if _dask_ml_scaler() else ' [dask-ml absent]'}",
                  peer_cases(), out)
    out.write("\n3. accuracy, float32 mean 1e4 std 1, (262144, 16): max |y - truth| / std\n")
    for impl, err in accuracy().items():
        out.write(f"    {impl:26s} {err:.3g}\n")
    if getattr(args, "dask_ooc", False):
        import tempfile
        mib = round(idle_worker_mib()) + 72      # room for a few 4 MiB chunks
        with tempfile.TemporaryDirectory() as tmp, local_cluster(mib) as client:
            for factor in (2.0, 4.0):
                r = out_of_core(client, tmp, factor=factor)
                out.write(f"\n4. out of core: {r['dataset_mib']:.0f} MiB Zarr, 2 workers x "
                          f"{r['limit_mib']:.0f} MiB, {r['chunk_mib']:.0f} MiB chunks: "
                          f"recalibrate {r['recalibrate_s']:.1f} s, normalize to disk "
                          f"{r['normalize_s']:.1f} s; RSS idle "
                          f"{sorted(round(v) for v in r['idle_mib'].values())} MiB, peak "
                          f"{sorted(round(v) for v in r['peak_mib'].values())} MiB\n")
    return 0


if __name__ == "__main__":
    sys.exit(run(type("A", (), {"dask_ooc": "--ooc" in sys.argv})()))
