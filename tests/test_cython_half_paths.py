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
# channels-last kernels; both run through every tail length, plus 49-value planes and
# channels-last rows longer than nk_half.h's NK_CL_CHUNK (2048 channels per block of
# parameters: here 2048, 2048 and 17)
SHAPES = ([(2, 3, n) for n in LENGTHS] + [(2, n, 5) for n in LENGTHS if n > 1]
          + [(3, 64, 49), (2, 4113, 3)])
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


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_streaming_stores_give_the_same_bits(level, dtype):
    """Outputs of at least ``stream_store_min_bytes`` (the cache's size) are written
    with non-temporal stores in the channels-first affine pass (x86-64): a head up to
    the vector alignment, streamed vectors, a tail. Forced on for every size here, the
    bits equal the plain stores' for every plane length around the vector widths, at
    every alignment of out (0-15 values off a 64-byte boundary), with in-place calls,
    through GroupNorm's long-block path and through training BatchNorm's fused kernel."""
    be = _module(level)
    if be.info()["stream_store_min_bytes"] is None:
        pytest.skip("no non-temporal stores in this build (not x86-64)")
    dt = K.np_dtype(dtype)
    rng = np.random.default_rng(23)
    old = be._set_stream_min(1 << 62)
    try:
        for s in LENGTHS + (49, 4097):
            x = (rng.standard_normal((2, 3, s)) * 3 + 1).astype(dt)
            x[0, 0, 0] = np.nan
            coef = [rng.standard_normal((1, 3)).astype(np.float32) for _ in range(3)]
            buf = np.empty(x.size + 64, dt)
            start = (-buf.ctypes.data % 64) // 2
            for off in range(16):
                out = buf[start + off:start + off + x.size].reshape(x.shape)
                be._set_stream_min(1 << 62)
                be.channels_first_affine(x, *coef, out)
                want = out.copy()
                be._set_stream_min(0)
                out[...] = 0
                be.channels_first_affine(x, *coef, out)
                np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16),
                                              err_msg=f"{level} S={s} offset {off}")
            inplace = x.copy()
            be.channels_first_affine(inplace, *coef, inplace)
            np.testing.assert_array_equal(inplace.view(np.uint16), want.view(np.uint16))
        # GroupNorm with one long block per (sample, group) runs the affine pass over
        # the whole output (coefficients per channel)
        # (two threads: one thread runs the blocks one by one instead)
        x = rng.standard_normal((1, 4, 70001)).astype(dt)
        w, b = np.ones(4, np.float32), np.zeros(4, np.float32)
        got = [None, None]
        threads = be.get_num_threads()
        be.set_num_threads(2)
        try:
            for i, limit in enumerate((1 << 62, 0)):
                be._set_stream_min(limit)
                out = np.empty_like(x)
                be.channels_first_group_forward(x, 2, w, b, 1e-5, out)
                got[i] = out
        finally:
            be.set_num_threads(threads)
        np.testing.assert_array_equal(got[0].view(np.uint16), got[1].view(np.uint16))
        # training BatchNorm's fused kernel streams each channel's planes (odd plane
        # lengths: unaligned heads and tails), in place too
        for s in (49, 1023, 4097):
            x = (rng.standard_normal((3, 5, s)) * 3 + 1).astype(dt)
            x[1, 2, 7] = np.nan
            w, b = (rng.standard_normal(5).astype(np.float32) for _ in range(2))
            got = []
            for limit in (1 << 62, 0, 0):
                be._set_stream_min(limit)
                out = np.empty_like(x) if len(got) < 2 else x.copy()
                got.append(be.channels_first_batch_forward(x if len(got) < 2 else out, w,
                                                           b, 1e-5, out) + (out,))
            for g in got[1:]:
                np.testing.assert_array_equal(g[2].view(np.uint16),
                                              got[0][2].view(np.uint16), err_msg=f"S={s}")
                np.testing.assert_array_equal(g[0], got[0][0])
    finally:
        be._set_stream_min(old)
