"""The backend registry: names, selection, thread-local overrides, env vars, threads."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import normkit as nk
from normkit import backends
from normkit.backends import _spec

import _cases as K


def _run(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_numpy_always_available_and_listed_first_class():
    names = nk.available_backends()
    assert "numpy" in names
    assert set(names) <= {"numpy", "numba", "cython"}


@pytest.mark.parametrize("name", nk.available_backends())
def test_every_backend_implements_the_contract(name):
    module = backends.resolve(name)
    assert module.NAME == name
    for member in _spec.MEMBERS:
        assert hasattr(module, member), f"{name} lacks {member}"
    assert isinstance(module.info(), dict)


def test_get_set_backend_and_use_backend():
    assert nk.get_backend() in ("auto",) + backends.KNOWN_BACKENDS
    previous = nk.get_backend()
    try:
        nk.set_backend("numpy")
        assert nk.get_backend() == "numpy"
        assert nk.LayerNorm(4).backend == "numpy"
        with nk.use_backend("auto"):
            assert nk.get_backend() == "auto"
        assert nk.get_backend() == "numpy"
    finally:
        nk.set_backend(previous)


def test_use_backend_is_thread_local():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def other():
        inside.wait()
        seen["other"] = nk.get_backend()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    before = nk.get_backend()
    with nk.use_backend("numpy"):
        seen["main"] = nk.get_backend()
        inside.set()
        release.wait(10)
    t.join()
    assert seen == {"main": "numpy", "other": before}


def test_backend_argument_overrides_default():
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    # each backend against the float64 reference (the default here) on float32 rows of 8,
    # eps 1e-5: the per-element normalized-output bound (it counts both sides' error)
    bound = K.bound_normalized(x, -1, 1e-5, None, None, np.float32)
    with nk.use_backend("numpy"):
        for name in nk.available_backends():
            K.assert_within(nk.layer_norm(x, 8, backend=name), nk.layer_norm(x, 8), bound,
                            f"{name} vs the default backend")
            assert nk.LayerNorm(8, backend=name).backend == name


def test_unknown_backend():
    for call in (lambda: nk.set_backend("gpu"), lambda: nk.use_backend("gpu").__enter__(),
                 lambda: backends.resolve("gpu")):
        with pytest.raises(ValueError, match=r"Expected backend to be one of \['auto', "
                                             r"'cython', 'numba', 'numpy'\]\. Received 'gpu'"):
            call()


def test_unavailable_backend_raises_import_error_subclass(monkeypatch):
    assert issubclass(nk.BackendUnavailableError, ImportError)
    monkeypatch.setitem(backends._MODULES, "cython",
                        ("normkit.backends._does_not_exist", "Rebuild it with pip install -e ."))
    monkeypatch.delitem(backends._loaded, "cython", raising=False)
    monkeypatch.delitem(backends._failed, "cython", raising=False)
    monkeypatch.delitem(backends._loaded, "auto", raising=False)
    try:
        with pytest.raises(nk.BackendUnavailableError, match="not available.*pip install -e"):
            nk.layer_norm(np.ones((2, 3), np.float32), 3, backend="cython")
        assert "cython" not in nk.available_backends()
        assert nk.layer_norm(np.ones((2, 3), np.float32), 3).shape == (2, 3)
        assert backends.backend_status()["cython"] != "available"
    finally:
        backends._failed.pop("cython", None)
        backends._loaded.pop("auto", None)


def test_env_var_selects_backend_and_threads():
    res = _run("""
        import normkit
        print(normkit.get_backend(), normkit.get_num_threads())
        import numpy as np
        normkit.layer_norm(np.ones((2, 4), np.float32), 4)
        """, NORMKIT_BACKEND="numpy", NORMKIT_NUM_THREADS="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["numpy", "1"]


def test_bad_env_var_is_a_clear_error():
    res = _run("import normkit", NORMKIT_BACKEND="fortran")
    assert res.returncode != 0 and "Received 'fortran'" in res.stderr


def test_set_num_threads():
    n = nk.get_num_threads()
    try:
        nk.set_num_threads(1)
        assert nk.get_num_threads() == 1
        x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
        for name in nk.available_backends():
            nk.layer_norm(x, 4096, backend=name)
    finally:
        nk.set_num_threads(n)
    for bad in (0, -2, np.int64(0)):
        with pytest.raises(ValueError, match="n must be >= 1"):
            nk.set_num_threads(bad)
    for bad in (1.5, "2", True, np.float64(2.0), None):
        with pytest.raises(TypeError, match="n must be an integer"):
            nk.set_num_threads(bad)
    assert nk.get_num_threads() == n          # a rejected value changes nothing


def test_set_num_threads_accepts_any_integral_number():
    n = nk.get_num_threads()
    try:
        nk.set_num_threads(np.int64(1))
        assert nk.get_num_threads() == 1 and type(nk.get_num_threads()) is int
        nk.set_num_threads(np.uint8(2))
        assert nk.get_num_threads() == 2
    finally:
        nk.set_num_threads(n)


def test_resolve_is_internal_but_importable():
    assert "resolve" not in backends.__all__
    from normkit.backends import resolve
    assert resolve("numpy").NAME == "numpy"


def test_interrupted_backend_load_is_retried_cleanly():
    """Ctrl-C while numba is still importing: the next call loads the backend afresh."""
    res = _run("""
        import importlib.abc, json, sys
        import numpy as np
        import normkit as nk

        class Interrupt(importlib.abc.MetaPathFinder):
            fired = False
            def find_spec(self, name, path=None, target=None):
                if name == "numba.core.typing" and not Interrupt.fired:
                    Interrupt.fired = True
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, Interrupt())
        x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
        try:
            nk.layer_norm(x, 8, backend="numba")
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        half = sorted(m for m in sys.modules if m.startswith("normkit.backends.numba"))
        got = nk.layer_norm(x, 8, backend="numba")
        want = nk.layer_norm(x, 8, backend="numpy")
        print(json.dumps({"fired": Interrupt.fired, "interrupted": interrupted,
                          "half": half, "got": got.tolist(), "want": want.tolist(),
                          "status": nk.backends.backend_status()["numba"],
                          "listed": "numba" in nk.available_backends()}))
        """)
    assert res.returncode == 0, res.stderr[-3000:]
    import json
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["fired"] and out["interrupted"], out
    assert out["half"] == [], out           # nothing half-imported was left behind
    assert out["status"] == "available" and out["listed"], out
    # numba vs the float64 reference on float32 rows of 8 (eps 1e-5): the per-element
    # normalized-output bound (both sides' error)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    K.assert_within(np.array(out["got"], np.float32), np.array(out["want"], np.float32),
                    K.bound_normalized(x, -1, 1e-5, None, None, np.float32),
                    "numba after an interrupted load")


def test_import_is_light_and_compiles_nothing():
    """`import normkit` must not import numba, scipy, dask, torch or onnx.

    What makes an import slow is what it drags in, so that is what is asserted; the
    wall time on a shared machine is not (timings belong in benchmarks). The time is
    printed for the record.
    """
    dt, heavy = _import_once()
    assert heavy.strip() == "[]", f"import normkit imported {heavy.strip()}"
    print(f"import normkit: {float(dt):.3f} s")


def _import_once():
    res = _run("""
        import sys, time
        t = time.perf_counter()
        import normkit
        dt = time.perf_counter() - t
        heavy = [m for m in ("numba", "scipy", "dask", "torch", "onnx", "onnxruntime")
                 if m in sys.modules]
        print(dt, heavy)
        """)
    assert res.returncode == 0, res.stderr
    return res.stdout.split(maxsplit=1)


def test_info_command():
    res = subprocess.run([sys.executable, "-m", "normkit", "info"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"normkit {nk.__version__}" in out and "default backend" in out
    assert "threads:" in out
    for name in backends.KNOWN_BACKENDS:
        assert name in out
