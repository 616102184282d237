/* C helpers of normkit's Cython kernels (_cython_kernels.pyx.tp): the build record,
   the SIMD width the module was compiled for, the float16/bfloat16 conversions, block
   moments with explicit vectors, the CPU check that picks a SIMD build, and OpenMP
   queries.

   Included by the rendered .pyx after Python.h (so Py_ssize_t is defined). setup.py
   puts this directory and the directory of the generated normkit_build_config.h on
   the include path. */
#ifndef NK_HELPERS_H
#define NK_HELPERS_H

#include <string.h>

/* What setup.py built: it writes normkit_build_config.h next to the objects. */
#if defined(__has_include)
#  if __has_include("normkit_build_config.h")
#    include "normkit_build_config.h"
#  endif
#endif
#ifndef NORMKIT_BUILD_CFLAGS
#  define NORMKIT_BUILD_CFLAGS ""
#  define NORMKIT_BUILD_LDFLAGS ""
#  define NORMKIT_BUILD_OPENMP_NOTE "unknown: not built by normkit's setup.py"
#  define NORMKIT_BUILD_COMPILER ""
#  define NORMKIT_BUILD_CYTHON ""
#endif

/* The vector instructions this module was compiled for. */
#if defined(__AVX512F__)
#  define NK_SIMD "avx512"
#elif defined(__AVX2__)
#  define NK_SIMD "avx2"
#elif defined(__AVX__)
#  define NK_SIMD "avx"
#elif defined(__SSE2__) || defined(_M_X64)
#  define NK_SIMD "sse2"
#elif defined(__ARM_NEON) || defined(__aarch64__)
#  define NK_SIMD "neon"
#else
#  define NK_SIMD "scalar"
#endif

/* Independent accumulators per reduction: enough vector registers' worth to hide the
   add latency (4 registers of 2, 4 or 8 doubles). More spill with SSE2 and ran
   slower; fewer leave AVX2 latency-bound. */
#if defined(__AVX512F__)
#  define NK_ACC 32
#elif defined(__AVX2__)
#  define NK_ACC 16
#else
#  define NK_ACC 8
#endif

/* ---------------------------------------------------------------- 16-bit storage
   float16 (IEEE binary16, numpy.float16) and bfloat16 (ml_dtypes.bfloat16) are read
   and written as their bits. Widening is exact; narrowing rounds to nearest even,
   bit for bit as NumPy's float32 -> float16 cast and ml_dtypes' float32 -> bfloat16
   cast (NaN stays NaN, float16 overflow gives +-Inf). Written without branches --
   selects as bit masks -- so gcc vectorizes loops that call them, at every SIMD
   level, without -ffast-math. */
#include <stdint.h>
#if defined(__F16C__) || defined(__AVX512F__)
#  include <immintrin.h>
#endif
typedef uint16_t nk_f16;
typedef uint16_t nk_bf16;

static inline uint32_t nk_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float nk_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
/* c ? a : b as masks (a ternary here is turned into a branch, which stops gcc's
   vectorizer: the float operations next to it may trap) */
static inline uint32_t nk_sel(int c, uint32_t a, uint32_t b) {
    uint32_t m = 0u - (uint32_t)(c != 0);
    return (a & m) | (b & ~m);
}

static inline float nk_f16_to_f32(nk_f16 h) {
    uint32_t em = h & 0x7fffu;                       /* exponent and mantissa */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t normal = (em << 13) + (112u << 23);      /* rebias 15 -> 127 */
    uint32_t special = normal + (112u << 23);         /* Inf/NaN: exponent 255, payload kept */
    /* subnormal (or zero): em * 2^-24, exact in float32 */
    uint32_t sub = nk_bits((float)(int32_t)em * 5.9604644775390625e-8f);
    return nk_float(sign | nk_sel(em >= 0x7c00u, special, nk_sel(em < 0x0400u, sub, normal)));
}

static inline nk_f16 nk_f32_to_f16(float f) {
    /* F. Giesen's float_to_half_fast3_rtne, with NumPy's NaN rule (payload kept,
       never turned into Inf) */
    uint32_t u = nk_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    /* below 2^-14 (float16 subnormal or zero): adding 0.5 lines the 10 mantissa bits
       up at the bottom of the float and the FPU rounds them to nearest even */
    uint32_t sub = nk_bits(nk_float(a) + 0.5f) - 0x3f000000u;
    uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    uint32_t payload = (a >> 13) & 0x3ffu;
    uint32_t nan = 0x7c00u | payload | (uint32_t)(payload == 0);
    uint32_t big = nk_sel(a > 0x7f800000u, nan, 0x7c00u);     /* NaN, or Inf/overflow */
    return (nk_f16)(sign | nk_sel(a >= 0x47800000u, big, nk_sel(a < 0x38800000u, sub, normal)));
}

static inline float nk_bf16_to_f32(nk_bf16 h) { return nk_float((uint32_t)h << 16); }

static inline nk_bf16 nk_f32_to_bf16(float f) {
    /* round to nearest even on the top 16 bits; NaN becomes the quiet NaN 0x7fc0 with
       its sign, as ml_dtypes does */
    uint32_t u = nk_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
    return (nk_bf16)nk_sel((u & 0x7fffffffu) > 0x7f800000u, nan, rounded);
}

/* Moments of a block in one pass with explicit vectors (GCC/clang vector extensions):
   s1 = sum(p - k), s2 = sum((p - k)^2) in double, 4 accumulators of NK_VW lanes each,
   i.e. the NK_ACC scheme written out. gcc's own vectorizer turns the same loop into a
   mix of scalar and vector code. One body (NK_SHIFTED) for float32, float16 and
   bfloat16 data; they differ in how NK_VW values are loaded and widened. Other
   compilers: two passes (NK_HAVE_VEC 0). */
#if !defined(NK_NO_VEC) && ((defined(__GNUC__) && __GNUC__ >= 9) || defined(__clang__))
#  define NK_HAVE_VEC 1
#  if defined(__AVX512F__)
#    define NK_VW 8
#  elif defined(__AVX2__)
#    define NK_VW 4
#  else
#    define NK_VW 2
#  endif
typedef double nk_vd __attribute__((vector_size(NK_VW * 8)));
typedef float nk_vf __attribute__((vector_size(NK_VW * 4)));
typedef uint32_t nk_vu __attribute__((vector_size(NK_VW * 4)));
typedef uint16_t nk_vh __attribute__((vector_size(NK_VW * 2)));
typedef int32_t nk_vi __attribute__((vector_size(NK_VW * 4)));

/* float -> double and uint16 -> uint32 lanes: the intrinsics where the build has
   them (gcc lowers __builtin_convertvector of 256/512-bit vectors to halves and
   inserts, ~2x the instructions) */
static inline nk_vd nk_vf_to_vd(nk_vf v) {
#if defined(__AVX512F__) && NK_VW == 8
    return (nk_vd)_mm512_cvtps_pd((__m256)v);
#elif defined(__AVX__) && NK_VW == 4
    return (nk_vd)_mm256_cvtps_pd((__m128)v);
#else
    return __builtin_convertvector(v, nk_vd);
#endif
}

static inline nk_vd nk_vld_f32(const float *p) {
    nk_vf v;
    memcpy(&v, p, sizeof v);
    return nk_vf_to_vd(v);
}

static inline nk_vu nk_vld_u16(const uint16_t *p) {
#if defined(__AVX2__) && NK_VW == 8
    return (nk_vu)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__) && NK_VW == 4
    return (nk_vu)_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    nk_vh h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, nk_vu);
#endif
}

static inline nk_vd nk_vld_bf16(const nk_bf16 *p) {
    return nk_vf_to_vd((nk_vf)(nk_vld_u16(p) << 16));
}

/* float16 -> float32 on NK_VW lanes: F16C where the build has it (NaN comes out
   quiet, which changes no statistic), else nk_f16_to_f32's formula on vectors */
static inline nk_vd nk_vld_f16(const nk_f16 *p) {
    nk_vf v;
#if defined(__F16C__) && NK_VW == 8
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    memcpy(&v, &f, sizeof v);
#elif defined(__F16C__) && NK_VW == 4
    __m128 f = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p));
    memcpy(&v, &f, sizeof v);
#else
    nk_vu h = nk_vld_u16(p);
    nk_vu em = h & 0x7fffu;
    nk_vu normal = (em << 13) + (112u << 23);
    nk_vu special = normal + (112u << 23);
    nk_vu sub = (nk_vu)(__builtin_convertvector((nk_vi)em, nk_vf) * 5.9604644775390625e-8f);
    nk_vu is_special = (nk_vu)(em >= 0x7c00u), is_sub = (nk_vu)(em < 0x0400u);
    nk_vu r = (special & is_special) | (~is_special & ((sub & is_sub) | (normal & ~is_sub)));
    v = (nk_vf)(r | ((h & 0x8000u) << 16));
#endif
    return nk_vf_to_vd(v);
}

#define NK_SHIFTED(NAME, T, VLOAD, WIDEN)                                          \
static void NAME(const T *p, Py_ssize_t n, double k, double *s1, double *s2) {    \
    const nk_vd kv = (nk_vd){0} + k;                                               \
    nk_vd a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                  \
    nk_vd b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};                                  \
    Py_ssize_t i = 0;                                                              \
    for (; i + 4 * NK_VW <= n; i += 4 * NK_VW) {                                   \
        nk_vd d0 = VLOAD(p + i) - kv;                                              \
        nk_vd d1 = VLOAD(p + i + NK_VW) - kv;                                      \
        nk_vd d2 = VLOAD(p + i + 2 * NK_VW) - kv;                                  \
        nk_vd d3 = VLOAD(p + i + 3 * NK_VW) - kv;                                  \
        a0 += d0; a1 += d1; a2 += d2; a3 += d3;                                    \
        b0 += d0 * d0; b1 += d1 * d1; b2 += d2 * d2; b3 += d3 * d3;                \
    }                                                                              \
    nk_vd a = (a0 + a1) + (a2 + a3), b = (b0 + b1) + (b2 + b3);                    \
    double u = 0.0, v = 0.0;                                                       \
    for (int l = 0; l < NK_VW; l++) { u += a[l]; v += b[l]; }                      \
    for (; i < n; i++) { double d = (double)WIDEN(p[i]) - k; u += d; v += d * d; } \
    *s1 = u;                                                                       \
    *s2 = v;                                                                       \
}
#else
#  define NK_HAVE_VEC 0
#  define NK_SHIFTED(NAME, T, VLOAD, WIDEN)                                        \
static void NAME(const T *p, Py_ssize_t n, double k, double *s1, double *s2) {    \
    (void)p; (void)n; (void)k; *s1 = *s2 = 0.0;                                    \
}
#endif
NK_SHIFTED(nk_shifted_f32, float, nk_vld_f32, )
NK_SHIFTED(nk_shifted_f16, nk_f16, nk_vld_f16, nk_f16_to_f32)
NK_SHIFTED(nk_shifted_bf16, nk_bf16, nk_vld_bf16, nk_bf16_to_f32)

/* The C kernels of the 16-bit rows: elementwise passes with conversions in registers,
   fused backward sums, channels-last column sums. */
#include "nk_half.h"

/* Which of setup.py's builds this CPU (and OS) can run: 0 baseline, 1 AVX2 + F16C,
   2 AVX-512 (F, CD, VL, DQ, BW) + F16C: the flags those builds are compiled with. */
static int nk_cpu_level(void) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c"))
        return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512bw"))
        return 2;
    return 1;
#else
    return 0;
#endif
}

/* The compiler's own word on OpenMP: _OPENMP is defined iff -fopenmp was used. */
#ifdef _OPENMP
#  include <omp.h>
#  define NK_OPENMP_VERSION _OPENMP
static int nk_omp_max_threads(void) { return omp_get_max_threads(); }
#else
#  define NK_OPENMP_VERSION 0
static int nk_omp_max_threads(void) { return 1; }
#endif

#endif /* NK_HELPERS_H */
