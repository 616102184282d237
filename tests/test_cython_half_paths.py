"""The Cython backend's 16-bit C kernels (``normkit/backends/nk_half.h``) at every SIMD
build this CPU runs, in one process: vector loops of NK_FW float lanes (4 baseline, 8
AVX2, 16 AVX-512) and NK_VW double lanes with a tail of the remaining values, so every
length around those widths is run -- 1, 3, 15, 16, 17, 31, 33, 1023 as the inner
length (plane, row or channel count) and 49-value planes (the 7x7 maps of ResNet's
last stage: 3 full AVX-512 vectors and a 1-value tail per plane).

Each kernel call and its error bounds come from ``test_kernels`` (the builders of its
``KERNEL_CASES``, bounds from ``_cases``), against the float64 NumPy reference rounded
once to the 16-bit dtype; in-place calls must give the same bits.
"""
import importlib

import _cases as K
import numpy as np
import pytest
import test_kernels as TK

LENGTHS = (1, 3, 15, 16, 17, 31, 33, 1023)
# (N, C, S): S is the plane/row length (channels-first, rows), C the row length of the
# channels-last kernels; both run through every tail length, plus 49-value planes
SHAPES = ([(2, 3, n) for n in LENGTHS] + [(2, n, 5) for n in LENGTHS if n > 1]
          + [(3, 64, 49)])
LEVELS = ("baseline", "avx2", "avx512")


def _module(level):
    """The compiled kernels of one SIMD build, or a skip saying why it cannot run."""
    try:
        base = importlib.import_module("normkit.backends._cython_kernels")
    except ImportError as exc:
        pytest.skip(f"the Cython extension is not built: {exc}")
    if level == "baseline":
        return base
    if base._cpu_simd_level() < LEVELS.index(level):
        pytest.skip(f"this CPU does not run the {level} build")
    try:
        return importlib.import_module(f"normkit.backends._cython_kernels_{level}")
    except ImportError:
        pytest.skip(f"the {level} build was not made here (non-x86 or NORMKIT_NATIVE=1)")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "variant", "kind"), TK._table())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_half_kernel_tails(level, dtype, name, variant, kind, shape):
    be = _module(level)
    dtype = K.np_dtype(dtype)
    call = TK.KERNEL_CASES[name][0](shape, dtype, kind, variant, seed=sum(map(ord, name)))
    got = TK._run(be, name, call, f"{level} {name}[{variant}, {kind}, {shape}]")
    if call.out is not None and call.inplace:
        args = list(call.args)
        args[call.out] = args[0] = np.array(call.args[0], copy=True)
        again = TK._results(getattr(be, name), call, args)
        for a, b in zip(again, got, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{level} {name} in place")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_half_specials_in_every_lane(level, dtype):
    """NaN and +-Inf spread over a 1023-value plane (full vectors and the
    tail): the affine keeps NaN as NaN, Inf as Inf of the right sign, and the other
    values equal the reference's (the specials do not leak into their neighbours)."""
    be = _module(level)
    dt = K.np_dtype(dtype)
    x = K.make((1, 1, 1023), dt, seed=3).copy()
    x[0, 0, 5::37] = np.nan
    x[0, 0, 11::41] = np.inf
    x[0, 0, 13::43] = -np.inf
    x[0, 0, 1022] = np.nan                       # the last lane of the tail
    one = np.ones((1, 1), np.float32)
    shift, scale, offset = one * 0.25, one * 2, one * 0.5
    out = np.empty_like(x)
    be.channels_first_affine(x, shift, scale, offset, out)
    want = ((x.astype(np.float64) - 0.25) * 2 + 0.5).astype(dt)
    K.assert_within(out, want, K.bound_elementwise(dt, (x.astype(np.float64) - 0.25) * 2, 0.5),
                    f"{level} {dtype} affine with NaN/Inf")
