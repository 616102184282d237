"""The ``cython`` backend: kernels compiled from ``_cython_kernels.pyx`` (Cython + OpenMP).

This module only picks a compiled module and re-exports its functions, so a call from
the registry goes straight into the extension. setup.py builds the kernels portably
(``_cython_kernels``) and, on x86, once more with AVX2 (``_cython_kernels_avx2``,
same source, bitwise identical results, about 1.5x faster where the float32
statistics are compute-bound); the AVX2 build is used when the CPU has AVX2, unless
``NORMKIT_CYTHON_SIMD=baseline``.

If the extension was not built, importing this module raises ImportError saying how
to build it; the registry then reports ``cython`` as unavailable and the other
backends keep working.
"""
import os

try:
    from . import _cython_kernels as _ext
except ImportError as exc:
    raise ImportError(
        f"normkit's compiled Cython extension could not be imported ({exc}); build it "
        "from a source checkout with a C compiler: `pip install -e .`."
    ) from exc

_variants = ["baseline"]
if os.environ.get("NORMKIT_CYTHON_SIMD", "auto").lower() != "baseline" and _ext._cpu_has_avx2():
    try:
        from . import _cython_kernels_avx2 as _ext
        _variants.append("avx2")
    except ImportError:       # not built (non-x86 build host, NORMKIT_NATIVE=1, ...)
        pass

NAME = "cython"
plane_moments = _ext.plane_moments
channels_last_moments = _ext.channels_last_moments
rows_forward = _ext.rows_forward
rows_backward = _ext.rows_backward
channels_first_affine = _ext.channels_first_affine
channels_last_affine = _ext.channels_last_affine
channels_first_grad_sums = _ext.channels_first_grad_sums
channels_last_grad_sums = _ext.channels_last_grad_sums
channels_first_grad_apply = _ext.channels_first_grad_apply
channels_last_grad_apply = _ext.channels_last_grad_apply
set_num_threads = _ext.set_num_threads
get_num_threads = _ext.get_num_threads


def info() -> dict:
    """What was built and how calls run (for ``python -m normkit info``)."""
    d = _ext.info()
    d["simd_builds_loaded"] = _variants
    return d
