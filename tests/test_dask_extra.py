"""Dask, continued: the batch statistics report by blocks, ``out=`` for Dask input, and
the compiled kernels releasing the GIL (what lets the threaded scheduler run them in
parallel).

Tolerance of the report comparison: the Dask path computes the same float64 moments
as the in-memory path, merged in another order (Chan's merge of per-block partials
against NumPy's pairwise sums); a sum of n terms reordered moves by at most
n * eps64 * (sum of |terms|), here (n <= 2**18 values, |mean| / std <= 4) a relative
1e-10 at most: the mean and variance are checked against that bound computed
(BX.bound_moments_from_stats). The report's other numbers are smooth functions of
those moments (ratios of variance components, square roots, a clip at 0) with
well-conditioned data here (no near-cancellation: rho well away from 0 and 1), so
rtol 1e-8 keeps a margin of 100; integers, flags and messages must be equal. 16-bit
data: the kernels' statistics are float32 partial sums merged in float64 (relative
moment bound 16 G, K.half_stat_roundoff), so the same margin of 100 gives rtol 1600 G.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed "
                         "(pip install 'normkit[dask]')")
import _bounds_extra as BX  # noqa: E402
import _cases as K  # noqa: E402
import dask
from dask.callbacks import Callback

import normkit as nk
import normkit.dask as nkd
from normkit.backends import resolve
from normkit.diagnostics import batch_stats_report

RNG = np.random.default_rng(2027)


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


def _data(shape, ax, dtype=np.float32):
    """Normal data with per-sample offsets (rho > 0) and per-channel scales."""
    ax %= len(shape)
    scale = np.ones(len(shape), int)
    scale[ax] = shape[ax]
    per_sample = np.ones(len(shape), int)
    per_sample[0] = shape[0]
    x = (RNG.standard_normal(shape) * RNG.uniform(0.5, 2.0, shape[ax]).reshape(scale)
         + RNG.standard_normal(shape[0]).reshape(per_sample) + 3.0)
    return x.astype(dtype)


def _assert_same_report(got, want, dtype=np.float64):
    # the statistics themselves: float64 moments of n values merged in two orders
    d_mean, d_var = BX.bound_moments_from_stats(want.mean, want.var, want.values_per_channel,
                                                dtype=dtype)
    rtol = 1e-8 + 1600 * K.half_stat_roundoff(dtype)     # module docstring
    K.assert_within(got.mean, want.mean, d_mean, "mean")
    K.assert_within(got.var, want.var, d_var, "var")
    for f in dataclasses.fields(want):
        g, w = getattr(got, f.name), getattr(want, f.name)
        if f.name in ("mean", "var"):
            continue
        if isinstance(w, np.ndarray) and w.dtype.kind == "f":
            assert g.shape == w.shape, f.name
            np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-300, equal_nan=True,
                                       err_msg=f.name)
        elif isinstance(w, np.ndarray):
            np.testing.assert_array_equal(g, w, err_msg=f.name)
        else:
            assert g == w, (f.name, g, w)


REPORT_CASES = {
    # name: (shape, chunks, axis, kind, num_groups)
    "batch NCHW uneven": ((8, 6, 20, 20), (3, 4, 7, 9), 1, "batch", None),
    "batch NHWC": ((8, 20, 20, 6), (3, 7, 9, 4), -1, "batch", None),
    "batch subsampled": ((16, 3, 64, 64), (5, 2, 24, 40), 1, "batch", None),
    "batch one sample": ((1, 6, 30), (1, 6, 7), 1, "batch", None),
    "batch chunk of one sample": ((5, 6, 30), (1, 6, 30), 1, "batch", None),
    "batch (N, C)": ((40, 6), (7, 4), 1, "batch", None),
    "batch channels on axis 0": ((6, 40, 3), (4, 7, 2), 0, "batch", None),
    "instance": ((8, 6, 20, 20), (3, 4, 7, 9), 1, "instance", None),
    "group NCHW": ((8, 6, 20, 20), (3, 4, 7, 9), 1, "group", 3),
    "group NLC": ((8, 20, 6), (3, 7, 4), -1, "group", 2),
}


@pytest.mark.parametrize("name", list(REPORT_CASES))
def test_report_equals_in_memory_report(name):
    shape, chunks, ax, kind, groups = REPORT_CASES[name]
    x = _data(shape, ax)
    want = batch_stats_report(x, axis=ax, kind=kind, num_groups=groups)
    got = nkd.batch_stats_report(da.from_array(x, chunks=chunks), axis=ax, kind=kind,
                                 num_groups=groups)
    _assert_same_report(got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, "bfloat16"])
def test_report_nan_in_one_chunk_and_dtypes(dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed").bfloat16
    x = _data((6, 4, 12, 12), 1, dtype)
    x[4, 2, 11, 3] = np.nan                              # only in the last chunk
    d = da.from_array(x, chunks=(3, 2, 6, 6))
    for kind in ("batch", "instance"):
        want = batch_stats_report(x, kind=kind)
        got = nkd.batch_stats_report(d, kind=kind)
        _assert_same_report(got, want, x.dtype)
        assert got.unstable and "non-finite" in got.reasons[0]


def test_report_bad_input_names_the_argument():
    d = da.zeros((4, 6, 3), chunks=2)
    with pytest.raises(TypeError, match="dtype int32"):
        nkd.batch_stats_report(da.zeros((4, 3), dtype=np.int32, chunks=2))
    with pytest.raises(ValueError, match="non-empty"):
        nkd.batch_stats_report(da.zeros((0, 3), chunks=2))
    with pytest.raises(ValueError, match="num_groups"):
        nkd.batch_stats_report(d, kind="group", num_groups=4)
    with pytest.raises(ValueError, match="axis"):
        nkd.batch_stats_report(d, kind="instance", axis=0)


class _LargestResult(Callback):
    """The most bytes any one task of a computation returned (arrays in dicts, tuples)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        self.largest = max(self.largest, _nbytes(result))


def _nbytes(obj):
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


@pytest.mark.parametrize("kind", ["batch", "group"])
def test_report_holds_a_few_chunks_not_x(kind):
    """The report of a 32 MiB float32 array (64 MiB as float64) in 512 KiB chunks: no
    task returns more than 2 MiB, 1/32 of x as float64 (the largest results: a chunk as
    float64, 1 MiB, and the kurtosis subsample, kurtosis_sample * 16 = 16384 float64
    values per channel, 1 MiB), so x is never gathered in one place; and the result is
    the in-memory report."""
    x = _data((64, 8, 128, 128), 1)
    d = da.from_array(x, chunks=(8, 8, 32, 128))
    groups = 4 if kind == "group" else None
    with _LargestResult() as seen:
        got = nkd.batch_stats_report(d, kind=kind, num_groups=groups)
    bound = 2 << 20
    assert bound * 32 == x.size * 8
    assert 0 < seen.largest <= bound, seen.largest
    _assert_same_report(got, batch_stats_report(x, kind=kind, num_groups=groups))


# ------------------------------------------------------------------ out=
def test_out_numpy_filled_by_compute():
    x = _data((7, 6, 5, 4), 1, np.float64)
    d = da.from_array(x, chunks=(3, 6, 2, 4))
    out = np.full_like(x, np.nan)
    got = nk.layer_norm(d, x.shape[1:], out=out)
    assert got is out
    # two float64 normalizations of the same values (blocks merged or not), each within
    # K.bound_normalized of the float64 formula: 2x that bound apart
    norm = lambda axes, **k: 2 * K.bound_normalized(x, axes, k.pop("eps", 1e-5), None,
                                                    None, np.float64, **k)
    K.assert_within(out, nk.layer_norm(x, x.shape[1:]), norm((1, 2, 3)), "layer_norm")
    out2 = np.empty_like(x)
    rm, rv = np.zeros(6), np.ones(6)
    rm_np, rv_np = rm.copy(), rv.copy()
    y, mean, rstd = nk.batch_norm(d, rm, rv, training=True, out=out2, return_stats=True)
    y_np, mean_np, rstd_np = nk.batch_norm(x, rm_np, rv_np, training=True,
                                           return_stats=True)
    assert y is out2 and isinstance(mean, np.ndarray) and isinstance(rstd, np.ndarray)
    # statistics per channel over (N, H, W): each side within K's bound of the exact
    # value; running buffers blend them with momentum 0.1 (the variance unbiased, n/(n-1))
    # plus a few roundings of the blend (4 u64)
    rows = np.moveaxis(x, 1, 0).reshape(6, -1)
    n = rows.shape[1]
    d_mean, d_rstd = 2 * K.bound_mean(rows, 1), 2 * K.bound_rstd(rows, 1, 1e-5)
    d_rm = 0.1 * d_mean + 4 * K.U64 * np.abs(rm_np)
    d_rv = 0.1 * 2 * K.bound_m2(rows, 1) / (n - 1) + 4 * K.U64 * np.abs(rv_np)
    for g, w, b, what in ((out2, y_np, norm((0, 2, 3)), "y"), (mean, mean_np, d_mean, "mean"),
                          (rstd, rstd_np, d_rstd, "rstd"), (rm, rm_np, d_rm, "running_mean"),
                          (rv, rv_np, d_rv, "running_var")):
        K.assert_within(g, w, b, what)
    y, mean, rstd = nk.rms_norm(d, 4, out=out, return_stats=True)
    assert y is out and mean is None
    K.assert_within(out, nk.rms_norm(x, 4), norm(3, rms=True, eps=np.finfo(np.float64).eps),
                    "rms_norm")


def test_out_zarr_written_block_by_block(tmp_path):
    zarr = pytest.importorskip("zarr", reason="zarr is not installed")
    x = _data((8, 4, 6, 6), 1)
    d = da.from_array(x, chunks=(2, 4, 6, 6))
    z = zarr.open(str(tmp_path / "y.zarr"), mode="w", shape=x.shape, chunks=(2, 4, 6, 6),
                  dtype=x.dtype)
    assert nk.group_norm(d, 2, out=z) is z
    # two float32 normalizations of the same values, each within K.bound_normalized of
    # the float64 formula (groups of 2 channels x 36 values)
    bound = 2 * K.bound_normalized(x.reshape(8, 2, 2, 36), (2, 3), 1e-5, None, None,
                                   np.float32)
    K.assert_within(z[...], nk.group_norm(x, 2), bound.reshape(x.shape), "group_norm")


def test_out_errors_say_what_to_do():
    d = da.zeros((4, 6, 3), chunks=2)
    with pytest.raises(TypeError, match="lazy Dask array"):
        nk.layer_norm(d, 3, out=da.zeros((4, 6, 3)))
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 6, 3\)"):
        nk.layer_norm(d, 3, out=np.empty((4, 6)))
    with pytest.raises(ValueError, match="out: expected dtype float64"):
        nk.instance_norm(d, out=np.empty((4, 6, 3), np.float32))
    ro = np.empty((4, 6, 3))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        nk.batch_norm(d, training=True, out=ro)
    with pytest.raises(TypeError, match="list"):
        nk.layer_norm(d, 3, out=[])


# ------------------------------------------------------------------ the GIL
def _compiled_backends():
    return [b for b in ("cython", "numba") if b in nk.available_backends()]


def _python_ran_during(call, repeats=4):
    """How often this thread ran Python in the middle half of ``call()`` running in
    another thread. A call that holds the GIL leaves this thread no bytecode at all
    between its start and end, so not one timestamp can fall in the middle half of it.
    Each call must last >= 20 ms (4 times CPython's 5 ms switch interval), so the
    margins absorb the hand-overs at its start and end."""
    calls, stamps = [], []

    def run():
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            calls.append((t0, time.perf_counter()))

    worker = threading.Thread(target=run)
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
    worker.join()
    times = np.array(stamps)
    inside = 0
    for t0, t1 in calls:
        assert t1 - t0 >= 0.02, f"a call took {1e3 * (t1 - t0):.1f} ms: too short to tell"
        q = (t1 - t0) / 4
        inside += int(((times > t0 + q) & (times < t1 - q)).sum())
    return inside


def test_gil_check_detects_a_call_that_holds_the_gil():
    """The control: list.sort runs in C holding the GIL; the check must see it."""
    values = RNG.standard_normal(1 << 20).tolist()
    assert _python_ran_during(lambda: sorted(values)) == 0


@pytest.mark.parametrize("backend", _compiled_backends())
def test_kernels_release_the_gil(backend):
    """While a long kernel call (128 MiB, one thread) runs in another thread, this
    thread keeps running Python (``_python_ran_during``): deterministic, not a timing
    ratio."""
    be = resolve(backend)
    x = RNG.standard_normal((4, 1 << 22))              # 128 MiB of float64, 4 planes
    with nk.use_backend(backend):
        old = nk.get_num_threads()
        nk.set_num_threads(1)
        try:
            be.plane_moments(x[:, :1024].copy())        # compile / warm up
            # one call must last >= 20 ms (see _python_ran_during) on any machine: a
            # fast one reads 128 MiB in ~10 ms, so repeat the planes until it is 60 ms
            t0 = time.perf_counter()
            be.plane_moments(x)
            reps = min(8, math.ceil(0.06 / max(time.perf_counter() - t0, 1e-3)))
            x = np.tile(x, (reps, 1)) if reps > 1 else x
            inside = _python_ran_during(lambda: be.plane_moments(x))
        finally:
            nk.set_num_threads(old)
    assert inside > 0, "no Python ran in this thread while the kernel ran: it holds the GIL"


@pytest.mark.slow
def test_report_on_a_cluster_past_its_memory_limit():
    """The report of an array 4x the memory limit of a 2-process LocalCluster (generated
    on the workers, never anywhere whole): no worker killed, each worker's peak RSS
    under its limit, and the report's statistics equal Dask's own float64 mean and
    variance of the same array (a different summation order: n * eps64 relative, n =
    3e7 values per channel, so rtol 1e-8)."""
    pytest.importorskip("distributed", reason="dask.distributed is not installed "
                        "(pip install 'normkit[dask]')")
    from normkit import _bench_dask as bench
    limit = round(bench.idle_worker_mib()) + 72      # idle RSS + room for a few chunks
    with bench.local_cluster(limit) as client:
        workers = sorted(client.scheduler_info()["workers"])
        channels, hw, chunk = 8, 64, 16
        n = int(4 * 2 * limit * 2 ** 20) // (channels * hw * hw * 4) + 1
        x = da.random.default_rng(11).standard_normal(
            (n, channels, hw, hw), dtype=np.float32, chunks=(chunk, channels, hw, hw))
        x = x * 2 + 5
        client.run(bench.reset_peak_rss)
        rep = nkd.batch_stats_report(x)
        peaks = client.run(bench.peak_rss_mib)
        assert sorted(client.scheduler_info()["workers"]) == workers   # none restarted
        assert max(peaks.values()) < 0.95 * limit, (peaks, limit)
        mean, var = dask.compute(x.mean(axis=(0, 2, 3), dtype=np.float64),
                                 x.var(axis=(0, 2, 3), dtype=np.float64))
    assert x.nbytes >= 4 * 2 * limit * 2 ** 20
    assert rep.values_per_channel == n * hw * hw and rep.num_samples == n
    # float64 moments of the same float32 values by two merge orders (Chan's merges of
    # per-block partials vs dask's tree of chunk moments): BX.bound_moments_from_stats
    d_mean, d_var = BX.bound_moments_from_stats(mean, var, rep.values_per_channel)
    K.assert_within(rep.mean, mean, d_mean, "mean")
    K.assert_within(rep.var, var, d_var, "var")
    assert not rep.unstable, rep.reasons



def test_public_report_takes_dask_by_blocks():
    """``normkit.diagnostics.batch_stats_report`` sends a Dask array to the block path."""
    x = _data((8, 6, 20, 20), 1)
    d = da.from_array(x, chunks=(3, 4, 7, 9))
    with _LargestResult() as seen:
        got = batch_stats_report(d, kind="group", num_groups=3)
    assert 0 < seen.largest < x.nbytes                 # computed by blocks, not whole
    _assert_same_report(got, batch_stats_report(x, kind="group", num_groups=3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_dask_input_equals_in_memory(dtype):
    """16-bit Dask blocks reach the kernels in their own dtype (no float32 copy): the
    lazy result is the in-memory result bit for bit, for a reduction over chunks
    (training batch norm) and a per-sample norm."""
    import ml_dtypes
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    x = RNG.standard_normal((8, 4, 5, 5)).astype(dt)
    d = da.from_array(x, chunks=(3, 4, 5, 5))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y = nk.batch_norm(d, rm.copy(), rv.copy(), training=True).compute()
    assert y.dtype == x.dtype
    z = nk.batch_norm(x, rm.copy(), rv.copy(), training=True).astype(np.float64)
    # the statistics merge chunk partials in another order (float64, ~1e-16 relative):
    # at most a rounding boundary apart, so one 16-bit ulp of the output
    ulp = float(ml_dtypes.finfo(dt).eps) * np.maximum(1.0, np.abs(z))
    assert np.all(np.abs(y.astype(np.float64) - z) <= ulp)
    # a per-sample norm runs the same kernel on the same rows: the same bits
    ln = nk.layer_norm(d, (5, 5)).compute()
    np.testing.assert_array_equal(ln.view(np.uint16), nk.layer_norm(x, (5, 5)).view(np.uint16))
