/* C helpers of normkit's Cython kernels (_cython_kernels.pyx.tp): the build record,
   the SIMD width the module was compiled for, float32 moments with explicit vectors,
   the CPU check that picks a SIMD build, and OpenMP queries.

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

/* float32 moments in one pass with explicit vectors (GCC/clang vector extensions):
   s1 = sum(p - k), s2 = sum((p - k)^2) in double, 4 accumulators of NK_VW lanes each,
   i.e. the NK_ACC scheme written out. gcc's own vectorizer turns the same loop into a
   mix of scalar and vector code. Other compilers: two passes (NK_HAVE_VEC 0). */
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

static inline nk_vd nk_ldf(const float *p) {
    nk_vf v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, nk_vd);
}

static void nk_shifted_f32(const float *p, Py_ssize_t n, double k,
                           double *s1, double *s2) {
    const nk_vd kv = (nk_vd){0} + k;
    nk_vd a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    nk_vd b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    Py_ssize_t i = 0;
    for (; i + 4 * NK_VW <= n; i += 4 * NK_VW) {
        nk_vd d0 = nk_ldf(p + i) - kv;
        nk_vd d1 = nk_ldf(p + i + NK_VW) - kv;
        nk_vd d2 = nk_ldf(p + i + 2 * NK_VW) - kv;
        nk_vd d3 = nk_ldf(p + i + 3 * NK_VW) - kv;
        a0 += d0; a1 += d1; a2 += d2; a3 += d3;
        b0 += d0 * d0; b1 += d1 * d1; b2 += d2 * d2; b3 += d3 * d3;
    }
    nk_vd a = (a0 + a1) + (a2 + a3), b = (b0 + b1) + (b2 + b3);
    double u = 0.0, v = 0.0;
    for (int l = 0; l < NK_VW; l++) { u += a[l]; v += b[l]; }
    for (; i < n; i++) { double d = (double)p[i] - k; u += d; v += d * d; }
    *s1 = u;
    *s2 = v;
}
#else
#  define NK_HAVE_VEC 0
static void nk_shifted_f32(const float *p, Py_ssize_t n, double k,
                           double *s1, double *s2) {
    (void)p; (void)n; (void)k; *s1 = *s2 = 0.0;
}
#endif

/* Which of setup.py's builds this CPU (and OS) can run: 0 baseline, 1 AVX2,
   2 AVX-512 (F, CD, VL, DQ, BW: the flags that build is compiled with). */
static int nk_cpu_level(void) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2"))
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
