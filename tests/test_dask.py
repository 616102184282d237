"""normkit on Dask arrays: equal to in-memory normkit, lazily, locally and on a cluster.

Tolerances (all relative to the data's scale, derived next to ``_tol``):
float64 data: the Dask path differs from the in-memory one only in the order in which
exact partial moments are merged (training BatchNorm) or summed (weight gradients), so
results agree to a small multiple of float64 eps; float32 data: both paths round the
same float64 statistics and coefficients to float32, so they agree to a few float32
ulps of the output's magnitude.
"""
from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed "
                         "(pip install 'normkit[dask]')")
import _bounds_extra as BX  # noqa: E402
import _cases as K  # noqa: E402
import dask  # noqa: E402

import normkit as nk  # noqa: E402

RNG = np.random.default_rng(1234)
SHAPE = (7, 6, 5, 4)        # (N, C, H, W); channels-last tests move C to the end


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


def _tol(dtype, y, kappa=0.0, n=SHAPE[0] * SHAPE[2] * SHAPE[3]):
    """Absolute tolerance for comparing the Dask result with the in-memory one.

    float64: the two paths merge the same exact per-block moments in a different order;
    a sum of n terms reordered changes by at most ~n * eps * (sum of |terms|), i.e. the
    mean by n * eps * (|mean| + std) and the output by that times rstd: with
    kappa = |mean| / std, |dy| <= n * eps64 * (1 + kappa) * (1 + |y|).
    float32: each path rounds (x - shift) * scale + offset to float32 (3 roundings of
    numbers <= max|y| + |offset|), and a shift that rounds to the other float32 neighbour
    is corrected in float64 but moves the rounding by <= eps32 * kappa: |dy| <=
    2 * 3 * eps32 * (1 + max|y| + kappa), doubled for the gradient paths.
    """
    ymax = float(np.nanmax(np.abs(np.asarray(y, np.float64)))) if np.size(y) else 0.0
    if np.dtype(dtype) == np.float64:
        return n * np.finfo(np.float64).eps * (1 + kappa) * (1 + ymax)
    return 12 * np.finfo(np.float32).eps * (1 + ymax + kappa)


def _stats_tol(x, axis, momentum=0.1):
    """``atol`` for running statistics updated by the Dask path and the in-memory one:
    both blend float64 batch statistics of the same values (merged in another order)
    with weight ``momentum``; the batch mean within K.bound_mean of the per-channel
    values, the unbiased variance within BX.bound_merged_var * n / (n - 1) (an upper
    bound for per-sample statistics too: they reduce fewer values), plus 4 u64 of the
    blended value. NaN channels propagate NaN on both sides (equal_nan)."""
    c = x.shape[axis]
    rows = np.moveaxis(np.asarray(x, np.float64), axis, 0).reshape(c, -1)
    n = rows.shape[1]
    with np.errstate(invalid="ignore"):
        stat = np.maximum(K.bound_mean(rows, 1), BX.bound_merged_var(rows, 1) * n / (n - 1))
        size = np.maximum(np.abs(rows.mean(axis=1)), rows.var(axis=1)) + 2
    return float(np.nanmax(momentum * stat + 4 * K.U64 * size, initial=0.0))


def _float32_state_tol(x, axis, momentum=1.0):
    """``assert_allclose`` kwargs for float32 running buffers: the float64 statistics
    agree within _stats_tol, then each is rounded to float32 (<= 1 ulp apart: 2 u32)."""
    return dict(rtol=2 * 2.0 ** -24, atol=_stats_tol(x, axis, momentum))


def _close(got, want, dtype, kappa=0.0, n=None):
    if want is None:
        assert got is None
        return
    assert isinstance(got, da.Array), type(got)
    got = got.compute()
    want = np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    tol = _tol(dtype, want, kappa) if n is None else _tol(dtype, want, kappa, n)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol, equal_nan=True)


def _data(dtype, axis, mean=3.0, std=2.0, nan=False):
    x = RNG.normal(mean, std, SHAPE)
    if nan:
        x[5, 2, 1, 1] = np.nan          # in one chunk of every chunking below
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x.astype(dtype)


CHUNKINGS = {
    "uneven": lambda s: ((3, 1, 3),) + tuple((d - d // 2 - 1, d // 2 + 1) for d in s[1:]),
    "one-sample": lambda s: ((1, s[0] - 1),) + tuple((d,) for d in s[1:]),
    "single": lambda s: s,
}


def _norms(x, axis, dtype):
    """(name, call(x, running stats), kappa): every norm with its parameters."""
    c = x.shape[axis]
    w, b = RNG.normal(size=c).astype(dtype), RNG.normal(size=c).astype(dtype)
    ns = x.shape[2:]
    wl = RNG.normal(size=ns).astype(dtype)
    rm, rv = RNG.normal(size=c), RNG.uniform(0.5, 2, size=c)
    return {
        "batch_train": lambda a, s: nk.batch_norm(a, *s, w, b, True, 0.1, axis=axis,
                                                  return_stats=True),
        "batch_eval": lambda a, s: nk.batch_norm(a, rm, rv, w, b, False, axis=axis,
                                                 return_stats=True),
        "group": lambda a, s: nk.group_norm(a, 3, w, b, axis=axis, return_stats=True),
        "instance": lambda a, s: nk.instance_norm(a, *s, w, b, True, 0.1, axis=axis,
                                                  return_stats=True),
        "layer": lambda a, s: nk.layer_norm(a, ns, wl, None, return_stats=True),
        "rms": lambda a, s: nk.rms_norm(a, ns[-1:], wl[..., 0, :] if len(ns) > 1 else wl,
                                        return_stats=True),
    }


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
def test_every_norm_equals_in_memory(dtype, axis, chunking, nan):
    x = _data(dtype, axis, nan=nan)
    d = da.from_array(x, chunks=CHUNKINGS[chunking](x.shape))
    c = x.shape[axis]
    for call in _norms(x, axis, dtype).values():
        stats_np = [np.zeros(c), np.ones(c)]
        stats_da = [np.zeros(c), np.ones(c)]
        want = call(x, stats_np)
        got = call(d, stats_da)
        for g, w in zip(got, want):
            _close(g, w, dtype, kappa=1.5)
        # running statistics: updated in place at call time, before anything is computed
        tol = _stats_tol(x, axis)
        np.testing.assert_allclose(stats_da[0], stats_np[0], rtol=0, atol=tol, equal_nan=True)
        np.testing.assert_allclose(stats_da[1], stats_np[1], rtol=0, atol=tol, equal_nan=True)


def test_float32_large_mean_is_accurate():
    """Mean 1e4, std 1 in float32: the exact merge keeps every digit the output has."""
    x = RNG.normal(1e4, 1.0, (64, 8, 16, 16)).astype(np.float32)
    d = da.from_array(x, chunks=(5, 3, 16, 7))
    want = nk.batch_norm(x, None, None, None, None, True)
    _close(nk.batch_norm(d, None, None, None, None, True), want, np.float32, kappa=1e4)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3), keepdims=True)
    exact = (x64 - mean) / np.sqrt(x64.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    got = nk.batch_norm(d, None, None, None, None, True).compute()
    # the float32 normalized-output bound (K.bound_normalized: the statistics' error
    # amplified by kappa = 1e4, a few float32 roundings of |y|)
    K.assert_within(got, exact, K.bound_normalized(x, (0, 2, 3), 1e-5, None, None,
                                                   np.float32), "float32, mean 1e4")


def test_running_stats_update_is_eager_and_output_lazy():
    x = _data(np.float64, 1)
    d = da.from_array(x, chunks=(2, 6, 5, 4))
    rm, rv = np.zeros(6), np.ones(6)
    calls = []
    traced = d.map_blocks(lambda b: (b.size and calls.append(1)) or b, dtype=d.dtype)  # not meta
    y = nk.batch_norm(traced, rm, rv, None, None, True, 0.1)
    n_stats = len(calls)
    assert n_stats == len(d.chunks[0])             # one pass, at call time
    rm_np, rv_np = np.zeros(6), np.ones(6)
    nk.batch_norm(x, rm_np, rv_np, None, None, True, 0.1)
    np.testing.assert_allclose(rm, rm_np, rtol=0, atol=_stats_tol(x, 1))
    np.testing.assert_allclose(rv, rv_np, rtol=0, atol=_stats_tol(x, 1))
    assert isinstance(y, da.Array) and len(calls) == n_stats    # output not computed yet
    y.compute()
    assert len(calls) == 2 * n_stats


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("axis", [1, -1])
def test_backward_equals_in_memory(dtype, axis):
    x = _data(dtype, axis)
    dy = RNG.normal(size=x.shape).astype(dtype)
    chunks = CHUNKINGS["uneven"](x.shape)
    d, ddy = da.from_array(x, chunks=chunks), da.from_array(dy, chunks=3)
    c = x.shape[axis]
    w = RNG.normal(size=c).astype(dtype)
    ns = x.shape[2:]
    wl = RNG.normal(size=ns).astype(dtype)
    cases = []
    for training in (True, False):
        _, m, r = nk.batch_norm(x, None, None, w, None, True, axis=axis, return_stats=True)
        cases.append((lambda a, g, m=m, r=r, t=training: nk.batch_norm_backward(
            g, a, m, r, w, training=t, axis=axis)))
    _, m, r = nk.group_norm(x, 3, w, axis=axis, return_stats=True)
    cases.append(lambda a, g, m=m, r=r: nk.group_norm_backward(g, a, 3, m, r, w, axis=axis))
    _, m, r = nk.instance_norm(x, weight=w, axis=axis, return_stats=True)
    cases.append(lambda a, g, m=m, r=r: nk.instance_norm_backward(g, a, m, r, w, axis=axis))
    _, m, r = nk.layer_norm(x, ns, wl, return_stats=True)
    cases.append(lambda a, g, m=m, r=r: nk.layer_norm_backward(g, a, ns, m, r, wl))
    _, m, r = nk.rms_norm(x, ns, wl, return_stats=True)
    cases.append(lambda a, g, r=r: nk.rms_norm_backward(g, a, ns, None, r, wl))
    for case in cases:
        for g, want in zip(case(d, ddy), case(x, dy)):
            # gradient sums run over up to x.size values
            _close(g, want, dtype, kappa=1.5, n=x.size)


def test_layers_on_dask():
    x = _data(np.float32, 1)
    d = da.from_array(x, chunks=(3, 4, 5, 4))
    for make in (lambda: nk.BatchNorm(6), lambda: nk.GroupNorm(3, 6),
                 lambda: nk.InstanceNorm(6, track_running_stats=True),
                 lambda: nk.LayerNorm((5, 4)), lambda: nk.RMSNorm(4)):
        ref, lay = make(), make()
        dy = RNG.normal(size=x.shape).astype(np.float32)
        want_y, got_y = ref(x), lay(d)
        _close(got_y, want_y, np.float32, kappa=1.5)
        _close(lay.backward(da.from_array(dy, chunks=3)), ref.backward(dy), np.float32,
               kappa=1.5, n=x.size)
        for k in ref.grads:
            np.testing.assert_allclose(lay.grads[k], ref.grads[k], rtol=0,
                                       atol=_tol(np.float32, ref.grads[k], 1.5))
        for k, v in ref.state_dict().items():
            np.testing.assert_allclose(lay.state_dict()[k], v, err_msg=k,
                                       **_float32_state_tol(x, 1, 0.1))


def test_recalibrate_dask_batches():
    xs = [_data(np.float32, 1, mean=50.0) for _ in range(3)]
    ref, lay = nk.BatchNorm(6), nk.BatchNorm(6)
    assert nk.recalibrate(ref, xs) == nk.recalibrate(
        lay, [da.from_array(x, chunks=(2, 4, 5, 3)) for x in xs])
    # population statistics of the same values, merged in another order
    tol = _float32_state_tol(np.concatenate(xs), 1)
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(lay.state_dict()[k], v, err_msg=k, **tol)
    one = nk.BatchNorm(6)              # a Dask array is one batch: the whole dataset
    nk.recalibrate(one, da.concatenate([da.from_array(x) for x in xs]))
    np.testing.assert_allclose(one.running_var, ref.running_var, **tol)
    assert int(one.num_batches_tracked) == 1


def test_errors_name_the_argument():
    d = da.zeros((4, 6, 3), chunks=2)
    with pytest.raises(ValueError, match="weight"):
        nk.batch_norm(d, None, None, np.ones(5), None, True)
    with pytest.raises(TypeError, match="int32"):
        nk.layer_norm(da.zeros((4, 3), dtype=np.int32), 3)
    with pytest.raises(ValueError, match="out: expected dtype float64, got dtype float32"):
        nk.layer_norm(d, 3, out=np.empty((4, 6, 3), np.float32))
    with pytest.raises(ValueError, match="divisible"):
        nk.group_norm(d, 4)
    with pytest.raises(ValueError, match="eval mode"):
        nk.batch_norm(d)


def test_dask_not_imported_by_normkit():
    import subprocess
    import sys
    code = ("import sys, normkit, numpy as np; normkit.layer_norm(np.ones((2, 3)), 3); "
            "assert 'dask' not in sys.modules, 'dask imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- a real LocalCluster
HEADROOM_MIB = 72      # above an idle worker's RSS: room for a few 4 MiB chunks, no more


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("distributed", reason="dask.distributed is not installed "
                        "(pip install 'normkit[dask]')")
    from normkit import _bench_dask
    return _bench_dask


@pytest.fixture(scope="module")
def worker_mib(bench):
    """Worker memory limit: an idle worker's RSS (~90 MiB with Python, NumPy, normkit
    and distributed; more where distributed also loads pandas) plus the headroom."""
    return round(bench.idle_worker_mib()) + HEADROOM_MIB


def _workers(client):
    return sorted(client.scheduler_info()["workers"])


def test_local_cluster_every_norm_and_backend_travels(bench):
    x = _data(np.float32, 1)
    d = da.from_array(x, chunks=CHUNKINGS["uneven"](x.shape))
    c = x.shape[1]
    with bench.local_cluster(None) as client:      # no limit: numba compiles in there
        for call in _norms(x, 1, np.float32).values():
            want = [w for w in call(x, [np.zeros(c), np.ones(c)]) if w is not None]
            got = call(d, [np.zeros(c), np.ones(c)])
            got = client.compute([g for g in got if g is not None], sync=True)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=0, atol=_tol(np.float32, w, 1.5))
        # the backend chosen here travels with the tasks; kernels run 1 thread per worker
        import sys
        with nk.use_backend("numpy"):
            y = nk.layer_norm(d, x.shape[2:]).compute()
        np.testing.assert_allclose(y, nk.layer_norm(x, x.shape[2:], backend="numpy"),
                                   atol=_tol(np.float32, y))
        if "numba" in nk.available_backends():
            nk.group_norm(d, 2, backend="numba").compute()
            loaded = client.run(lambda: "normkit.backends.numba_backend" in sys.modules)
            assert all(loaded.values())
        assert set(client.run(nk.get_num_threads).values()) == {1}


def test_out_of_core_zarr_recalibrate_and_normalize(bench, worker_mib, tmp_path):
    """A Zarr dataset 4x the workers' total memory limit: recalibrated exactly and
    normalized back to disk, each worker's peak RSS staying under its limit."""
    pytest.importorskip("zarr", reason="zarr is not installed")
    with bench.local_cluster(worker_mib) as client:
        workers = _workers(client)
        r = bench.out_of_core(client, str(tmp_path), factor=4.0)
        assert _workers(client) == workers                  # no worker killed/restarted
        peaks = r["peak_mib"]
        print(f"\nout-of-core: {r['dataset_mib']:.0f} MiB, 2 workers x "
              f"{worker_mib} MiB; recalibrate {r['recalibrate_s']:.1f} s, "
              f"normalize {r['normalize_s']:.1f} s; RSS idle "
              f"{sorted(round(v) for v in r['idle_mib'].values())}, peak "
              f"{sorted(round(v) for v in peaks.values())} MiB")
        assert r["dataset_mib"] >= 4 * 2 * worker_mib
        assert max(peaks.values()) < 0.95 * worker_mib    # under the nanny's kill line
        # bounded by a few chunks: what the pipeline adds to an idle worker
        assert max(peaks[k] - r['idle_mib'][k] for k in peaks) < 12 * r['chunk_mib']
        xz, bn, chunk = r["x"], r["layer"], 16
        assert r["counts"] == {0: xz.shape[0] * 64 * 64}
        ref_mean, ref_var = dask.compute(xz.mean(axis=(0, 2, 3), dtype=np.float64),
                                         xz.var(axis=(0, 2, 3), dtype=np.float64, ddof=1))
        # float64 statistics of the same values by two merge orders, within
        # BX.bound_moments_from_stats (unbiased variance: x n/(n-1)), then rounded to the
        # layer's float32 buffers: 1 ulp each way (2 u32 relative)
        n = xz.shape[0] * 64 * 64
        d_mean, d_var = BX.bound_moments_from_stats(ref_mean, ref_var * (n - 1) / n, n)
        np.testing.assert_allclose(bn.running_mean, ref_mean, rtol=2 * 2 ** -24,
                                   atol=float(d_mean.max()))
        np.testing.assert_allclose(bn.running_var, ref_var, rtol=2 * 2 ** -24,
                                   atol=float(d_var.max()) * n / (n - 1))
        head = xz[:chunk + 3].compute().copy()   # a copy is aligned; see docs/dask.md
        want = nk.batch_norm(head, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        np.testing.assert_allclose(np.asarray(r["y"][:chunk + 3]), want, rtol=0,
                                   atol=_tol(np.float32, want, kappa=1e3 / 1.15))
