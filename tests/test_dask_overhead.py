"""Dask's overhead, reduced: ``out=`` with a NumPy array writes every block straight into
it (no output blocks, no final concatenation), stays correct when ``out`` overlaps the
data and on a distributed scheduler; the benchmark's overhead table runs.

The ``out=`` results are compared with ``compute()`` of the same lazy call *bit for bit*:
both run the same block function with the same kernel on the same blocks (the kernel
writing into ``out``'s region instead of a new block), so there is no rounding to allow
for; training BatchNorm's eager statistics come from the same deterministic tree.
"""
from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed "
                         "(pip install 'normkit[dask]')")
import dask  # noqa: E402
from dask.callbacks import Callback  # noqa: E402

import normkit as nk  # noqa: E402

RNG = np.random.default_rng(77)
C = 8


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


def _calls():
    rng = np.random.default_rng(5)      # the same parameters on every call
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, C)
    w, b = rng.normal(size=C), rng.normal(size=C)
    return {
        "layer_norm": lambda a, **k: nk.layer_norm(a, a.shape[1:], **k),
        "rms_norm": lambda a, **k: nk.rms_norm(a, a.shape[2:], **k),
        "group_norm relu": lambda a, **k: nk.group_norm(a, 4, w, b, activation="relu", **k),
        "instance_norm": lambda a, **k: nk.instance_norm(a, **k),
        "batch_norm eval": lambda a, **k: nk.batch_norm(a, rm, rv, w, b, **k),
        "batch_norm train": lambda a, **k: nk.batch_norm(a, None, None, w, b, True, **k),
    }


CHUNKINGS = {
    "batch axis": (3, C, 5, 6),         # every block a contiguous piece of out
    "channels too": (4, 4, 5, 6),       # non-contiguous regions: results copied in
    "spatial too": (5, C, 2, 6),        # per-sample norms rechunk to whole samples
}


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("name", list(_calls()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_numpy_equals_compute(name, chunks, dtype):
    x = RNG.normal(3.0, 2.0, (10, C, 5, 6)).astype(dtype)
    d = da.from_array(x, chunks=CHUNKINGS[chunks])
    call = _calls()[name]
    want = call(d).compute()
    for layout in ("C", "F"):
        out = np.full(x.shape, np.nan, dtype, order=layout)
        assert call(d, out=out) is out
        np.testing.assert_array_equal(out, want)


class _Results(Callback):
    """The bytes each task returned."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def _posttask(self, key, result, dsk, state, worker_id):
        self.sizes.append(result.nbytes if isinstance(result, np.ndarray) else 0)


@pytest.mark.parametrize("name", ["layer_norm", "group_norm relu", "batch_norm eval"])
def test_out_numpy_tasks_return_no_output_blocks(name):
    """Every task writes its block into out and returns a one-element placeholder: the
    output never exists as separate blocks, and only the 8 one-byte placeholders are
    concatenated at the end."""
    x = RNG.normal(size=(16, C, 8, 8)).astype(np.float32)
    d = da.from_array(x, chunks=(2, C, 8, 8))
    out = np.empty_like(x)
    with _Results() as seen:
        _calls()[name](d, out=out)
    assert len(seen.sizes) >= 8 and max(seen.sizes) <= 8, seen.sizes
    np.testing.assert_array_equal(out, _calls()[name](d).compute())


def test_out_overlapping_the_data_is_computed_first():
    """out is the array x's graph reads from, in another order: writing blocks as they
    finish would change later blocks' input, so the result is computed, then copied."""
    base = RNG.normal(size=(12, C, 4, 4)).astype(np.float32)
    want = nk.layer_norm(base[::-1].copy(), base.shape[1:])
    d = da.from_array(base, chunks=(3, C, 4, 4))[::-1]
    assert nk.layer_norm(d, base.shape[1:], out=base) is base
    np.testing.assert_array_equal(base, want)
    x = RNG.normal(size=(12, C, 4, 4)).astype(np.float32)     # in place, as for NumPy
    want = nk.group_norm(x, 2)
    nk.group_norm(da.from_array(x, chunks=(3, C, 4, 4)), 2, out=x)
    np.testing.assert_array_equal(x, want)


def test_out_numpy_on_a_local_cluster():
    """A distributed worker would write into its own unpickled copy of a NumPy out: the
    result is computed and copied into the caller's array instead (with and without
    statistics)."""
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    from normkit import _bench_dask
    x = RNG.normal(size=(12, C, 4, 4)).astype(np.float32)
    d = da.from_array(x, chunks=(5, C, 4, 4))
    want = nk.layer_norm(d, x.shape[1:]).compute()
    with _bench_dask.local_cluster(None):
        out = np.full_like(x, np.nan)
        assert nk.layer_norm(d, x.shape[1:], out=out) is out
        np.testing.assert_array_equal(out, want)
        out = np.full_like(x, np.nan)
        y, mean, rstd = nk.layer_norm(d, x.shape[1:], out=out, return_stats=True)
        assert y is out and isinstance(mean, np.ndarray) and mean.shape == (12,)
        np.testing.assert_array_equal(out, want)


def test_overhead_table_runs():
    """The benchmark's overhead case on a tiny array: every column is a positive time."""
    from normkit import _bench_dask
    rows = _bench_dask.overhead_cases(sizes_mib=(1,), repeats=1)
    assert set(rows) == {1}
    for res in rows[1]["calls"].values():
        assert set(res) >= {"numpy", "numpy out=", "dask compute()", "dask out=",
                            "dask expression"}
        assert all(min(v) > 0 for v in res.values())
        assert len(res["dask out="]) == 3           # also the ratio to numpy out=
    assert rows[1]["floor"]["identity map_blocks"][0] > 0


class _ThreadsSeen(Callback):
    """normkit's kernel thread count at the start of every task."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def _pretask(self, key, dsk, state):
        self.seen.add(nk.get_num_threads())


@pytest.mark.parametrize("scheduler, inside", [("threads", 1), ("sync", 2)])
def test_eager_computations_use_one_kernel_thread_per_dask_thread(scheduler, inside):
    """2 Dask threads x 1 kernel thread on 2 threads' worth of cores (no oversubscription)
    during out= and training BatchNorm's eager statistics; the synchronous scheduler
    runs one task at a time and keeps the kernels' threads; restored afterwards."""
    x = RNG.normal(size=(16, C, 8, 8)).astype(np.float32)
    d = da.from_array(x, chunks=(2, C, 8, 8))
    before = nk.get_num_threads()
    nk.set_num_threads(2)
    try:
        with dask.config.set(scheduler=scheduler, num_workers=2), _ThreadsSeen() as t:
            nk.batch_norm(d, None, None, None, None, True, out=np.empty_like(x))
        assert t.seen == {inside}
        assert nk.get_num_threads() == 2
    finally:
        nk.set_num_threads(before)


class _Graphs(Callback):
    """How many graphs were run."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _start(self, dsk):
        self.count += 1


@pytest.mark.parametrize("chunks", [(3, C, 5, 6), (4, 4, 5, 6)])
def test_training_batch_norm_into_numpy_out_is_one_graph(chunks):
    """Training BatchNorm with a NumPy out: the moments and the normalized blocks in one
    graph (one scheduling cost, x's blocks read once from the graph), the running
    statistics updated after it exactly as by the two-graph lazy call."""
    x = RNG.normal(3.0, 2.0, (10, C, 5, 6)).astype(np.float32)
    d = da.from_array(x, chunks=chunks)
    rm1, rv1 = np.zeros(C, np.float32), np.ones(C, np.float32)
    rm2, rv2 = rm1.copy(), rv1.copy()
    want = nk.batch_norm(d, rm1, rv1, training=True, momentum=0.3).compute()
    out = np.empty_like(x)
    with _Graphs() as graphs:
        assert nk.batch_norm(d, rm2, rv2, training=True, momentum=0.3, out=out) is out
    assert graphs.count == 1
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(rm2, rm1)
    np.testing.assert_array_equal(rv2, rv1)
