"""The ``cython`` backend: kernels compiled from ``_cython_kernels.pyx`` (Cython + OpenMP).

This module only re-exports the compiled functions, so a call from the registry goes
straight into the extension. If the extension was not built, importing this module
raises ImportError saying how to build it; the registry then reports ``cython`` as
unavailable and the other backends keep working.
"""
try:
    from ._cython_kernels import (  # noqa: F401
        NAME,
        channels_first_affine,
        channels_first_grad_apply,
        channels_first_grad_sums,
        channels_last_affine,
        channels_last_grad_apply,
        channels_last_grad_sums,
        channels_last_moments,
        get_num_threads,
        info,
        plane_moments,
        rows_backward,
        rows_forward,
        set_num_threads,
    )
except ImportError as exc:
    raise ImportError(
        "normkit's compiled Cython extension (normkit.backends._cython_kernels) is not "
        f"available ({exc}). Build it from a source checkout with a C compiler: "
        "`pip install -e .` (or `python setup.py build_ext --inplace`); "
        "set NORMKIT_NO_OPENMP=1 to build without OpenMP."
    ) from exc
