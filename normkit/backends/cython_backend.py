"""The ``cython`` backend: kernels compiled from ``_cython_kernels.pyx.tp`` (a Tempita
template of Cython + OpenMP code, rendered by setup.py; C helpers in ``nk_helpers.h``).

This module only picks a compiled module and re-exports its functions, so a call from
the registry goes straight into the extension. setup.py builds the kernels portably
(``_cython_kernels``) and, on x86, also with AVX2 and with AVX-512 flags
(``_cython_kernels_avx2`` / ``_avx512``, both also with F16C); the best build this CPU
runs is used.
``NORMKIT_CYTHON_SIMD=baseline|avx2|avx512`` caps the choice.

If the extension was not built, importing this module raises ImportError saying how
to build it; the registry then reports ``cython`` as unavailable and the other
backends keep working.
"""
import importlib
import os

try:
    from . import _cython_kernels as _ext
except ImportError as exc:
    raise ImportError(
        f"normkit's compiled Cython extension could not be imported ({exc}); build it "
        "from a source checkout with a C compiler: `pip install -e .`."
    ) from exc

_LEVELS = {"baseline": 0, "avx2": 1, "avx512": 2}
_cap = _LEVELS.get(os.environ.get("NORMKIT_CYTHON_SIMD", "auto").strip().lower(), 2)
_level = min(_ext._cpu_simd_level(), _cap)
for _name in ("avx512", "avx2"):
    if _LEVELS[_name] <= _level:
        try:
            _ext = importlib.import_module(f"{__package__}._cython_kernels_{_name}")
            break
        except ImportError:   # not built (non-x86 build host, NORMKIT_NATIVE=1, ...)
            continue

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
channels_first_group_forward = _ext.channels_first_group_forward
channels_first_batch_forward = _ext.channels_first_batch_forward
channels_first_group_backward = _ext.channels_first_group_backward
channels_first_batch_backward = _ext.channels_first_batch_backward
channels_first_affine_act = _ext.channels_first_affine_act
channels_last_affine_act = _ext.channels_last_affine_act
set_num_threads = _ext.set_num_threads
get_num_threads = _ext.get_num_threads


def info() -> dict:
    """What was built and how calls run (for ``python -m normkit info``)."""
    d = _ext.info()
    d["cpu_simd_level"] = ["baseline", "avx2", "avx512"][_ext._cpu_simd_level()]
    return d
