"""Load and store of kernel data in its storage dtype, for the Numba kernels.

Numba has no float16 on the CPU and no bfloat16 at all, so ``numba_backend`` passes
16-bit data to the kernels as a same-bits view (zero copy): float16 as ``int16`` and
bfloat16 as ``uint16``. The kernels never index data arrays directly; they call

* ``_ld(a, i)``: element ``i`` of ``a`` in its *compute type* (float32 for 16-bit
  data, the array's own type for float32/float64), widened exactly;
* ``_st(a, i, v)``: store ``v`` into ``a[i]``, narrowed once with round-to-nearest-
  even (16-bit: ``v`` is first rounded to float32, the contract's compute type);
* ``_cv(a, v)``: ``v`` cast to the compute type of ``a`` (for constants).

Each is an ``overload`` picked by the array's dtype at compile time, so a kernel is
typed once per storage dtype and its loops hold no dtype branch: float32/float64
loops are exactly what they were, and the 16-bit ones add a few integer/float ops per
element, all branch-free (``select``) so that LLVM still vectorizes them.

The conversions are exact bit manipulations (no F16C/AVX512-BF16 needed), checked bit
for bit against NumPy's float16 and ml_dtypes' bfloat16 casts by
tests/test_numba_runtime.py:

* float16 -> float32: F. Giesen's "half_to_float_fast2": the 15 magnitude bits shifted
  into a float32 and multiplied by 2**112 re-biases the exponent (and normalizes
  subnormals exactly); Inf/NaN exponents are then forced to all ones. NaN payloads are
  kept, as NumPy does.
* float32 -> float16: Giesen's "float_to_half_fast3_rtne" made branch-free: normal
  results add the exponent re-bias and the RNE rounding bias ``0xfff + odd`` before
  the shift (a carry into the exponent gives the next binade, or Inf above 65504);
  subnormal results come from one float32 addition of a magic number, which rounds
  RNE in hardware; |x| >= 65536 is Inf; NaN keeps its top payload bits as NumPy's
  cast does (``0x7c00 | m >> 13``, made 0x7c01 if that would read as Inf).
* bfloat16 <-> float32: widening is ``bits << 16``; narrowing adds
  ``0x7fff + (bit 16)`` and keeps the top half (RNE; overflow carries into Inf);
  NaN becomes the quiet NaN 0x7fc0 with its sign, as ml_dtypes does.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_JIT = {"cache": True, "error_model": "numpy"}
_STORAGE_16 = (types.int16, types.uint16)   # float16 / bfloat16 views


# ============================================================ bit casts (no NumPy views
# exist for scalars in Numba; these are one LLVM bitcast each)
@intrinsic
def _f32_bits(typingctx, f):
    """float32 -> its bits as uint32."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    """uint32 bits -> the float32 they encode (any integer: the low 32 bits)."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        width = u.bitwidth
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(u), codegen


# ============================================================ float16
_U = np.uint32
_F16_MAGIC = np.float32(2.0 ** 112)               # 2**(127 - 15): exponent re-bias
_F16_WAS_INFNAN = np.float32(2.0 ** 16)           # 0x1f << 23 times the magic
_F16_DENORM_MAGIC = np.float32(0.5)               # bits ((127-15)+(23-10)+1) << 23
_F16_DENORM_MAGIC_BITS = _U(126 << 23)


@njit(**_JIT)
def _f16_to_f32(h):
    """float16 bits (int16 storage) -> float32, exact."""
    u = _U(np.uint16(h))
    o = _bits_f32((u & _U(0x7FFF)) << _U(13)) * _F16_MAGIC
    ob = _f32_bits(o)
    ob = ob | _U(0x7F800000) if o >= _F16_WAS_INFNAN else ob
    return _bits_f32(ob | ((u & _U(0x8000)) << _U(16)))


@njit(**_JIT)
def _f32_to_f16(f):
    """float32 -> float16 bits (int16), round to nearest even, overflow to +-Inf."""
    b = _f32_bits(f)
    sign = b & _U(0x80000000)
    a = b ^ sign                                                  # |f| bits
    normal = (a + _U(((15 - 127) << 23) + 0xFFF) + ((a >> _U(13)) & _U(1))) >> _U(13)
    sub = _f32_bits(_bits_f32(a) + _F16_DENORM_MAGIC) - _F16_DENORM_MAGIC_BITS
    m = (a & _U(0x7FFFFF)) >> _U(13)
    nan = _U(0x7C00) | m | _U(m == _U(0))
    big = nan if a > _U(0x7F800000) else _U(0x7C00)
    o = sub if a < _U(113 << 23) else normal
    o = big if a >= _U((127 + 16) << 23) else o
    return np.int16(np.uint16(o | (sign >> _U(16))))


# ============================================================ bfloat16
@njit(**_JIT)
def _bf16_to_f32(h):
    """bfloat16 bits (uint16 storage) -> float32, exact."""
    return _bits_f32(_U(h) << _U(16))


@njit(**_JIT)
def _f32_to_bf16(f):
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN -> quiet NaN."""
    b = _f32_bits(f)
    r = (b + _U(0x7FFF) + ((b >> _U(16)) & _U(1))) >> _U(16)
    nan = ((b >> _U(16)) & _U(0x8000)) | _U(0x7FC0)
    return np.uint16(nan if (b & _U(0x7FFFFFFF)) > _U(0x7F800000) else r)


# ============================================================ the kernels' accessors
def _ld(a, i):
    """a[i] in the compute type (pure-Python stand-in; the jitted one is the overload)."""
    raise NotImplementedError("only callable from jitted code")


def _st(a, i, v):
    raise NotImplementedError("only callable from jitted code")


def _cv(a, v):
    raise NotImplementedError("only callable from jitted code")


@overload(_ld, jit_options={"error_model": "numpy"})
def _ov_ld(a, i):
    if a.dtype == types.int16:
        return lambda a, i: _f16_to_f32(a[i])
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    return lambda a, i: a[i]


@overload(_st, jit_options={"error_model": "numpy"})
def _ov_st(a, i, v):
    if a.dtype == types.int16:
        def st_f16(a, i, v):
            a[i] = _f32_to_f16(np.float32(v))
        return st_f16
    if a.dtype == types.uint16:
        def st_bf16(a, i, v):
            a[i] = _f32_to_bf16(np.float32(v))
        return st_bf16

    def st(a, i, v):
        a[i] = v
    return st


@overload(_cv, jit_options={"error_model": "numpy"})
def _ov_cv(a, v):
    if a.dtype in _STORAGE_16:
        return lambda a, v: np.float32(v)
    if a.dtype == types.float32:
        return lambda a, v: np.float32(v)
    return lambda a, v: np.float64(v)


@njit(**_JIT)
def convert(src, dst):
    """dst[i] = src[i] through ``_ld``/``_st`` (1-D arrays): the conversions alone, for
    tests (float32 -> int16/uint16 narrows, int16/uint16 -> float32 widens)."""
    for i in range(src.shape[0]):
        _st(dst, i, _ld(src, i))
