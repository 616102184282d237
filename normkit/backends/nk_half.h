/* C kernels of normkit's Cython backend for float16/bfloat16 data (the rows of the
   dtype table with LD): included by nk_helpers.h after the conversions, NK_HAVE_VEC,
   the double vectors (nk_vd, NK_VW) and their loads. */
#ifndef NK_HALF_H
#define NK_HALF_H
#include <float.h>
#include <stdio.h>         /* fopen: the L3 size from sysfs */
#if defined(__unix__) || defined(__APPLE__)
#  include <unistd.h>       /* sysconf: the cache size for nk_nt_min_bytes */
#endif

/* ---------------------------------------------------------------- 16-bit elementwise
   The elementwise passes on float16/bfloat16 data load NK_FW values, widen them in
   registers, compute in float32 and narrow once on the store: no float32 buffer in
   between (a block buffer cost three passes over L1 and ran at ~0.85-1.2x the float32
   time). float16 converts with F16C in the AVX2/AVX-512 builds (round to nearest
   even, the bits of nk_f32_to_f16 for every value arithmetic produces; hardware
   quiets a signalling NaN), else -- and bfloat16 always -- with nk_helpers' bit
   formulas on vectors. A tail of w < NK_FW values is loaded zero-padded and stored
   partially (AVX-512: masked loads/stores), so it runs the same arithmetic as the
   full vectors. Without GCC vector extensions (NK_HAVE_VEC 0) a "vector" is one float. */
#if NK_HAVE_VEC
/* float lanes: 16 (AVX-512), 8 (AVX2), 4 -- the double vectors' NK_VW, twice */
#  define NK_FW (2 * NK_VW)
typedef float nk_wf __attribute__((vector_size(NK_FW * 4)));
typedef uint32_t nk_wu __attribute__((vector_size(NK_FW * 4)));
typedef int32_t nk_wi __attribute__((vector_size(NK_FW * 4)));
typedef uint16_t nk_wh __attribute__((vector_size(NK_FW * 2)));

/* w <= NK_FW 16-bit values (the rest zero) / the first w lanes stored */
static inline nk_wh nk_h_ld(const uint16_t *p, Py_ssize_t w) {
    nk_wh h = {0};
    if (w == NK_FW)
        memcpy(&h, p, sizeof h);
    else
#  if defined(__AVX512BW__) && defined(__AVX512VL__)
        h = (nk_wh)_mm256_maskz_loadu_epi16((__mmask16)((1u << w) - 1u), p);
#  else
        memcpy(&h, p, (size_t)w * 2);
#  endif
    return h;
}

static inline void nk_h_st(uint16_t *q, nk_wh h, Py_ssize_t w) {
    if (w == NK_FW)
        memcpy(q, &h, sizeof h);
    else
#  if defined(__AVX512BW__) && defined(__AVX512VL__)
        _mm256_mask_storeu_epi16(q, (__mmask16)((1u << w) - 1u), (__m256i)h);
#  else
        memcpy(q, &h, (size_t)w * 2);
#  endif
}

/* Non-temporal (streaming) stores, x86-64 only: a full vector of halves written
   around the caches (movntdq / movnti), for outputs too large to stay cached. They
   skip the read-for-ownership of each output line: a large elementwise pass on
   float16 moves 4 bytes per value instead of 6 (measured: 51 MB in and out, 2
   threads, 4.66 -> 3.32 ms). q must be aligned to the vector (sizeof(nk_wh)). */
#  if defined(__x86_64__) && defined(__SSE2__)
#    include <immintrin.h>
#    define NK_HAVE_NT 1
static inline void nk_h_st_nt(uint16_t *q, nk_wh h) {
#    if NK_FW == 16
    _mm256_stream_si256((__m256i *)q, (__m256i)h);
#    elif NK_FW == 8
    _mm_stream_si128((__m128i *)q, (__m128i)h);
#    else
    long long v;
    memcpy(&v, &h, sizeof v);
    _mm_stream_si64((long long *)q, v);
#    endif
}
#  endif
#endif
#ifndef NK_HAVE_NT
#  define NK_HAVE_NT 0
#endif
#if NK_HAVE_NT
#  define NK_IF_NT(...) __VA_ARGS__
#else
#  define NK_IF_NT(...)
#endif
/* Output size (bytes) from which the channels-first affine pass streams its stores:
   the last-level cache's size, 32 MiB where it is unknown -- an output that large
   cannot stay cached for the next layer anyway, while a smaller one would be pushed
   out of a cache it fits in. Linux's own description of the L3 (sysfs) comes first:
   glibc's sysconf derives it from CPUID, which a hypervisor may report wrongly (seen:
   256 MiB on an EPYC virtual machine whose L3 is 32 MiB, so no output was streamed).
   _cython_kernels sets it at import (and tests lower it). */
static Py_ssize_t nk_nt_min_bytes = (Py_ssize_t)32 << 20;
static long nk_sysfs_l3_bytes(void) {
#if defined(__linux__)
    long level = 0, size = 0;
    char unit = 0;
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/level", "r");
    if (f == NULL) return -1;
    if (fscanf(f, "%ld", &level) != 1) level = 0;
    fclose(f);
    f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    if (f == NULL) return -1;
    if (fscanf(f, "%ld%c", &size, &unit) != 2) size = 0;
    fclose(f);
    if (level != 3 || size <= 0) return -1;
    return unit == 'K' ? size << 10 : unit == 'M' ? size << 20 : unit == 'G' ? size << 30 : -1;
#else
    return -1;
#endif
}
static void nk_nt_setup(void) {
    long l3 = nk_sysfs_l3_bytes();
#if defined(_SC_LEVEL3_CACHE_SIZE)
    if (l3 <= 0) l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    if (l3 > 0) nk_nt_min_bytes = (Py_ssize_t)l3;
}
#if NK_HAVE_VEC
/* w <= NK_FW float32 parameters (the rest zero) */
static inline nk_wf nk_ld_f32(const float *p, Py_ssize_t w) {
    nk_wf v = {0};
    if (w == NK_FW)
        memcpy(&v, p, sizeof v);
    else
#  if defined(__AVX512F__)
        v = (nk_wf)_mm512_maskz_loadu_ps((__mmask16)((1u << w) - 1u), p);
#  else
        memcpy(&v, p, (size_t)w * 4);
#  endif
    return v;
}

static inline void nk_st_f32(float *q, nk_wf v, Py_ssize_t w) {
    memcpy(q, &v, (size_t)w * 4);
}

static inline nk_wu nk_wsel(nk_wi c, nk_wu a, nk_wu b) {
    return (a & (nk_wu)c) | (b & ~(nk_wu)c);
}

/* uint16 <-> uint32 lanes (values < 2^16): intrinsics where the build has them, as
   for nk_vld_u16 */
static inline nk_wu nk_wh_to_wu(nk_wh h) {
#  if defined(__AVX512F__) && NK_FW == 16
    return (nk_wu)_mm512_cvtepu16_epi32((__m256i)h);
#  elif defined(__AVX2__) && NK_FW == 8
    return (nk_wu)_mm256_cvtepu16_epi32((__m128i)h);
#  else
    return __builtin_convertvector(h, nk_wu);
#  endif
}

static inline nk_wh nk_wu_to_wh(nk_wu u) {
#  if defined(__AVX512F__) && NK_FW == 16
    return (nk_wh)_mm512_cvtepi32_epi16((__m512i)u);
#  elif defined(__AVX2__) && NK_FW == 8
    __m256i p = _mm256_packus_epi32((__m256i)u, (__m256i)u);   /* per 128-bit lane */
    return (nk_wh)_mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08));
#  else
    return __builtin_convertvector(u, nk_wh);
#  endif
}

static inline nk_wf nk_cvt_f16(nk_wh h) {
#  if defined(__F16C__) && NK_FW == 16
    return (nk_wf)_mm512_cvtph_ps((__m256i)h);
#  elif defined(__F16C__) && NK_FW == 8
    return (nk_wf)_mm256_cvtph_ps((__m128i)h);
#  else
    nk_wu u = nk_wh_to_wu(h);                          /* nk_f16_to_f32 on vectors */
    nk_wu em = u & 0x7fffu;
    nk_wu normal = (em << 13) + (112u << 23);
    nk_wu sub = (nk_wu)(__builtin_convertvector((nk_wi)em, nk_wf) * 5.9604644775390625e-8f);
    nk_wu r = nk_wsel(em >= 0x7c00u, normal + (112u << 23), nk_wsel(em < 0x0400u, sub, normal));
    return (nk_wf)(r | ((u & 0x8000u) << 16));
#  endif
}

static inline nk_wh nk_cvt_to_f16(nk_wf v) {
#  if defined(__F16C__) && NK_FW == 16
    return (nk_wh)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT);
#  elif defined(__F16C__) && NK_FW == 8
    return (nk_wh)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
#  else
    nk_wu u = (nk_wu)v;                                 /* nk_f32_to_f16 on vectors */
    nk_wu sign = (u >> 16) & 0x8000u;
    nk_wu a = u & 0x7fffffffu;
    nk_wu sub = (nk_wu)((nk_wf)a + 0.5f) - 0x3f000000u;
    nk_wu normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    nk_wu payload = (a >> 13) & 0x3ffu;
    nk_wu nan = 0x7c00u | payload | ((nk_wu)(payload == 0) & 1u);
    nk_wu big = nk_wsel(a > 0x7f800000u, nan, (nk_wu){0} + 0x7c00u);
    nk_wu r = sign | nk_wsel(a >= 0x47800000u, big, nk_wsel(a < 0x38800000u, sub, normal));
    return nk_wu_to_wh(r);
#  endif
}

#  if defined(__AVX512BW__) && NK_FW == 16
/* AVX-512 has two vector ports (0 and 5), so the bfloat16 passes ran at the count of
   vector instructions (17 per 16 values in the affine pass, against ~8 for float16 with
   F16C): widening and narrowing are one word permutation (vpermw) each here, the
   rounding uses mask registers. Same bits as the generic formulas below. */
/* word 2i+1 <- word i (the even words are zeroed by the mask): x << 16 per lane */
static const uint16_t nk_bf16_widen_idx[32] = {
    0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7,
    0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15};
/* word i <- word 2i+1: the high half of each lane, in the low 256 bits */
static const uint16_t nk_bf16_narrow_idx[32] = {
    1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
    1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};

static inline nk_wf nk_cvt_bf16(nk_wh h) {
    return (nk_wf)_mm512_maskz_permutexvar_epi16(
        (__mmask32)0xAAAAAAAAu, _mm512_loadu_si512(nk_bf16_widen_idx),
        _mm512_castsi256_si512((__m256i)h));
}

static inline nk_wh nk_cvt_to_bf16(nk_wf v) {               /* nk_f32_to_bf16 on vectors */
    const __mmask16 nan = _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q);
    /* NaN: the sign and the quiet NaN 0x7fc0 (nk_f32_to_bf16), set before the rounding,
       which leaves it as it is (0x7fc0 is even, its low half zero): one masked
       (u & sign) | 0x7fc00000 instead of and, or and a blend after it */
    const __m512i u = _mm512_mask_ternarylogic_epi32(
        (__m512i)v, nan, _mm512_set1_epi32((int)0x80000000u), _mm512_set1_epi32(0x7fc00000),
        0xEA);
    const __mmask16 odd = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
    /* round to nearest even: + 0x7fff, + 1 more where the kept last bit is odd */
    __m512i r = _mm512_add_epi32(u, _mm512_set1_epi32(0x7fff));
    r = _mm512_mask_add_epi32(r, odd, r, _mm512_set1_epi32(1));
    return (nk_wh)_mm512_castsi512_si256(
        _mm512_permutexvar_epi16(_mm512_loadu_si512(nk_bf16_narrow_idx), r));
}
#  else
/* widening: the half as the top of a float32 lane (every build but AVX-512's) */
static inline nk_wf nk_cvt_bf16(nk_wh h) {
    return (nk_wf)(nk_wh_to_wu(h) << 16);
}
#  endif
#  if defined(__AVX2__) && NK_FW == 8
/* AVX2: the generic formula below compiled to 17 vector instructions per 8 values
   (the unsigned NaN compare alone took three); here the NaN is set before the
   rounding, as on AVX-512, with one unordered compare and a blend: 11. Same bits. */
/* the rounded bfloat16 bits in the low half of each lane */
static inline __m256i nk_rnd_bf16(nk_wf v) {
    const __m256i u = (__m256i)v;
    const __m256i q = _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32((int)0x80000000u)),
                                      _mm256_set1_epi32(0x7fc00000));
    /* NaN -> sign | 0x7fc00000, which the rounding leaves as it is */
    const __m256i s = (__m256i)_mm256_blendv_ps((__m256)u, (__m256)q,
                                                _mm256_cmp_ps((__m256)v, (__m256)v, _CMP_UNORD_Q));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(s, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(s, _mm256_set1_epi32(0x7fff)), odd), 16);
}

static inline nk_wh nk_cvt_to_bf16(nk_wf v) {               /* nk_f32_to_bf16 on vectors */
    return nk_wu_to_wh((nk_wu)nk_rnd_bf16(v));
}

/* Pairs. The elementwise passes take 16 bfloat16 values at a time as two float
   vectors in the order of the 16-bit unpacks -- lanes 0-3 and 8-11, then 4-7 and
   12-15 -- which one pack puts back in order: widening costs one unpack per 8 values
   (not a zero-extension and a shift) and narrowing one pack per 16 (not a pack and
   a cross-lane permute per 8). Lanes are independent, so any elementwise formula
   gives the same values; float32 operands are loaded in the same order. */
#    define NK_PAIR_bf16 1
static inline nk_wf nk_pair_bf16(const nk_bf16 *p, int h) {
    __m256i v;
    memcpy(&v, p, sizeof v);
    return (nk_wf)(h ? _mm256_unpackhi_epi16(_mm256_setzero_si256(), v)
                     : _mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
}

static inline nk_wf nk_pair_f32(const float *p, int h) {
    return (nk_wf)_mm256_loadu2_m128(p + 8 + 4 * h, p + 4 * h);
}

static inline __m256i nk_pack2_bf16(nk_wf lo, nk_wf hi) {     /* 16 halves, in order */
    return _mm256_packus_epi32(nk_rnd_bf16(lo), nk_rnd_bf16(hi));
}

static inline void nk_st2_bf16(nk_bf16 *q, nk_wf lo, nk_wf hi) {
    const __m256i v = nk_pack2_bf16(lo, hi);
    memcpy(q, &v, sizeof v);
}

static inline void nk_st2_nt_bf16(nk_bf16 *q, nk_wf lo, nk_wf hi) {    /* q: 32-byte aligned */
    _mm256_stream_si256((__m256i *)q, nk_pack2_bf16(lo, hi));
}
#  elif !(defined(__AVX512BW__) && NK_FW == 16)      /* the portable narrowing */

static inline nk_wh nk_cvt_to_bf16(nk_wf v) {               /* nk_f32_to_bf16 on vectors */
    nk_wu u = (nk_wu)v;
    nk_wu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    nk_wu nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
    return nk_wu_to_wh(nk_wsel((u & 0x7fffffffu) > 0x7f800000u, nan, rounded));
}
#  endif

/* max(y, 0) keeping NaN and -0 (y < 0 is false for both), as _relu */
static inline nk_wf nk_relu(nk_wf y) { return (nk_wf)((nk_wu)y & ~(nk_wu)(y < 0.0f)); }

#  define NK_DEF_LDST(SUF, T)                                                          \
static inline nk_wf nk_ld_##SUF(const T *p, Py_ssize_t w) { return nk_cvt_##SUF(nk_h_ld(p, w)); } \
static inline void nk_st_##SUF(T *q, nk_wf v, Py_ssize_t w) { nk_h_st(q, nk_cvt_to_##SUF(v), w); }
#else     /* no vector extensions: one value at a time */
#  define NK_FW 1
typedef float nk_wf;
static inline nk_wf nk_ld_f32(const float *p, Py_ssize_t w) { (void)w; return *p; }
static inline void nk_st_f32(float *q, nk_wf v, Py_ssize_t w) { (void)w; *q = v; }
static inline nk_wf nk_relu(nk_wf y) { return y < 0 ? 0.0f : y; }
#  define NK_DEF_LDST(SUF, T)                                                          \
static inline nk_wf nk_ld_##SUF(const T *p, Py_ssize_t w) { (void)w; return nk_##SUF##_to_f32(*p); } \
static inline void nk_st_##SUF(T *q, nk_wf v, Py_ssize_t w) { (void)w; *q = nk_f32_to_##SUF(v); }
#endif
NK_DEF_LDST(f16, nk_f16)
NK_DEF_LDST(bf16, nk_bf16)

/* Pairs (above) exist for bfloat16 in the AVX2 build only; elsewhere these are never
   called (NK_PAIR_* is 0) but keep NK_EW_MAP's dead branch compiling. */
#ifndef NK_PAIR_bf16
#  define NK_PAIR_bf16 0
static inline nk_wf nk_pair_bf16(const nk_bf16 *p, int h) { (void)h; return nk_ld_bf16(p, NK_FW); }
static inline nk_wf nk_pair_f32(const float *p, int h) { (void)h; return nk_ld_f32(p, NK_FW); }
static inline void nk_st2_bf16(nk_bf16 *q, nk_wf lo, nk_wf hi) { (void)q; (void)lo; (void)hi; }
static inline void nk_st2_nt_bf16(nk_bf16 *q, nk_wf lo, nk_wf hi) { (void)q; (void)lo; (void)hi; }
#endif
#define NK_PAIR_f16 0
#define NK_PAIR_f32 0
static inline nk_wf nk_pair_f16(const nk_f16 *p, int h) { (void)h; return nk_ld_f16(p, NK_FW); }
static inline void nk_st2_f16(nk_f16 *q, nk_wf lo, nk_wf hi) { (void)q; (void)lo; (void)hi; }
static inline void nk_st2_nt_f16(nk_f16 *q, nk_wf lo, nk_wf hi) { (void)q; (void)lo; (void)hi; }
static inline void nk_st2_f32(float *q, nk_wf lo, nk_wf hi) { (void)q; (void)lo; (void)hi; }
/* NK_FW values at p (w of them), or half h_ of a pair when h_ >= 0 */
#define NK_LDX(SUF, p, w, h) ((h) >= 0 ? nk_pair_##SUF((p), (h)) : nk_ld_##SUF((p), (w)))

/* Q[i] = EXPR at i = i_ .. i_ + w_ for i < n, stored by nk_st_SUF. From n >= NK_FW
   on, the last vector is the full one ending at n, overlapping the one before it: it
   is computed first, from the data as it was, and stored last, so a call in place (Q
   aliasing an input at the same index) reads only unchanged values, and a length
   that is not a multiple of NK_FW costs no partial load or store -- without AVX-512
   those are variable-length memcpy calls, two per 7x7 plane, which took more time
   than the plane's 49 values. The values are those of the partial vector. Where
   SUF has pairs, the same with 2 NK_FW values (EXPR once per half h_).
   NK_EW_MAP_B also walks b_ over parameter blocks of BS floats, one per vector step
   in the order nk_cl_fill lays them out (the last vector's block last). */
#define NK_EW_MAP_B(n, SUF, Q, BLK, BS, EXPR) do {                                     \
    if (NK_PAIR_##SUF && (n) >= 2 * NK_FW) {                                           \
        const Py_ssize_t w_ = NK_FW, last_ = (n) - 2 * NK_FW;                          \
        Py_ssize_t i_ = last_;                                                         \
        const float *b_ = (BLK) + (last_ + 2 * NK_FW - 1) / (2 * NK_FW) * (BS);        \
        nk_wf l_, r_, tl_, tr_;                                                        \
        { const int h_ = 0; tl_ = (EXPR); }                                            \
        { const int h_ = 1; tr_ = (EXPR); }                                            \
        for (i_ = 0, b_ = (BLK); i_ < last_; i_ += 2 * NK_FW, b_ += (BS)) {            \
            { const int h_ = 0; l_ = (EXPR); }                                         \
            { const int h_ = 1; r_ = (EXPR); }                                         \
            nk_st2_##SUF((Q) + i_, l_, r_);                                            \
        }                                                                              \
        nk_st2_##SUF((Q) + last_, tl_, tr_);                                           \
    } else if ((n) >= NK_FW) {                                                         \
        const Py_ssize_t w_ = NK_FW, last_ = (n) - NK_FW;                              \
        const int h_ = -1;                                                             \
        Py_ssize_t i_ = last_;                                                         \
        const float *b_ = (BLK) + (last_ + NK_FW - 1) / NK_FW * (BS);                  \
        const nk_wf t_ = (EXPR);                                                       \
        for (i_ = 0, b_ = (BLK); i_ < last_; i_ += NK_FW, b_ += (BS))                  \
            nk_st_##SUF((Q) + i_, (EXPR), w_);                                         \
        nk_st_##SUF((Q) + last_, t_, w_);                                              \
    } else if ((n) > 0) {                                                              \
        const Py_ssize_t w_ = (n), i_ = 0;                                             \
        const int h_ = -1;                                                             \
        const float *b_ = (BLK);                                                       \
        nk_st_##SUF((Q) + i_, (EXPR), w_);                                             \
    }                                                                                  \
} while (0)
static const float nk_no_blocks[1];
#define NK_EW_MAP(n, SUF, Q, EXPR) NK_EW_MAP_B(n, SUF, Q, nk_no_blocks, 0, ((void)b_, (EXPR)))

/* Channels-last parameter blocks. A channels-last pass maps rows of C values with
   per-channel float32 parameters. Loaded per vector, each parameter costs a load --
   for the AVX2 bfloat16 pairs a load and a cross-lane insert -- and the affine's
   halving and doubling cost two multiplies: as many instructions as the row's own
   data (BN eval, channels-last bfloat16, was 1.21-1.34x torch's time; 0.84x now). nk_cl_fill lays out np
   parameter arrays a[k] * s[k] over n channels once per range and sample, a block of
   np vectors (pairs: np pairs) per vector step of NK_EW_MAP_B, in the order that
   step loads them, zero past n; the values are the same floats. NK_CL_CHUNK bounds
   n, so that the blocks fit a stack buffer (NK_CL_FLOATS per parameter). */
#define NK_CL_CHUNK 2048
#define NK_CL_FLOATS (NK_CL_CHUNK + 2 * NK_FW)
static inline int nk_cl_pair(Py_ssize_t n, int has_pairs) { return has_pairs && n >= 2 * NK_FW; }
static void nk_cl_fill(float *blk, Py_ssize_t n, int pair, int np, const float *const *a,
                       const float *s) {
    const Py_ssize_t V = pair ? 2 * NK_FW : NK_FW;
    const Py_ssize_t last = n >= V ? n - V : 0, nmain = n >= V ? (last + V - 1) / V : 0;
    for (Py_ssize_t j = 0; j <= nmain; j++) {
        const Py_ssize_t i = j < nmain ? j * V : last, w = n - i < NK_FW ? n - i : NK_FW;
        float *b = blk + j * np * V;
        for (int k = 0; k < np; k++) {
            /* the very loads of the step (w < NK_FW only where n < NK_FW) */
            const nk_wf lo = (pair ? nk_pair_f32(a[k] + i, 0) : nk_ld_f32(a[k] + i, w)) * s[k];
            memcpy(b + k * V, &lo, sizeof lo);
            if (pair) {
                const nk_wf hi = nk_pair_f32(a[k] + i, 1) * s[k];
                memcpy(b + k * V + NK_FW, &hi, sizeof hi);
            }
        }
    }
}
/* parameter k of the current vector step (or half h_ of its pair) from its block */
#define NK_CLP(k) nk_ld_f32(b_ + ((k) * (h_ >= 0 ? 2 : 1) + (h_ > 0)) * NK_FW, NK_FW)
/* The loop of a channels-last pass over rows [lo, hi) of C values (C, S, lo, hi and
   per_sample from the caller): NK_CL_CHUNK channels at a time, the blocks of NP
   parameter arrays A[k] * SCALE[k] filled once per chunk and sample (parameters at
   sample * C with per_sample, else at 0; PAIRS: the data type has pairs), then the
   body (the variadic rest) per row, with the row's offset o, its length n and the
   blocks blk of bs floats per vector step. */
#define NK_CL_ROWS(NP, A, SCALE, PAIRS, ...) do {                                      \
    float blk[(NP) * NK_CL_FLOATS];                                                    \
    for (Py_ssize_t c0 = 0; c0 < C; c0 += NK_CL_CHUNK) {                               \
        const Py_ssize_t n = C - c0 < NK_CL_CHUNK ? C - c0 : NK_CL_CHUNK;              \
        const int pair = nk_cl_pair(n, (PAIRS));                                       \
        const Py_ssize_t bs = (NP) * (pair ? 2 : 1) * NK_FW;                           \
        for (Py_ssize_t r = lo; r < hi;) {                                             \
            const Py_ssize_t pi = per_sample ? r / S * C + c0 : c0;                    \
            const Py_ssize_t end = per_sample && (r / S + 1) * S < hi ? (r / S + 1) * S : hi; \
            const float *a_[NP];                                                       \
            for (int k_ = 0; k_ < (NP); k_++) a_[k_] = (A)[k_] + pi;                   \
            nk_cl_fill(blk, n, pair, (NP), a_, (SCALE));                               \
            for (; r < end; r++) {                                                     \
                const Py_ssize_t o = r * C + c0;                                       \
                __VA_ARGS__                                                            \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
} while (0)

/* The elementwise kernels of _kernels_elementwise / _kernels_stats for 16-bit rows,
   the same float32 expressions in the same order (see the Cython loops of the other
   rows). LD(a): NK_FW widened values of data array a at i_, F(a): of float32 array a. */
#define NK_HALF_KERNELS(SUF, T)                                                        \
static void nk_widen_##SUF(const T *p, float *dst, Py_ssize_t n) {                     \
    NK_EW_MAP(n, f32, dst, LD(p));                                                     \
}                                                                                      \
static void nk_narrow_##SUF(const float *src, T *q, Py_ssize_t n) {                   \
    NK_EW_MAP(n, SUF, q, F(src));                                                      \
}                                                                                      \
/* q = (p - m) * a + b [+ r] [ReLU], as (p/2 - m/2) * (2a) + b: the caller passes    \
   m/2 and 2a. r may be q (each vector is read before it is written). */              \
static void nk_affine_##SUF(const T *p, T *q, const T *r, Py_ssize_t n, float m,      \
                            float a, float b, int relu) {                              \
    if (r == NULL && !relu)                                                            \
        NK_EW_MAP(n, SUF, q, (LD(p) * 0.5f - m) * a + b);                              \
    else if (r == NULL)                                                                \
        NK_EW_MAP(n, SUF, q, nk_relu((LD(p) * 0.5f - m) * a + b));                     \
    else if (!relu)                                                                    \
        NK_EW_MAP(n, SUF, q, (LD(p) * 0.5f - m) * a + b + LD(r));                      \
    else                                                                               \
        NK_EW_MAP(n, SUF, q, nk_relu((LD(p) * 0.5f - m) * a + b + LD(r)));             \
}                                                                                      \
/* nk_affine without r or ReLU, storing the aligned full vectors non-temporally    \
   (NK_HAVE_NT; else the plain kernel): a head of < NK_FW values up to q's vector    \
   alignment and the tail go through the normal store. The caller issues one sfence  \
   after its last call, so that the stores are visible before its OpenMP barrier. */  \
static void nk_affine_nt_##SUF(const T *p, T *q, Py_ssize_t n, float m, float a,      \
                               float b) {                                              \
    NK_IF_NT(                                                                          \
    /* bytes per streamed store: one vector of halves, or a pair's two */              \
    const size_t vb_ = (NK_PAIR_##SUF ? 2 : 1) * sizeof(nk_wh);                        \
    Py_ssize_t head = (Py_ssize_t)((vb_ - (uintptr_t)q % vb_) % vb_) / 2;              \
    if (head > n) head = n;                                                            \
    NK_EW_MAP(head, SUF, q, (LD(p) * 0.5f - m) * a + b);                               \
    p += head; q += head; n -= head;                                                   \
    Py_ssize_t i_ = 0;                                                                 \
    const Py_ssize_t w_ = NK_FW;                                                       \
    if (NK_PAIR_##SUF) {                                                               \
        for (; i_ + 2 * NK_FW <= n; i_ += 2 * NK_FW) {                                 \
            nk_wf l_, r_;                                                              \
            { const int h_ = 0; l_ = (LD(p) * 0.5f - m) * a + b; }                     \
            { const int h_ = 1; r_ = (LD(p) * 0.5f - m) * a + b; }                     \
            nk_st2_nt_##SUF(q + i_, l_, r_);                                           \
        }                                                                              \
    } else {                                                                           \
        const int h_ = -1;                                                             \
        for (; i_ + NK_FW <= n; i_ += NK_FW)                                           \
            nk_h_st_nt(q + i_, nk_cvt_to_##SUF((LD(p) * 0.5f - m) * a + b));           \
    }                                                                                  \
    p += i_; q += i_; n -= i_;                                                         \
    NK_EW_MAP(n, SUF, q, (LD(p) * 0.5f - m) * a + b);                                  \
    return;                                                                            \
    )                                                                                  \
    nk_affine_##SUF(p, q, NULL, n, m, a, b, 0);                                        \
}                                                                                      \
/* The channels-first pass over the flat range [lo, hi) of (N, C, S) data, plane by  \
   plane; a plane's parameters sit at pi = plane (per_sample) or plane % C. The plain \
   affine is written out here rather than called: its vector constants (bfloat16's   \
   rounding and permutations) are then set up once per range, not once per plane,    \
   and no division runs per plane -- on 7x7 planes each cost as much as the plane's   \
   49 values. The caller passes the unhalved parameters. */                           \
static void nk_cf_affine_##SUF(const T *x, T *out, const T *res, int relu, int stream,  \
                               const float *sh, const float *sc, const float *of,      \
                               Py_ssize_t C, Py_ssize_t S, int per_sample,             \
                               Py_ssize_t lo, Py_ssize_t hi) {                         \
    Py_ssize_t plane = lo / S, s0 = lo - plane * S;                                    \
    Py_ssize_t pi = per_sample ? plane : plane % C;                                    \
    while (lo < hi) {                                                                  \
        const Py_ssize_t n = S - s0 < hi - lo ? S - s0 : hi - lo;                      \
        const Py_ssize_t o = plane * S + s0;                                           \
        const T *p = x + o;                                                            \
        T *q = out + o;                                                                \
        const float m = sh[pi] * 0.5f, a = sc[pi] * 2.0f, b = of[pi];                  \
        if (res == NULL && !relu && !stream)                                           \
            NK_EW_MAP(n, SUF, q, (LD(p) * 0.5f - m) * a + b);                          \
        else if (res == NULL && !relu)                                                 \
            nk_affine_nt_##SUF(p, q, n, m, a, b);                                      \
        else                                                                           \
            nk_affine_##SUF(p, q, res == NULL ? NULL : res + o, n, m, a, b, relu);     \
        lo += n;                                                                       \
        plane++;                                                                       \
        s0 = 0;                                                                        \
        if (++pi == C && !per_sample) pi = 0;                                          \
    }                                                                                  \
    NK_IF_NT(if (stream) _mm_sfence();)      /* one fence for the range's streamed stores */ \
}                                                                                      \
/* Channels-last rows [lo, hi) of (N, S, C) data: q = (p/2 - sh/2) * (2 sc) + of     \
   [+ r] [ReLU], parameters at pi = sample * C (per_sample) or 0, as blocks           \
   (nk_cl_fill) of NK_CL_CHUNK channels at a time. */                                 \
static void nk_cl_affine_##SUF(const T *x, T *out, const T *res, int relu,            \
                               const float *sh, const float *sc, const float *of,      \
                               Py_ssize_t S, Py_ssize_t C, int per_sample,             \
                               Py_ssize_t lo, Py_ssize_t hi) {                         \
    static const float scale[3] = {0.5f, 2.0f, 1.0f};                                  \
    const float *const prm[3] = {sh, sc, of};                                          \
    NK_CL_ROWS(3, prm, scale, NK_PAIR_##SUF,                                           \
        const T *p = x + o;                                                            \
        T *q = out + o;                                                                \
        const T *rr = res == NULL ? NULL : res + o;                                    \
        if (rr == NULL && !relu)                                                       \
            NK_EW_MAP_B(n, SUF, q, blk, bs, NK_CL_AFFINE(p));                          \
        else if (rr == NULL)                                                           \
            NK_EW_MAP_B(n, SUF, q, blk, bs, nk_relu(NK_CL_AFFINE(p)));                 \
        else if (!relu)                                                                \
            NK_EW_MAP_B(n, SUF, q, blk, bs, NK_CL_AFFINE(p) + LD(rr));                 \
        else                                                                           \
            NK_EW_MAP_B(n, SUF, q, blk, bs, nk_relu(NK_CL_AFFINE(p) + LD(rr)));        \
    );                                                                                 \
}                                                                                      \
/* dx = a * dy + (b * (x - m) + z) */                                                 \
static void nk_apply_##SUF(const T *dy, const T *x, T *dx, Py_ssize_t n, float m,     \
                           float a, float b, float z) {                                \
    NK_EW_MAP(n, SUF, dx, a * LD(dy) + (b * (LD(x) - m) + z));                         \
}                                                                                      \
/* Channels-last rows [lo, hi): dx = cdy * dy + (cx * (x - sh) + c1), parameters   \
   as in nk_cl_affine. */                                                              \
static void nk_cl_apply_##SUF(const T *dy, const T *x, T *dx, const float *sh,        \
                              const float *cdy, const float *cx, const float *c1,      \
                              Py_ssize_t S, Py_ssize_t C, int per_sample,              \
                              Py_ssize_t lo, Py_ssize_t hi) {                          \
    static const float scale[4] = {1.0f, 1.0f, 1.0f, 1.0f};                            \
    const float *const prm[4] = {sh, cdy, cx, c1};                                     \
    NK_CL_ROWS(4, prm, scale, NK_PAIR_##SUF,                                           \
        const T *dyo = dy + o, *xo = x + o;                                            \
        NK_EW_MAP_B(n, SUF, dx + o, blk, bs,                                           \
                    NK_CLP(1) * LD(dyo) + (NK_CLP(2) * (LD(xo) - NK_CLP(0)) + NK_CLP(3))); \
    );                                                                                 \
}                                                                                      \
/* a LayerNorm row: ((x/2 - mh) - ml) * rs2 * w + b; RMSNorm (rms): x * rs2 * w */     \
static void nk_row_forward_##SUF(const T *x, T *out, Py_ssize_t n, const float *w,    \
                                 const float *b, float mh, float ml, float rs2,        \
                                 int rms) {                                            \
    if (rms)                                                                           \
        NK_EW_MAP(n, SUF, out, LD(x) * rs2 * F(w));                                    \
    else                                                                               \
        NK_EW_MAP(n, SUF, out, ((LD(x) * 0.5f - mh) - ml) * rs2 * F(w) + F(b));        \
}                                                                                      \
/* a LayerNorm/RMSNorm row's dx = a * (dy * w) + (c * ((x - mh) - ml) + b0) */         \
static void nk_row_backward_##SUF(const T *dy, const T *x, T *dx, Py_ssize_t n,       \
                                  const float *w, float a, float c, float b0,          \
                                  float mh, float ml) {                                \
    NK_EW_MAP(n, SUF, dx, a * (LD(dy) * F(w)) + (c * ((LD(x) - mh) - ml) + b0));       \
}

#define LD(a) NK_LDX(f16, (a) + i_, w_, h_)
#define F(a) NK_LDX(f32, (a) + i_, w_, h_)
/* the channels-last affine from parameter blocks (sh/2, 2 sc, of), as nk_affine */
#define NK_CL_AFFINE(p) ((LD(p) * 0.5f - NK_CLP(0)) * NK_CLP(1) + NK_CLP(2))
NK_HALF_KERNELS(f16, nk_f16)
#undef LD
#define LD(a) NK_LDX(bf16, (a) + i_, w_, h_)
NK_HALF_KERNELS(bf16, nk_bf16)
#undef LD
#undef F
#undef NK_CL_AFFINE

/* Fused double-vector reductions of the backward passes (16-bit rows; the scalar
   loops of _kernels_stats widen each value on its own, which costs the float16
   formula per element, and take one pass per sum):
   nk_gsum_*: s = sum(dy), t = sum(dy * (x - m)) over n values (grad_sums, one plane);
   nk_row_grad_*: s_g = sum(dy * w), s_gx = sum((dy * w) * (x - mean)) and the row's
   share of dweight/dbias, dw += dy * ((x - mean) * rstd), db += dy (rows_backward).
   In double, as the scalar loops; 4 (gsum) or 2 (row_grad) accumulators per sum. */
/* Each kernel below is written once: the double-vector loop (in NK_IF_VEC, compiled
   only with GCC vector extensions) runs over whole vectors, and the scalar loop after
   it takes the tail -- or everything, where there are no vector extensions. */
#if NK_HAVE_VEC
#  define NK_IF_VEC(...) __VA_ARGS__
static inline nk_vd nk_vld_f64(const double *p) { nk_vd v; memcpy(&v, p, sizeof v); return v; }
static inline void nk_vst_f64(double *p, nk_vd v) { memcpy(p, &v, sizeof v); }
static inline double nk_hsum(nk_vd v) {
    double s = 0.0;
    for (int l = 0; l < NK_VW; l++) s += v[l];
    return s;
}
#else
#  define NK_IF_VEC(...)
#endif

/* ---------------------------------------------------------------- 16-bit block moments
   in float32 lanes. A vector of 16 halves widens to one float32 vector but to two
   double vectors, so the double kernel (NK_SHIFTED) is compute-bound on 16-bit data;
   these sum in float32 over short runs and move the partial sums to double:
     d = x - k in float32, s1 = sum d, s2 = sum d^2 in NK_M32_ACC (A) float32 vectors,
   each lane adding at most NK_M32_STEPS (m) values before the A vectors are added
   pairwise (2 more roundings, in float32) and converted -- exactly -- into double
   vector accumulators. k = the mean of the block's first <= 16 values rounded to the
   16-bit type: the first value alone (the double path's k) is more than one std from
   the mean for ~1/3 of the blocks of normal data, which would fail the check below;
   a 16-bit k makes d = x - k exact in float32 unless x and k are more than 13
   (float16) / 16 (bfloat16) binades apart, so short blocks come out nearly exact.
   Error (Higham 4.2: a sum whose tree has depth h of terms with relative error <= g
   has error <= gamma(h + g) sum|terms|; here h = m + 2 in float32 plus the double
   merges, whose gamma_n(u64) the float64 bounds already hold): d is rounded once, d^2
   three times (twice through d, once for the product; an FMA only removes one), so
   with G = gamma_{m+5}(u32) = gamma_21(u32) ~ 1.25e-6
     |ds1| <= G sum|x - k|,   |ds2| <= G sum (x - k)^2.
   The check n (mean - k)^2 <= M2, i.e. s1^2/n <= s2/2 (s2 = M2 + n (mean - k)^2), bounds
   sum (x - k)^2 <= 2 M2 and (Cauchy-Schwarz) sum|x - k| <= sqrt(2 n M2), so
     mean error |ds1|/n <= sqrt(2) G sigma                          (sigma^2 = M2/n)
     M2 error   |ds2| + 2 |s1| |ds1| / n <= 2 G M2 + 2 sqrt(2) G M2 < 5 G M2,
   with the check made on the computed sums (true ratio within 1 + O(G) of it) the
   constants 2 (mean) and 6 (M2) hold. Blocks failing it, and blocks whose float32
   sums are not finite (NaN/Inf data: the comparisons are false for NaN; +-Inf
   or a float32 overflow of bfloat16 squares gives s2 = Inf), are recomputed by the
   double kernel, so NaN/Inf come out exactly as there. float16 squares never leave
   float32's normal range (|x - k| in [2^-24, 131008]); bfloat16 squares below 2^-126
   are subnormal: an absolute error <= 2^-150 each, i.e. M2 and sum(x^2) within
   n 2^-150 more (far below any eps). Merging blocks (Chan, in double) keeps these
   relative bounds for a whole row: mean within 2 G sigma_row, M2 within 8 G M2_row
   (the between-block term moves by <= 2 sqrt(between * within) * 2 G <= 2 G M2_row).
   Without vector extensions the Cython callers keep the double paths. */
#ifndef NK_M32_STEPS       /* (a -D for measurements) */
#  define NK_M32_STEPS 16   /* m: measured 4, 8, 16 (AVX-512, in L2): 16 fastest by ~5% */
#endif
#define NK_M32_ACC 4        /* A: written out as a0..a3 below */
#define NK_M32_GROUP (NK_M32_ACC * NK_M32_STEPS * NK_FW)
#if NK_HAVE_VEC
static const int32_t nk_iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* the NK_FW lanes of a float32 vector added into NK_VW double lanes (exact widening) */
static inline nk_vd nk_wf_to_vd(nk_wf v) {
    nk_vf lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    return nk_vf_to_vd(lo) + nk_vf_to_vd(hi);
}

/* x - k on the first w lanes, 0 on the others (x beyond w is not read) */
#  define NK_M32_DEV(SUF, q, w) ((nk_wf)((nk_wu)(nk_ld_##SUF((q), (w)) - kf)          \
        & (nk_wu)(nk_ld_i32(nk_iota) < (nk_wi){0} + (int32_t)(w))))
static inline nk_wi nk_ld_i32(const int32_t *p) { nk_wi v; memcpy(&v, p, sizeof v); return v; }
#  define NK_M32_ADD(a, b, d) do { nk_wf d_ = (d); a += d_; b += d_ * d_; } while (0)
/* one of the last vectors of p into accumulators a, b (w < NK_FW lanes: the tail) */
#  define NK_M32_LEFT(SUF, a, b) do { if (i < end) {                                  \
        NK_M32_ADD(a, b, NK_M32_DEV(SUF, p + i, end - i < NK_FW ? end - i : NK_FW));    \
        i += NK_FW; } } while (0)
#endif

/* *mean, *m2 of p[:n] (n >= 1): the float32-lane sums when they pass the check,
   else the double kernel with k = p[0] (the formula of _moments). centered = 0:
   only s2 = sum(x^2) around k = 0 is wanted (RMSNorm; no cancellation, so only the
   finiteness check), returned in *m2 with *mean = 0. */
#define NK_MOMENTS32(NAME, T, SUF, DOUBLE_FN)                                          \
static void NAME(const T *p, Py_ssize_t n, int centered, double *mean, double *m2) {  \
    double k = 0.0, u = 0.0, v = 0.0;                                                  \
    NK_IF_VEC(                                                                         \
    Py_ssize_t i = 0, nk = n < 16 ? n : 16;                                            \
    if (centered) {              /* (zero-padded vectors: no scalar conversions) */   \
        nk_wf f = {0};                                                                 \
        for (Py_ssize_t j = 0; j < nk; j += NK_FW)                                     \
            f += nk_ld_##SUF(p + j, nk - j < NK_FW ? nk - j : NK_FW);                  \
        k = nk_##SUF##_to_f32(nk_f32_to_##SUF((float)(nk_hsum(nk_wf_to_vd(f)) / (double)nk))); \
    }                                                                                  \
    const nk_wf kf = (nk_wf){0} + (float)k;                                            \
    nk_vd c1 = {0}, c2 = {0};                                                          \
    while (i < n) {                                                                    \
        nk_wf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                  \
        nk_wf b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};                                  \
        Py_ssize_t end = n - i < NK_M32_GROUP ? n : i + NK_M32_GROUP;                  \
        for (; i + 4 * NK_FW <= end; i += 4 * NK_FW) {                                 \
            NK_M32_ADD(a0, b0, nk_ld_##SUF(p + i, NK_FW) - kf);                        \
            NK_M32_ADD(a1, b1, nk_ld_##SUF(p + i + NK_FW, NK_FW) - kf);                \
            NK_M32_ADD(a2, b2, nk_ld_##SUF(p + i + 2 * NK_FW, NK_FW) - kf);            \
            NK_M32_ADD(a3, b3, nk_ld_##SUF(p + i + 3 * NK_FW, NK_FW) - kf);            \
        }                                                                              \
        /* < 4 vectors left (only at the end of p, the last one partial): one to      \
           each accumulator, so no lane adds more than m values */                     \
        NK_M32_LEFT(SUF, a0, b0);                                                      \
        NK_M32_LEFT(SUF, a1, b1);                                                      \
        NK_M32_LEFT(SUF, a2, b2);                                                      \
        NK_M32_LEFT(SUF, a3, b3);                                                      \
        c1 += nk_wf_to_vd((a0 + a1) + (a2 + a3));                                      \
        c2 += nk_wf_to_vd((b0 + b1) + (b2 + b3));                                      \
    }                                                                                  \
    u = nk_hsum(c1);                                                                   \
    v = nk_hsum(c2);                                                                   \
    /* the check (written so that NaN fails it) */                                    \
    if (v <= DBL_MAX && (!centered || u * (u / (double)n) <= 0.5 * v)) {               \
        *mean = centered ? k + u / (double)n : 0.0;                                    \
        *m2 = centered ? v - u * (u / (double)n) : v;                                  \
        if (*m2 < 0.0) *m2 = 0.0;                                                      \
        return;                                                                        \
    }                                                                                  \
    )                                                                                  \
    k = centered ? (double)nk_##SUF##_to_f32(p[0]) : 0.0;                              \
    DOUBLE_FN(p, n, k, &u, &v);                                                        \
    *mean = centered ? k + u / (double)n : 0.0;                                        \
    *m2 = centered ? v - u * (u / (double)n) : v;                                      \
    if (*m2 < 0.0) *m2 = 0.0;                                                          \
}
NK_MOMENTS32(nk_moments32_f16, nk_f16, f16, nk_shifted_f16)
NK_MOMENTS32(nk_moments32_bf16, nk_bf16, bf16, nk_shifted_bf16)

#define NK_GSUM(NAME, T, VLOAD, WIDEN)                                               \
static void NAME(const T *dy, const T *x, Py_ssize_t n, double m, double *s, double *t) { \
    double u = 0.0, v = 0.0;                                                           \
    Py_ssize_t i = 0;                                                                  \
    NK_IF_VEC(                                                                         \
    nk_vd a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}; \
    for (; i + 4 * NK_VW <= n; i += 4 * NK_VW) {                                       \
        nk_vd d0 = VLOAD(dy + i), d1 = VLOAD(dy + i + NK_VW);                          \
        nk_vd d2 = VLOAD(dy + i + 2 * NK_VW), d3 = VLOAD(dy + i + 3 * NK_VW);          \
        a0 += d0; a1 += d1; a2 += d2; a3 += d3;                                        \
        b0 += d0 * (VLOAD(x + i) - m);                                                 \
        b1 += d1 * (VLOAD(x + i + NK_VW) - m);                                         \
        b2 += d2 * (VLOAD(x + i + 2 * NK_VW) - m);                                     \
        b3 += d3 * (VLOAD(x + i + 3 * NK_VW) - m);                                     \
    }                                                                                  \
    u = nk_hsum((a0 + a1) + (a2 + a3));                                                \
    v = nk_hsum((b0 + b1) + (b2 + b3));                                                \
    )                                                                                  \
    for (; i < n; i++) {                                                               \
        double d = WIDEN(dy[i]);                                                       \
        u += d;                                                                        \
        v += d * ((double)WIDEN(x[i]) - m);                                            \
    }                                                                                  \
    *s = u;                                                                            \
    *t = v;                                                                            \
}

#define NK_ROW_GRAD(NAME, T, VLOAD, WIDEN)                                           \
static void NAME(const T *dy, const T *x, const float *w, Py_ssize_t n, double mean,  \
                 double rstd, double *sg, double *sgx, double *dw, double *db) {       \
    double u = 0.0, v = 0.0;                                                           \
    Py_ssize_t i = 0;                                                                  \
    NK_IF_VEC(                                                                         \
    nk_vd a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};                                      \
    for (; i + 2 * NK_VW <= n; i += 2 * NK_VW) {                                       \
        nk_vd d0 = VLOAD(dy + i), d1 = VLOAD(dy + i + NK_VW);                          \
        nk_vd x0 = VLOAD(x + i) - mean, x1 = VLOAD(x + i + NK_VW) - mean;              \
        nk_vd g0 = d0 * nk_vld_f32(w + i), g1 = d1 * nk_vld_f32(w + i + NK_VW);        \
        a0 += g0; a1 += g1;                                                            \
        b0 += g0 * x0; b1 += g1 * x1;                                                  \
        nk_vst_f64(dw + i, nk_vld_f64(dw + i) + d0 * (x0 * rstd));                     \
        nk_vst_f64(dw + i + NK_VW, nk_vld_f64(dw + i + NK_VW) + d1 * (x1 * rstd));     \
        nk_vst_f64(db + i, nk_vld_f64(db + i) + d0);                                   \
        nk_vst_f64(db + i + NK_VW, nk_vld_f64(db + i + NK_VW) + d1);                   \
    }                                                                                  \
    u = nk_hsum(a0 + a1);                                                              \
    v = nk_hsum(b0 + b1);                                                              \
    )                                                                                  \
    for (; i < n; i++) {                                                               \
        double d = WIDEN(dy[i]), xc = (double)WIDEN(x[i]) - mean, g = d * w[i];        \
        u += g;                                                                        \
        v += g * xc;                                                                   \
        dw[i] += d * (xc * rstd);                                                      \
        db[i] += d;                                                                    \
    }                                                                                  \
    *sg = u;                                                                           \
    *sgx = v;                                                                          \
}
NK_GSUM(nk_gsum64_f16, nk_f16, nk_vld_f16, nk_f16_to_f32)
NK_GSUM(nk_gsum64_bf16, nk_bf16, nk_vld_bf16, nk_bf16_to_f32)

/* nk_gsum_*: the sums of nk_gsum64_* in float32 lanes, as nk_moments32 (runs of at
   most m values per lane, 4 accumulators added pairwise, then double). Used where m
   is a float32 parameter (grad_sums' shift): x - m is then formed in float32 with one
   rounding. Terms dy are exact, dy (x - m) rounded twice (an FMA removes one), so
   with G = gamma_{m+5}(u32) as above
     |ds| <= G sum|dy|,   |dt| <= G sum|dy (x - m)|
   (bfloat16: + n 2^-150 for subnormal float32 products). No cancellation to guard:
   the bounds are relative to the sums of |terms|, as the double kernel's. An m that
   is not a finite float32, or sums that are not finite (NaN/Inf data, a float32
   overflow of bfloat16 products), take the double kernel. */
#define NK_GSUM32(NAME, T, SUF, DOUBLE_FN)                                             \
static void NAME(const T *dy, const T *x, Py_ssize_t n, double m, double *s, double *t) { \
    NK_IF_VEC(                                                                         \
    const float mf = (float)m;                                                         \
    const nk_wf kf = (nk_wf){0} + mf;                                                  \
    nk_vd c1 = {0}, c2 = {0};                                                          \
    Py_ssize_t i = 0;                                                                  \
    while ((double)mf == m && m - m == 0.0 && i < n) {                                 \
        nk_wf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                  \
        nk_wf b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};                                  \
        Py_ssize_t end = n - i < NK_M32_GROUP ? n : i + NK_M32_GROUP;                  \
        for (; i + 4 * NK_FW <= end; i += 4 * NK_FW) {                                 \
            NK_G32_ADD(SUF, a0, b0, NK_FW, i);                                         \
            NK_G32_ADD(SUF, a1, b1, NK_FW, i + NK_FW);                                 \
            NK_G32_ADD(SUF, a2, b2, NK_FW, i + 2 * NK_FW);                             \
            NK_G32_ADD(SUF, a3, b3, NK_FW, i + 3 * NK_FW);                             \
        }                                                                              \
        /* < 4 vectors left: one per accumulator; zero-padded dy lanes add 0 */       \
        NK_G32_LEFT(SUF, a0, b0);                                                      \
        NK_G32_LEFT(SUF, a1, b1);                                                      \
        NK_G32_LEFT(SUF, a2, b2);                                                      \
        NK_G32_LEFT(SUF, a3, b3);                                                      \
        c1 += nk_wf_to_vd((a0 + a1) + (a2 + a3));                                      \
        c2 += nk_wf_to_vd((b0 + b1) + (b2 + b3));                                      \
        if (i >= n) {                                                                  \
            double u = nk_hsum(c1), v = nk_hsum(c2);                                   \
            if (u - u == 0.0 && v - v == 0.0) { *s = u; *t = v; return; }             \
        }                                                                              \
    }                                                                                  \
    )                                                                                  \
    DOUBLE_FN(dy, x, n, m, s, t);                                                      \
}
#if NK_HAVE_VEC
#  define NK_G32_ADD(SUF, a, b, w, j) do {                                             \
        nk_wf g_ = nk_ld_##SUF(dy + (j), (w));                                         \
        a += g_; b += g_ * (nk_ld_##SUF(x + (j), (w)) - kf); } while (0)
#  define NK_G32_LEFT(SUF, a, b) do { if (i < end) {                                  \
        NK_G32_ADD(SUF, a, b, end - i < NK_FW ? end - i : NK_FW, i);                    \
        i += NK_FW; } } while (0)
#endif
NK_GSUM32(nk_gsum_f16, nk_f16, f16, nk_gsum64_f16)
NK_GSUM32(nk_gsum_bf16, nk_bf16, bf16, nk_gsum64_bf16)
NK_ROW_GRAD(nk_row_grad_f16, nk_f16, nk_vld_f16, nk_f16_to_f32)
NK_ROW_GRAD(nk_row_grad_bf16, nk_bf16, nk_vld_bf16, nk_bf16_to_f32)

/* Channels-last column sums over rows of C values (16-bit rows; the scalar loops of
   _cl_unit / _gs_rows widen value by value): vectors along the row, the sums in
   double arrays of C, each element in the order of the scalar loops.
   nk_cl_dev_*: rows 1..ln-1 of a block starting at row k: t1 += q - k, t2 += (q - k)^2;
   nk_gs_rows_*: rows 0..rows-1: sdy += dy, sdyx += dy * (x - sh). */
#define NK_CL_SUMS(DEV, GS, T, VLOAD, WIDEN)                                         \
static void DEV(const T *k, Py_ssize_t ln, Py_ssize_t C, double *t1, double *t2) {     \
    for (Py_ssize_t r = 1; r < ln; r++) {                                              \
        const T *q = k + r * C;                                                        \
        Py_ssize_t c = 0;                                                              \
        NK_IF_VEC(                                                                     \
        for (; c + NK_VW <= C; c += NK_VW) {                                           \
            nk_vd d = VLOAD(q + c) - VLOAD(k + c);                                     \
            nk_vst_f64(t1 + c, nk_vld_f64(t1 + c) + d);                                \
            nk_vst_f64(t2 + c, nk_vld_f64(t2 + c) + d * d);                            \
        }                                                                              \
        )                                                                              \
        for (; c < C; c++) {                                                           \
            double d = (double)WIDEN(q[c]) - (double)WIDEN(k[c]);                      \
            t1[c] += d;                                                                \
            t2[c] += d * d;                                                            \
        }                                                                              \
    }                                                                                  \
}                                                                                      \
static void GS(const T *dy, const T *x, const float *sh, Py_ssize_t rows, Py_ssize_t C, \
               double *sdy, double *sdyx) {                                            \
    for (Py_ssize_t r = 0; r < rows; r++) {                                            \
        const T *g = dy + r * C, *p = x + r * C;                                       \
        Py_ssize_t c = 0;                                                              \
        NK_IF_VEC(                                                                     \
        for (; c + NK_VW <= C; c += NK_VW) {                                           \
            nk_vd d = VLOAD(g + c);                                                    \
            nk_vst_f64(sdy + c, nk_vld_f64(sdy + c) + d);                              \
            nk_vst_f64(sdyx + c, nk_vld_f64(sdyx + c) + d * (VLOAD(p + c) - nk_vld_f32(sh + c))); \
        }                                                                              \
        )                                                                              \
        for (; c < C; c++) {                                                           \
            double d = WIDEN(g[c]);                                                    \
            sdy[c] += d;                                                               \
            sdyx[c] += d * ((double)WIDEN(p[c]) - (double)sh[c]);                      \
        }                                                                              \
    }                                                                                  \
}
NK_CL_SUMS(nk_cl_dev_f16, nk_gs_rows_f16, nk_f16, nk_vld_f16, nk_f16_to_f32)
NK_CL_SUMS(nk_cl_dev_bf16, nk_gs_rows_bf16, nk_bf16, nk_vld_bf16, nk_bf16_to_f32)

#endif /* NK_HALF_H */
