"""The portable Cython build runs on an old x86-64 CPU, the AVX2 build on an AVX2-only one
(issue 11).

Compiling with portable flags is not proof: a stray AVX instruction (from a header, an
intrinsic, the compiler's own choice) would only show on a CPU without it. So these
tests run Python under ``qemu-x86_64 -cpu Nehalem`` (an x86-64 from 2008: SSE4.2, no
AVX, no AVX2, no F16C, no FMA), import normkit there and call every kernel of the
contract (``_spec.KERNELS``) against the NumPy reference backend. They also check that
the backend picks the baseline build there by itself, and that the AVX2/AVX-512 builds
really die by SIGILL under the emulator -- without that, a passing run would not show
that the emulator enforces the old instruction set.

The same check runs under ``-cpu EPYC-Rome`` (AMD Zen 2: AVX2, FMA and F16C but no
AVX-512, the machine issue 11 was reported from): there the backend must pick the AVX2
build by itself, every kernel of it must pass, the AVX-512 build must die by SIGILL,
and Numba must compile for that CPU and run.

Needs Debian's ``qemu-user`` (``apt-get install -y qemu-user``); skipped without it.
Arrays are small: qemu runs the child ~10-50x slower than the host.
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

QEMU = shutil.which("qemu-x86_64")
OLD_CPU = "Nehalem"
AVX2_CPU = "EPYC-Rome"
# emulated CPU -> the SIMD level and module the backend must pick there by itself
EMULATED = {OLD_CPU: (0, "normkit.backends._cython_kernels"),
            AVX2_CPU: (1, "normkit.backends._cython_kernels_avx2")}

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (Debian: "
                       "apt-get install -y qemu-user); the old-CPU emulation is skipped"),
    pytest.mark.skipif(importlib.util.find_spec("normkit.backends._cython_kernels") is None,
                       reason="the Cython extension is not built"),
]

# Runs under the emulator: every kernel of the contract, float32, float64, float16 and
# bfloat16 (the portable bit conversions: no F16C there), serial and through the
# OpenMP path, compared with the float64 NumPy reference.
CHILD_ALL_KERNELS = textwrap.dedent("""
    import sys
    import ml_dtypes
    import numpy as np
    from normkit.backends import _spec
    from normkit.backends import cython_backend as cy
    from normkit.backends import numpy_ref as ref

    assert cy.info()["module"] == sys.argv[1], cy.info()["module"]

    def cases(dtype):
        rng = np.random.default_rng(0)
        pdt = np.float64 if dtype == np.float64 else np.float32     # the parameter dtype
        def a(*shape, loc=0.5, dt=dtype):
            return (rng.standard_normal(shape) + loc).astype(dt)
        x2, dy2, w, b = a(5, 37), a(5, 37), a(37, dt=pdt), a(37, dt=pdt)
        x3, dy3, x3l, dy3l = a(2, 4, 29, loc=3.0), a(2, 4, 29), a(2, 29, 4, loc=3.0), a(2, 29, 4)
        p = [a(1, 4, dt=pdt) for _ in range(4)]
        pn = [a(2, 4, dt=pdt) for _ in range(4)]
        mean, rstd = ref.rows_forward(x2, w, b, 1e-5, False, np.empty(x2.shape))
        e = np.empty_like
        yield "plane_moments", (x2,)
        yield "channels_last_moments", (x3l,)
        for rms in (False, True):
            yield "rows_forward", (x2, w, b, 1e-5, rms, e(x2))
            yield "rows_backward", (dy2, x2, mean, rstd, w, rms, e(x2))
        for params in (p, pn):
            for lay, x, dy in (("channels_first_", x3, dy3), ("channels_last_", x3l, dy3l)):
                yield lay + "affine", (x, *params[:3], e(x))
                yield lay + "grad_sums", (dy, x, params[0])
                yield lay + "grad_apply", (dy, x, *params, e(x))
                for res, relu in ((None, True), (dy, False), (dy, True)):
                    yield lay + "affine_act", (x, *params[:3], res, relu, e(x))
        for groups in (1, 2, 4):
            yield "channels_first_group_forward", (x3, groups, w[:4], b[:4], 1e-5, e(x3))
        yield "channels_first_batch_forward", (x3, w[:4], b[:4], 1e-5, e(x3))
        def stats(rows):
            m, m2 = ref.plane_moments(rows)
            return m, 1.0 / np.sqrt(m2 / rows.shape[1] + 1e-5)
        for groups in (1, 2, 4):
            m, r = stats(x3.reshape(2 * groups, -1))
            yield "channels_first_group_backward", (dy3, x3, groups, m.reshape(2, groups),
                                                    r.reshape(2, groups), w[:4], e(x3))
        m, r = stats(np.moveaxis(x3, 1, 0).reshape(4, -1))
        yield "channels_first_batch_backward", (dy3, x3, m, r, w[:4], e(x3))

    # kernels that only return; every other one also writes its last argument
    RETURN_ONLY = {"plane_moments", "channels_last_moments",
                   "channels_first_grad_sums", "channels_last_grad_sums"}

    def outputs(name, ret, args):
        return list(ret or ()) + ([] if name in RETURN_ONLY else [args[-1]])

    called = set()
    for parallel_min in (1 << 30, 0):          # serial, then forced through OpenMP
        cy._ext._set_parallel_min(parallel_min)
        cy.set_num_threads(2)
        for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
            # Every output is a few (<= 8) roundings of eps/2 away from the float64
            # truth, relative to the size of the terms it is made of; for this data
            # (O(1) values, |x - shift| * |scale| <= ~10 * |output scale|) 64 eps of
            # the largest output value bounds it with margin, with or without FMA.
            # Statistics are accumulated in double: their error is far below that.
            # 16-bit data: computed in float32 and rounded once (<= 1 ulp of the
            # 16-bit output from the reference, which rounds its float64 result), so
            # the 16-bit eps in the same bound covers it with the same margin.
            eps = float(ml_dtypes.finfo(dtype).eps)
            for name, args in cases(dtype):
                called.add((name, np.dtype(dtype).name))
                ref_args = [np.array(v) if isinstance(v, np.ndarray) else v for v in args]
                got = outputs(name, getattr(cy, name)(*args), args)
                want = outputs(name, getattr(ref, name)(*ref_args), ref_args)
                assert len(got) == len(want) > 0, name
                for g, w_ in zip(got, want):
                    g, w_ = np.asarray(g, np.float64), np.asarray(w_, np.float64)
                    tol = 64 * eps * max(1.0, float(np.abs(w_).max()))
                    np.testing.assert_allclose(g, w_, rtol=64 * eps, atol=tol,
                                               err_msg=f"{name} {np.dtype(dtype).name}")
    missing = {(k, t) for k in _spec.KERNELS
               for t in ("float32", "float64", "float16", "bfloat16")} - called
    assert not missing, f"kernels not exercised: {sorted(missing)}"
    print("all kernels ok", cy._ext._cpu_simd_level(), cy.info()["simd"])
""")

CHILD_AUTO = textwrap.dedent("""
    from normkit.backends import _cython_kernels as base
    from normkit.backends import cython_backend as cy
    print(base._cpu_simd_level(), cy.info()["module"])
""")

CHILD_FORCED = textwrap.dedent("""
    import sys
    import importlib
    import numpy as np
    mod = importlib.import_module("normkit.backends._cython_kernels_" + sys.argv[1])
    print("imported", flush=True)
    mod.plane_moments(np.ones((4, 5000), np.float32))
    print("called", flush=True)
""")


# Numba compiles for the CPU it runs on (LLVM reads the emulated CPUID): one kernel,
# layer_norm in float32, against the reference (compiling under the emulator is slow).
# A fresh cache directory, so nothing compiled for the host is loaded.
CHILD_NUMBA = textwrap.dedent("""
    import llvmlite.binding as ll
    import numpy as np
    import normkit as nk
    x = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
    got, want = (nk.layer_norm(x, 33, backend=b) for b in ("numba", "numpy"))
    # both round a float64-accurate value once to float32 (the reference) or carry a
    # few float32 roundings of terms no larger than the largest |y| (the kernel):
    # 8 eps of that bounds the difference, with or without FMA
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * 2.0**-23 * np.abs(want).max())
    print("numba ok", ll.get_host_cpu_name())
""")



def _emulated(code, *args, cpu=OLD_CPU, simd=None, numba_cache=None, timeout=120):
    """Run `code` in Python under qemu-x86_64 -cpu `cpu` (Numba's JIT off unless given
    a cache directory of its own)."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if numba_cache is None:
        env["NUMBA_DISABLE_JIT"] = "1"
    else:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    env.pop("NORMKIT_CYTHON_SIMD", None)
    if simd is not None:
        env["NORMKIT_CYTHON_SIMD"] = simd
    return subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-c", code, *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _built(level):
    if importlib.util.find_spec(f"normkit.backends._cython_kernels_{level}") is None:
        pytest.skip(f"the {level} build was not compiled on this host")


@pytest.mark.parametrize("cpu", list(EMULATED))
def test_every_kernel_of_the_build_picked_on_an_older_cpu(cpu):
    """No cap: the backend's own CPU check picks the build, and all of it runs."""
    level, module = EMULATED[cpu]
    if level:
        _built("avx2")
    proc = _emulated(CHILD_ALL_KERNELS, module, cpu=cpu, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"all kernels ok {level}" in proc.stdout, proc.stdout


@pytest.mark.parametrize("cpu", list(EMULATED))
def test_backend_picks_the_build_the_cpu_runs(cpu):
    level, module = EMULATED[cpu]
    if level:
        _built("avx2")
    proc = _emulated(CHILD_AUTO, cpu=cpu)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Nehalem has no AVX2: the portable build with no cap; EPYC-Rome: AVX2, not AVX-512
    assert proc.stdout.split() == [str(level), module], proc.stdout


def test_numba_compiles_and_runs_on_an_avx2_only_cpu(tmp_path):
    # compiling under the emulator is slow (~30 s of CPU, minutes on a loaded machine)
    proc = _emulated(CHILD_NUMBA, cpu=AVX2_CPU, numba_cache=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "numba ok znver2" in proc.stdout, proc.stdout


@pytest.mark.parametrize("cpu,level", [(OLD_CPU, "avx2"), (OLD_CPU, "avx512"),
                                       (AVX2_CPU, "avx512")])
def test_simd_builds_die_on_an_older_cpu(cpu, level):
    """Forcing an ISA build under the emulator kills the child with SIGILL: the
    emulated CPU really lacks those instructions, so the tests above mean something."""
    _built(level)
    proc = _emulated(CHILD_FORCED, level, cpu=cpu)
    assert "called" not in proc.stdout, proc.stdout
    assert proc.returncode in (-signal.SIGILL, 128 + signal.SIGILL), (
        proc.returncode, proc.stdout, proc.stderr[-2000:])
