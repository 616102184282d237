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

The conversions are exact bit manipulations (no F16C/AVX512-BF16 needed; the two
narrowings are written in LLVM IR so that they run on 32-bit vector lanes), checked bit
for bit against NumPy's float16 and ml_dtypes' bfloat16 casts by
tests/test_numba_runtime.py:

* float16 -> float32: with F16C (checked at import; ``vcvtph2ps``) LLVM's ``fpext``,
  else F. Giesen's "half_to_float_fast2": the 15 magnitude bits shifted
  into a float32 and multiplied by 2**112 re-biases the exponent (and normalizes
  subnormals exactly); Inf/NaN exponents are then forced to all ones. NaN payloads are
  kept, as NumPy does.
* float32 -> float16: with F16C LLVM's ``fptrunc`` (``vcvtps2ph``), which equals
  NumPy's cast except that it quiets a signalling NaN; the kernels store only results
  of arithmetic (never a signalling NaN), ``convert`` adds a select that gives it
  NumPy's bits (``_st_exact``). Without F16C,
  Giesen's "float_to_half_fast3_rtne" made branch-free: normal
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

import numba
import numpy as np
from llvmlite import binding as llvm
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


def _host_has_f16c():
    """F16C usable? Only when Numba compiles for this host's CPU (NUMBA_CPU_NAME unset:
    a portable 'generic' build must not depend on it) and the host has it. Numba keys
    its cache by CPU name and features, so the choice is never loaded elsewhere."""
    if numba.config.CPU_NAME:
        return False
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except RuntimeError:   # features unknown on this platform
        return False


_F16C = _host_has_f16c()


@intrinsic
def _f16_to_f32_f16c(typingctx, h):
    """float16 bits -> float32 by LLVM's ``fpext half`` (one vcvtph2ps with F16C). Exact;
    it quiets a signalling NaN (the software path keeps its payload as NumPy does)."""
    if h != types.int16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.int16), codegen


@njit(**_JIT)
def _f16_to_f32(h):
    """float16 bits (int16 storage) -> float32, exact."""
    u = _U(np.uint16(h))
    o = _bits_f32((u & _U(0x7FFF)) << _U(13)) * _F16_MAGIC
    ob = _f32_bits(o)
    ob = ob | _U(0x7F800000) if o >= _F16_WAS_INFNAN else ob
    return _bits_f32(ob | ((u & _U(0x8000)) << _U(16)))


@intrinsic
def _f32_to_f16(typingctx, f):
    """float32 -> float16 bits (int16), round to nearest even, overflow to +-Inf.

    Written in LLVM IR because it needs 32-bit integer arithmetic that wraps: Numba
    widens small integers to 64 bits, which halves the vector width of this loop."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32, f32 = ir.IntType(32), ir.FloatType()

        def k(v):
            return ir.Constant(i32, v & 0xFFFFFFFF)

        def below(x, v):
            return builder.icmp_unsigned("<", x, k(v))
        b = builder.bitcast(args[0], i32)
        sign = builder.and_(b, k(0x80000000))
        a = builder.xor(b, sign)                                  # |f| bits
        # normal result: re-bias the exponent, add 0xfff + (lowest kept bit), shift
        odd = builder.and_(builder.lshr(a, k(13)), k(1))
        normal = builder.lshr(builder.add(builder.add(a, k(((15 - 127) << 23) + 0xFFF)), odd),
                              k(13))
        # subnormal (or zero) result: one float add of 0.5 rounds RNE at bit 2**-24
        added = builder.fadd(builder.bitcast(a, f32), ir.Constant(f32, 0.5))
        sub = builder.sub(builder.bitcast(added, i32), k(126 << 23))
        # Inf, or NaN keeping its top payload bits (as NumPy), never turned into Inf
        m = builder.lshr(builder.and_(a, k(0x7FFFFF)), k(13))
        nan = builder.or_(builder.or_(k(0x7C00), m),
                          builder.zext(builder.icmp_unsigned("==", m, k(0)), i32))
        big = builder.select(below(a, 0x7F800001), k(0x7C00), nan)
        o = builder.select(below(a, 113 << 23), sub, normal)
        o = builder.select(below(a, (127 + 16) << 23), o, big)
        return builder.trunc(builder.or_(o, builder.lshr(sign, k(16))), ir.IntType(16))
    return types.int16(types.float32), codegen


@intrinsic
def _f32_to_f16_f16c(typingctx, f):
    """float32 -> float16 bits (int16) by LLVM's ``fptrunc`` to half (one vcvtps2ph with
    F16C: RNE, overflow to Inf, subnormals exact): the kernels' store. Bit for bit
    NumPy's cast for every input but a *signalling* NaN, which the hardware quiets
    (NumPy keeps the quiet bit clear). The kernels only store results of arithmetic,
    and x86 arithmetic never returns a signalling NaN, so no fix-up runs per element
    (it cost ~10 vector instructions per 8 values, as many as the rest of the loop)."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(types.float32), codegen


@intrinsic
def _f32_to_f16_f16c_exact(typingctx, f):
    """``_f32_to_f16_f16c`` plus a select that gives a signalling NaN NumPy's bits
    (``0x7c00 | m >> 13``, 0x7c01 if that reads as Inf): every input narrows as NumPy's
    cast does (``convert``, for a raw float32 that may be a signalling NaN)."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32, i16 = ir.IntType(32), ir.IntType(16)

        def k(v):
            return ir.Constant(i32, v)
        hw = builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), i16)
        b = builder.bitcast(args[0], i32)
        m = builder.lshr(builder.and_(b, k(0x7FFFFF)), k(13))
        nan = builder.or_(builder.or_(k(0x7C00), m),
                          builder.zext(builder.icmp_unsigned("==", m, k(0)), i32))
        nan = builder.or_(nan, builder.and_(builder.lshr(b, k(16)), k(0x8000)))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(is_nan, builder.trunc(nan, i16), hw)
    return types.int16(types.float32), codegen


# ============================================================ bfloat16
@njit(**_JIT)
def _bf16_to_f32(h):
    """bfloat16 bits (uint16 storage) -> float32, exact."""
    return _bits_f32(_U(h) << _U(16))


@intrinsic
def _f32_to_bf16(typingctx, f):
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN -> quiet NaN 0x7fc0
    with its sign (as ml_dtypes). In LLVM IR for 32-bit lanes, as ``_f32_to_f16``."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)

        def k(v):
            return ir.Constant(i32, v)
        b = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(b, k(16)), k(1))
        rounded = builder.lshr(builder.add(builder.add(b, k(0x7FFF)), odd), k(16))
        nan = builder.or_(builder.and_(builder.lshr(b, k(16)), k(0x8000)), k(0x7FC0))
        is_nan = builder.icmp_unsigned(">", builder.and_(b, k(0x7FFFFFFF)), k(0x7F800000))
        return builder.trunc(builder.select(is_nan, nan, rounded), ir.IntType(16))
    return types.uint16(types.float32), codegen


# ============================================================ the kernels' accessors
def _ld(a, i):
    """a[i] in the compute type (pure-Python stand-in; the jitted one is the overload)."""
    raise NotImplementedError("only callable from jitted code")


def _st(a, i, v):
    raise NotImplementedError("only callable from jitted code")


def _cv(a, v):
    raise NotImplementedError("only callable from jitted code")


def _round_as(a, v):
    """float32 ``v`` rounded to the storage dtype of ``a`` and widened back (v itself
    for float32/float64 data): a shift that 16-bit values minus it are exact in float32."""
    raise NotImplementedError("only callable from jitted code")


def _st_exact(a, i, v):
    """``_st`` that also narrows a signalling NaN as NumPy (``convert`` only)."""
    raise NotImplementedError("only callable from jitted code")


@overload(_ld, jit_options={"error_model": "numpy"})
def _ov_ld(a, i):
    if a.dtype == types.int16 and _F16C:
        return lambda a, i: _f16_to_f32_f16c(a[i])
    if a.dtype == types.int16:
        return lambda a, i: _f16_to_f32(a[i])
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    return lambda a, i: a[i]


@overload(_st, jit_options={"error_model": "numpy"})
def _ov_st(a, i, v):
    if a.dtype == types.int16 and _F16C:
        def st_f16c(a, i, v):
            a[i] = _f32_to_f16_f16c(np.float32(v))
        return st_f16c
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


@overload(_st_exact, jit_options={"error_model": "numpy"})
def _ov_st_exact(a, i, v):
    if a.dtype == types.int16 and _F16C:
        def st_f16c_exact(a, i, v):
            a[i] = _f32_to_f16_f16c_exact(np.float32(v))
        return st_f16c_exact
    return lambda a, i, v: _st(a, i, v)


@overload(_round_as, jit_options={"error_model": "numpy"})
def _ov_round_as(a, v):
    if a.dtype == types.int16:
        return lambda a, v: _f16_to_f32(_f32_to_f16(np.float32(v)))
    if a.dtype == types.uint16:
        return lambda a, v: _bf16_to_f32(_f32_to_bf16(np.float32(v)))
    return lambda a, v: v


@overload(_cv, jit_options={"error_model": "numpy"})
def _ov_cv(a, v):
    if a.dtype in _STORAGE_16:
        return lambda a, v: np.float32(v)
    if a.dtype == types.float32:
        return lambda a, v: np.float32(v)
    return lambda a, v: np.float64(v)


def _wide_buf(a, n):
    """A float32 buffer of n values for rows of 16-bit ``a`` (an empty array otherwise)."""
    raise NotImplementedError("only callable from jitted code")


def _wide(a, buf):
    """1-D ``a`` widened into ``buf`` (16-bit data), or ``a`` itself (float32/float64)."""
    raise NotImplementedError("only callable from jitted code")


@overload(_wide_buf, jit_options={"error_model": "numpy"})
def _ov_wide_buf(a, n):
    if a.dtype in _STORAGE_16:
        return lambda a, n: np.empty(n, np.float32)
    return lambda a, n: np.empty(0, a.dtype)


@overload(_wide, jit_options={"error_model": "numpy"})
def _ov_wide(a, buf):
    """Widening a short row (in L1) once costs less than widening it in each of the 2-3
    passes over it: the float64 reductions then convert float32 -> float64 only, as
    for float32 data (vcvtph2ps + vcvtps2pd per 4 values was their bottleneck)."""
    if a.dtype in _STORAGE_16:
        def wide(a, buf):
            for i in range(a.shape[0]):
                buf[i] = _ld(a, i)
            return buf
        return wide
    return lambda a, buf: a


@njit(**_JIT)
def convert(src, dst):
    """dst[i] = src[i] through ``_ld``/``_st_exact`` (1-D arrays): the conversions alone,
    for tests (float32 -> int16/uint16 narrows, int16/uint16 -> float32 widens)."""
    for i in range(src.shape[0]):
        _st_exact(dst, i, _ld(src, i))


@njit(**_JIT)
def narrow_product(src, one, dst):
    """dst[i] = src[i] * one narrowed by the kernels' ``_st``: the store of an arithmetic
    result (never a signalling NaN), for tests."""
    for i in range(src.shape[0]):
        _st(dst, i, src[i] * one)


@njit(**_JIT)
def widen_f16_software(src, dst):
    """dst[i] = float16 bits src[i] widened by the software path (tested on every
    machine, also where ``_ld`` uses F16C)."""
    for i in range(src.shape[0]):
        dst[i] = _f16_to_f32(src[i])


@njit(**_JIT)
def narrow_f16_software(src, dst):
    """dst[i] = float32 src[i] narrowed to float16 bits by the software path (tested on
    every machine, also where ``_st`` uses F16C)."""
    for i in range(src.shape[0]):
        dst[i] = _f32_to_f16(src[i])
