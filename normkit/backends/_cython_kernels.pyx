# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Cython + OpenMP kernels of normkit's ``cython`` backend.

The contract (names, shapes, dtypes, accuracy) is ``normkit/backends/_spec.py``;
``cython_backend.py`` re-exports these functions unchanged, so the registry calls
them directly.

Design, in short
----------------
* Entry points take ndarrays and read their data pointers with the NumPy C API after
  cheap checks (dtype, ndim, C-contiguous + aligned + native byte order, writeable
  outputs, matching shapes). Typed memoryviews would do the same checks but cost
  ~0.2 us per argument (a memoryview object per array): 1.2 us for a tiny LayerNorm
  call against 0.18 us here, which matters for the <= 3 us per-call target.
* Kernel bodies are ``nogil`` functions fused over float32/float64 (``real``) working
  on ``const real*`` inputs, so read-only arrays are accepted and ``out`` may be ``x``.
* Every statistic is accumulated in double, in NK_ACC (8 for SSE2, 16 for AVX2)
  independent accumulators, one reduction per loop: that is what gcc vectorizes
  without -ffast-math (so NaN/Inf still propagate). One accumulator runs at the add
  latency, ~5x slower; two reductions in one loop stay scalar, ~2x slower.
* Variances are centered: two passes over blocks of CHUNK elements (the second pass
  reads L1), the first summing deviations from the block's first value, block
  results merged with Chan's formula. So memory is read once, |mean| >> std keeps
  its digits, and long rows stay accurate. (float32: one pass of shifted sums per
  block, written with explicit vectors; see _moments.) Channels-last columns take one pass per
  block of rows (the loop runs along C, so both sums vectorize) of deviations d from
  the block's first row: m2 = sum(d**2) - sum(d)**2 / n cancels at most a factor n
  (the shift is one of the values), n <= a few hundred rows.
* float32 statistics are compute-bound at SSE2 width (two doubles per instruction),
  so setup.py also builds this file with AVX2 and with AVX-512 flags (modules
  _cython_kernels_avx2 / _avx512); cython_backend.py picks the best one the CPU runs.
* How work is split depends only on the shapes, never on the number of threads, so
  results are bitwise identical for any ``set_num_threads`` value (and any number of
  concurrent Python threads). Cross-row reductions write per-unit partials (unit = a
  fixed slice of rows/planes), merged in order afterwards: no shared accumulator.
* Below ``_par_min`` elements (and with one thread, and in a child forked after a
  parallel region) a kernel runs serially without entering an OpenMP region; below
  NOGIL_MIN elements it also keeps the GIL (releasing it costs more than the work).
"""

from cython.parallel cimport prange, threadid
from libc.math cimport sqrt, fabs
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
cimport numpy as cnp

import os

cnp.import_array()

cdef extern from *:
    """
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
    /* Independent accumulators per reduction: enough vector registers' worth to
       hide the add latency (4 registers of 2, 4 or 8 doubles). More spill with SSE2
       and ran slower; fewer leave AVX2 latency-bound. */
    #if defined(__AVX512F__)
    #  define NK_ACC 32
    #elif defined(__AVX2__)
    #  define NK_ACC 16
    #else
    #  define NK_ACC 8
    #endif
    /* float32 moments in one pass with explicit vectors (GCC/clang vector extensions):
       s1 = sum(p - k), s2 = sum((p - k)^2) in double, 4 accumulators of NK_VW lanes
       each, i.e. the NK_ACC scheme written out. gcc's own vectorizer turns the same
       loop into a mix of scalar and vector code. Other compilers: two passes. */
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
                               double *s1, double *s2) { (void)p; (void)n; (void)k; *s1 = *s2 = 0.0; }
    #endif
    /* Which of setup.py's builds this CPU (and OS) can run: 0 baseline, 1 AVX2,
       2 AVX-512 (F, CD, VL, DQ, BW: the flags that build is compiled with). */
    static int nk_cpu_level(void) {
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd")
                && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
                && __builtin_cpu_supports("avx512bw"))
            return 2;
        return __builtin_cpu_supports("avx2") ? 1 : 0;
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
    """
    const char* NORMKIT_BUILD_CFLAGS
    const char* NORMKIT_BUILD_LDFLAGS
    const char* NORMKIT_BUILD_OPENMP_NOTE
    const char* NORMKIT_BUILD_COMPILER
    const char* NORMKIT_BUILD_CYTHON
    int NK_OPENMP_VERSION
    const char* NK_SIMD
    enum: NK_ACC
    enum: NK_HAVE_VEC
    void nk_shifted_f32(const float* p, Py_ssize_t n, double k, double* s1, double* s2) nogil
    int nk_cpu_level()
    int nk_omp_max_threads() nogil

NAME = "cython"

ctypedef fused real:
    float
    double

cdef enum:
    CHUNK = 2048       # elements of one two-pass block (8 KiB f32 / 16 KiB f64: stays in L1)
    SEG = 16384        # elements of one parallel work unit when rows/planes are split
    NOGIL_MIN = 4096   # release the GIL from this many elements on
    ALIGN = 16         # elementwise thread ranges start at multiples of 16 elements

cdef int _nthreads = 1             # set_num_threads; read (with the GIL) at each call
cdef Py_ssize_t _par_min = 32768   # elements below which a call stays serial
cdef bint _parallel_used = False   # an OpenMP region ran in this process
cdef bint _fork_serial = False     # forked after a parallel region: never enter one


# ====================================================================== runtime
def set_num_threads(n):
    """Threads every later call may use (from any Python thread)."""
    global _nthreads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads expects a positive int, got {n!r}")
    _nthreads = min(n, 1 << 16)


def get_num_threads():
    return _nthreads


def _set_parallel_min(Py_ssize_t n):
    """Testing aid: the element count from which calls go parallel (default 32768)."""
    global _par_min
    cdef Py_ssize_t old = _par_min
    _par_min = max(n, 0)
    return old


def _team_size(Py_ssize_t work):
    """Testing aid: how many OpenMP threads a call over `work` elements runs on now."""
    cdef int nt = _team(work, 1 << 30)
    cdef Py_ssize_t i
    cdef int seen[256]
    if nt <= 1:
        return 1
    if nt > 256:
        nt = 256
    for i in range(nt):
        seen[i] = -1
    for i in prange(nt, schedule='static', num_threads=nt, nogil=True):
        seen[i] = threadid()
    return len({seen[i] for i in range(nt)})


def _after_fork_in_child():
    # libgomp keeps its thread pool across fork() but the threads are gone in the
    # child, so the next parallel region there can wait for them forever. A child
    # forked after a parallel region therefore runs every kernel serially.
    global _fork_serial
    if _parallel_used:
        _fork_serial = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cpu_simd_level():
    """Which build this CPU can run: 0 baseline, 1 AVX2, 2 AVX-512."""
    return nk_cpu_level()


def _split_flags(const char* s):
    return s.decode("utf-8", "replace").split()


def info():
    """What was built and how calls run (for ``python -m normkit info``)."""
    import numpy
    d = {
        "openmp": NK_OPENMP_VERSION != 0,
        "openmp_version": NK_OPENMP_VERSION or None,
        "openmp_build_note": NORMKIT_BUILD_OPENMP_NOTE.decode("utf-8", "replace"),
        "module": __name__,
        "simd": NK_SIMD.decode(),
        "cflags": _split_flags(NORMKIT_BUILD_CFLAGS),
        "ldflags": _split_flags(NORMKIT_BUILD_LDFLAGS),
        "compiler": NORMKIT_BUILD_COMPILER.decode("utf-8", "replace"),
        "cython": NORMKIT_BUILD_CYTHON.decode("utf-8", "replace"),
        "numpy": numpy.__version__,
        "threads": _nthreads,
        "omp_max_threads": nk_omp_max_threads() if not _fork_serial else None,
        "parallel_min_elements": _par_min,
        "serial_after_fork": bool(_fork_serial),
    }
    if _fork_serial:
        d["note"] = ("forked after an OpenMP region ran in the parent: kernels run "
                     "serially in this process (libgomp is not fork-safe)")
    elif not d["openmp"]:
        d["note"] = "built without OpenMP: kernels run serially"
    return d


cdef inline int _team(Py_ssize_t work, Py_ssize_t units) noexcept:
    """Threads for one call (called with the GIL held); 1 means no OpenMP region."""
    global _parallel_used
    cdef int nt = _nthreads
    if nt < 2 or NK_OPENMP_VERSION == 0 or _fork_serial or work < _par_min or units < 2:
        return 1
    if nt > units:
        nt = <int>units
    _parallel_used = True
    return nt


# ====================================================================== checks
cdef int _bad(object a, int tn, int nd, str name, bint writeable) except -1:
    want = "float32" if tn == cnp.NPY_FLOAT else "float64"
    if not isinstance(a, cnp.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.ndim != nd:
        raise ValueError(f"{name} must have {nd} dimensions, got shape {a.shape}")
    if a.dtype != want:
        raise TypeError(f"{name} must be {want} in native byte order, got {a.dtype}")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    raise ValueError(f"{name} must be C-contiguous, aligned and in native byte order")


cdef inline int _dtype(cnp.ndarray x) except -1:
    cdef int tn = cnp.PyArray_TYPE(x)
    if tn != cnp.NPY_FLOAT and tn != cnp.NPY_DOUBLE:
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    return tn


cdef inline int _in(cnp.ndarray a, int tn, int nd, str name) except -1:
    if cnp.PyArray_TYPE(a) != tn or cnp.PyArray_NDIM(a) != nd or not cnp.PyArray_ISCARRAY_RO(a):
        _bad(a, tn, nd, name, False)
    return 0


cdef inline int _out(cnp.ndarray a, int tn, int nd, str name) except -1:
    if cnp.PyArray_TYPE(a) != tn or cnp.PyArray_NDIM(a) != nd or not cnp.PyArray_ISCARRAY(a):
        _bad(a, tn, nd, name, True)
    return 0


cdef inline int _same(cnp.ndarray a, cnp.ndarray b, str name) except -1:
    cdef int i
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, i) != cnp.PyArray_DIM(b, i):
            raise ValueError(f"{name} has shape {(<object>b).shape}, expected {(<object>a).shape}")
    return 0


cdef inline int _vec(cnp.ndarray a, int tn, Py_ssize_t k, str name) except -1:
    _in(a, tn, 1, name)
    if cnp.PyArray_DIM(a, 0) != k:
        raise ValueError(f"{name} has shape {(<object>a).shape}, expected ({k},)")
    return 0


cdef inline Py_ssize_t _params(cnp.ndarray x, int tn, Py_ssize_t n, Py_ssize_t c,
                               tuple ps, tuple names) except -1:
    """Check per-channel parameters (N', C) with N' in {1, N}; return N'."""
    cdef cnp.ndarray p
    cdef Py_ssize_t npr = -1, i
    for i in range(len(ps)):
        p = <cnp.ndarray?>ps[i]
        _in(p, tn, 2, names[i])
        if npr < 0:
            npr = cnp.PyArray_DIM(p, 0)
        if cnp.PyArray_DIM(p, 0) != npr or cnp.PyArray_DIM(p, 1) != c or (npr != 1 and npr != n):
            raise ValueError(f"{names[i]} has shape {(<object>p).shape}, expected (1, {c}) or ({n}, {c}) "
                             "like the other parameters")
    return npr


cdef int _nonempty(cnp.ndarray x) except -1:
    """Reductions need data (the public functions handle size 0 before the kernels)."""
    if cnp.PyArray_SIZE(x) == 0:
        raise ValueError(f"normkit kernels need non-empty arrays, got shape {(<object>x).shape}")
    return 0


cdef inline object _empty(int nd, Py_ssize_t a, Py_ssize_t b):
    cdef cnp.npy_intp dims[2]
    dims[0] = a
    dims[1] = b
    return cnp.PyArray_EMPTY(nd, dims, cnp.NPY_DOUBLE, 0)


cdef inline double* _dp(object a) noexcept:
    return <double*>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline char* _p(cnp.ndarray a) noexcept:
    return <char*>cnp.PyArray_DATA(a)


cdef double* _workspace(Py_ssize_t n) except? NULL:
    """n doubles of scratch (NULL when n == 0); the caller frees it."""
    if n <= 0:
        return NULL
    cdef double* w = <double*>malloc(n * sizeof(double))
    if w == NULL:
        raise MemoryError(f"normkit: cannot allocate {n * 8} bytes of scratch")
    return w


# ====================================================================== primitives
# Reductions keep NK_ACC independent double accumulators: gcc vectorizes them without
# reassociating anything (so no -ffast-math, and NaN/Inf propagate), where a single
# accumulator runs at the add latency (~5x slower). One reduction per loop: gcc does
# not vectorize two reductions in one loop (they stay scalar, ~2x slower); where one
# pass with two sums matters (float32 moments) it is written with explicit vectors
# (nk_shifted_f32 above).

cdef inline double _fold(double* a) noexcept nogil:
    """Sum the NK_ACC accumulators pairwise."""
    cdef Py_ssize_t w = NK_ACC // 2, j
    while w > 0:
        for j in range(w):
            a[j] += a[j + w]
        w //= 2
    return a[0]


cdef inline double _sum(const real* p, Py_ssize_t n) noexcept nogil:
    """sum(p[:n]) in double."""
    cdef double a[NK_ACC]
    cdef Py_ssize_t i = 0, j
    for j in range(NK_ACC):
        a[j] = 0.0
    while i + NK_ACC <= n:
        for j in range(NK_ACC):
            a[j] += p[i + j]
        i += NK_ACC
    cdef double s = _fold(a)
    while i < n:
        s += p[i]
        i += 1
    return s


cdef inline double _sumc(const real* p, Py_ssize_t n, double k) noexcept nogil:
    """sum(p[:n] - k) in double: with k one of the values, the rounding error is
    relative to the spread of the data, not to its magnitude."""
    cdef double a[NK_ACC]
    cdef Py_ssize_t i = 0, j
    for j in range(NK_ACC):
        a[j] = 0.0
    while i + NK_ACC <= n:
        for j in range(NK_ACC):
            a[j] += p[i + j] - k
        i += NK_ACC
    cdef double s = _fold(a)
    while i < n:
        s += p[i] - k
        i += 1
    return s


cdef inline double _ssd(const real* p, Py_ssize_t n, double m) noexcept nogil:
    """sum((p[:n] - m)**2) in double."""
    cdef double a[NK_ACC]
    cdef double d
    cdef Py_ssize_t i = 0, j
    for j in range(NK_ACC):
        a[j] = 0.0
    while i + NK_ACC <= n:
        for j in range(NK_ACC):
            d = p[i + j] - m
            a[j] += d * d
        i += NK_ACC
    cdef double s = _fold(a)
    while i < n:
        d = p[i] - m
        s += d * d
        i += 1
    return s


cdef inline double _dotc(const real* p, const real* q, Py_ssize_t n, double m) noexcept nogil:
    """sum(p * (q - m)) over n values in double."""
    cdef double a[NK_ACC]
    cdef Py_ssize_t i = 0, j
    for j in range(NK_ACC):
        a[j] = 0.0
    while i + NK_ACC <= n:
        for j in range(NK_ACC):
            a[j] += <double>p[i + j] * (q[i + j] - m)
        i += NK_ACC
    cdef double s = _fold(a)
    while i < n:
        s += <double>p[i] * (q[i] - m)
        i += 1
    return s


cdef inline double _dot(const real* p, const real* q, Py_ssize_t n) noexcept nogil:
    """sum(p * q) over n values in double."""
    cdef double a[NK_ACC]
    cdef Py_ssize_t i = 0, j
    for j in range(NK_ACC):
        a[j] = 0.0
    while i + NK_ACC <= n:
        for j in range(NK_ACC):
            a[j] += <double>p[i + j] * q[i + j]
        i += NK_ACC
    cdef double s = _fold(a)
    while i < n:
        s += <double>p[i] * q[i]
        i += 1
    return s


cdef inline double _dot3c(const real* p, const real* q, const real* r, Py_ssize_t n,
                          double m) noexcept nogil:
    """sum(p * q * (r - m)) over n values in double."""
    cdef double a[NK_ACC]
    cdef Py_ssize_t i = 0, j
    for j in range(NK_ACC):
        a[j] = 0.0
    while i + NK_ACC <= n:
        for j in range(NK_ACC):
            a[j] += (<double>p[i + j] * q[i + j]) * (r[i + j] - m)
        i += NK_ACC
    cdef double s = _fold(a)
    while i < n:
        s += (<double>p[i] * q[i]) * (r[i] - m)
        i += 1
    return s


cdef inline void _chan(double* mean, double* m2, double na,
                       double mb, double m2b, double nb) noexcept nogil:
    """Merge (nb, mb, m2b) into the running (na, mean, m2): Chan et al."""
    cdef double n = na + nb
    cdef double delta = mb - mean[0]
    mean[0] += delta * (nb / n)
    m2[0] += m2b + delta * delta * (na * (nb / n))


cdef void _moments(const real* p, Py_ssize_t n, double* mean, double* m2) noexcept nogil:
    """Mean and M2 of p[:n], by blocks of CHUNK values merged with Chan's formula.

    A block takes two passes (the second reads L1, so memory is read once): the sum of
    deviations from the block's first value k (rounding error relative to the spread,
    not to |mean|), then the squared deviations from the block mean. float32 takes
    one pass instead (nk_shifted_f32), s1 = sum(p - k), s2 = sum((p - k)**2),
    m2 = s2 - s1**2/n:
    since k is one of the values, (k - mean)**2 <= m2 and the subtraction cancels at
    most a factor n <= CHUNK (~1e-13 relative in double)."""
    cdef Py_ssize_t done = 0, ln
    cdef double cm, cm2, k
    while done < n:
        ln = n - done
        if ln > CHUNK:
            ln = CHUNK
        k = p[done]
        if real is float and NK_HAVE_VEC:
            nk_shifted_f32(p + done, ln, k, &cm, &cm2)
            cm2 = cm2 - cm * (cm / ln)
            if cm2 < 0.0:
                cm2 = 0.0
            cm = k + cm / ln
        else:
            cm = k + _sumc(p + done, ln, k) / ln
            cm2 = _ssd(p + done, ln, cm)
        if done == 0:
            mean[0] = cm
            m2[0] = cm2
        else:
            _chan(mean, m2, <double>done, cm, cm2, <double>ln)
        done += ln


cdef inline Py_ssize_t _cut(Py_ssize_t total, Py_ssize_t parts, Py_ssize_t i) noexcept nogil:
    """Start of part i of [0, total) split in `parts` (multiples of ALIGN)."""
    if i >= parts:
        return total
    return (total * i // parts) // ALIGN * ALIGN


# ====================================================================== plane_moments
cdef void _plane_moments(const real* x, Py_ssize_t P, Py_ssize_t S, Py_ssize_t nseg,
                         double* mean, double* m2, double* part, int nt) noexcept nogil:
    cdef Py_ssize_t u, r, j, start, ln
    cdef double na
    if nseg == 1:
        if nt > 1:
            for r in prange(P, schedule='static', num_threads=nt):
                _moments(x + r * S, S, mean + r, m2 + r)
        else:
            for r in range(P):
                _moments(x + r * S, S, mean + r, m2 + r)
        return
    # long rows: units of SEG elements, partials merged per row in order
    if nt > 1:
        for u in prange(P * nseg, schedule='static', num_threads=nt):
            start = (u % nseg) * SEG
            ln = S - start
            if ln > SEG:
                ln = SEG
            _moments(x + (u // nseg) * S + start, ln, part + 2 * u, part + 2 * u + 1)
    else:
        for u in range(P * nseg):
            start = (u % nseg) * SEG
            ln = S - start
            if ln > SEG:
                ln = SEG
            _moments(x + (u // nseg) * S + start, ln, part + 2 * u, part + 2 * u + 1)
    for r in range(P):
        u = r * nseg
        mean[r] = part[2 * u]
        m2[r] = part[2 * u + 1]
        na = SEG
        for j in range(1, nseg):
            ln = S - j * SEG
            if ln > SEG:
                ln = SEG
            _chan(mean + r, m2 + r, na, part[2 * (u + j)], part[2 * (u + j) + 1], <double>ln)
            na += ln


cdef object _plane_moments_call(cnp.ndarray x, int tn, Py_ssize_t P, Py_ssize_t S):
    mean = _empty(1, P, 0)
    m2 = _empty(1, P, 0)
    cdef Py_ssize_t nseg = (S + SEG - 1) // SEG
    cdef double* part = _workspace(2 * P * nseg if nseg > 1 else 0)
    cdef int nt = _team(P * S, P * nseg)
    cdef double* pm = _dp(mean)
    cdef double* pv = _dp(m2)
    cdef char* px = _p(x)
    if P * S >= NOGIL_MIN:
        with nogil:
            if tn == cnp.NPY_FLOAT:
                _plane_moments(<const float*>px, P, S, nseg, pm, pv, part, nt)
            else:
                _plane_moments(<const double*>px, P, S, nseg, pm, pv, part, nt)
    elif tn == cnp.NPY_FLOAT:
        _plane_moments(<const float*>px, P, S, nseg, pm, pv, part, nt)
    else:
        _plane_moments(<const double*>px, P, S, nseg, pm, pv, part, nt)
    free(part)
    return mean, m2


def plane_moments(cnp.ndarray x not None):
    """(P, S) -> mean f64[P], m2 f64[P]: per-row mean and centered sum of squares."""
    cdef int tn = _dtype(x)
    _in(x, tn, 2, "x")
    _nonempty(x)
    return _plane_moments_call(x, tn, cnp.PyArray_DIM(x, 0), cnp.PyArray_DIM(x, 1))


# ====================================================================== channels_last_moments
cdef void _cl_unit(const real* x, Py_ssize_t rows, Py_ssize_t C, Py_ssize_t crows,
                   double* um, double* um2, double* cm, double* cm2) noexcept nogil:
    """Per-column mean/M2 of x[:rows, :C] into um/um2 (cm/cm2: C doubles of scratch).
    Blocks of crows rows, each summed as deviations from its first row (see
    _moments), merged by Chan's formula."""
    cdef Py_ssize_t done = 0, ln, r, c
    cdef double* t1
    cdef double* t2
    cdef const real* q
    cdef const real* k
    cdef double d, inv, na, nb, n, f
    while done < rows:
        ln = rows - done
        if ln > crows:
            ln = crows
        if done == 0:
            t1 = um
            t2 = um2
        else:
            t1 = cm
            t2 = cm2
        memset(t1, 0, C * sizeof(double))
        memset(t2, 0, C * sizeof(double))
        k = x + done * C
        for r in range(1, ln):
            q = k + r * C
            for c in range(C):
                d = <double>q[c] - <double>k[c]
                t1[c] += d
                t2[c] += d * d
        inv = 1.0 / ln
        for c in range(C):
            d = t1[c]
            t1[c] = k[c] + d * inv
            t2[c] = t2[c] - d * (d * inv)
            if t2[c] < 0.0:
                t2[c] = 0.0
        if done > 0:
            na = done
            nb = ln
            n = na + nb
            f = na * (nb / n)
            for c in range(C):
                d = cm[c] - um[c]
                um[c] += d * (nb / n)
                um2[c] += cm2[c] + d * d * f
        done += ln


cdef void _cl_moments(const real* x, Py_ssize_t N, Py_ssize_t S, Py_ssize_t C,
                      Py_ssize_t crows, Py_ssize_t srows, Py_ssize_t nseg,
                      double* mean, double* m2, double* part, int nt) noexcept nogil:
    cdef Py_ssize_t u, n, j, r0, ln, c
    cdef double* um
    cdef double* scratch
    cdef double* dst
    cdef double na, nb, tot, d, f
    # scratch for each unit's current chunk: 2*C doubles per unit, at the end of part
    if nt > 1:
        for u in prange(N * nseg, schedule='static', num_threads=nt):
            n = u // nseg
            r0 = (u % nseg) * srows
            ln = S - r0
            if ln > srows:
                ln = srows
            if nseg == 1:
                dst = mean + n * C
                um = m2 + n * C
            else:
                dst = part + 2 * u * C
                um = dst + C
            scratch = part + 2 * N * nseg * C * (nseg > 1) + 2 * u * C
            _cl_unit(x + (n * S + r0) * C, ln, C, crows, dst, um, scratch, scratch + C)
    else:
        for u in range(N * nseg):
            n = u // nseg
            r0 = (u % nseg) * srows
            ln = S - r0
            if ln > srows:
                ln = srows
            if nseg == 1:
                dst = mean + n * C
                um = m2 + n * C
            else:
                dst = part + 2 * u * C
                um = dst + C
            scratch = part + 2 * N * nseg * C * (nseg > 1) + 2 * u * C
            _cl_unit(x + (n * S + r0) * C, ln, C, crows, dst, um, scratch, scratch + C)
    if nseg == 1:
        return
    for n in range(N):
        u = n * nseg
        memcpy(mean + n * C, part + 2 * u * C, C * sizeof(double))
        memcpy(m2 + n * C, part + 2 * u * C + C, C * sizeof(double))
        na = srows
        for j in range(1, nseg):
            ln = S - j * srows
            if ln > srows:
                ln = srows
            nb = ln
            tot = na + nb
            f = na * (nb / tot)
            dst = part + 2 * (u + j) * C
            for c in range(C):
                d = dst[c] - mean[n * C + c]
                mean[n * C + c] += d * (nb / tot)
                m2[n * C + c] += dst[C + c] + d * d * f
            na = tot


def channels_last_moments(cnp.ndarray x not None):
    """(N, S, C) -> mean f64[N, C], m2 f64[N, C] over S."""
    cdef int tn = _dtype(x)
    _in(x, tn, 3, "x")
    _nonempty(x)
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), S = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t C = cnp.PyArray_DIM(x, 2)
    if C == 1:   # (N, S, 1) is (N, S) rows
        mean, m2 = _plane_moments_call(x, tn, N, S)
        return mean.reshape(N, 1), m2.reshape(N, 1)
    mean = _empty(2, N, C)
    m2 = _empty(2, N, C)
    cdef Py_ssize_t crows = max(8, CHUNK // C)
    cdef Py_ssize_t srows = max(crows, (SEG // C) // crows * crows)
    cdef Py_ssize_t nseg = (S + srows - 1) // srows
    cdef Py_ssize_t units = N * nseg
    # partials (2*C per unit, when rows are split) + chunk scratch (2*C per unit)
    cdef double* part = _workspace(2 * units * C * (1 + (nseg > 1)))
    cdef int nt = _team(N * S * C, units)
    cdef double* pm = _dp(mean)
    cdef double* pv = _dp(m2)
    cdef char* px = _p(x)
    if N * S * C >= NOGIL_MIN:
        with nogil:
            if tn == cnp.NPY_FLOAT:
                _cl_moments(<const float*>px, N, S, C, crows, srows, nseg, pm, pv, part, nt)
            else:
                _cl_moments(<const double*>px, N, S, C, crows, srows, nseg, pm, pv, part, nt)
    elif tn == cnp.NPY_FLOAT:
        _cl_moments(<const float*>px, N, S, C, crows, srows, nseg, pm, pv, part, nt)
    else:
        _cl_moments(<const double*>px, N, S, C, crows, srows, nseg, pm, pv, part, nt)
    free(part)
    return mean, m2


# ====================================================================== rows_forward
cdef void _row_forward(const real* x, const real* w, const real* b, real* out,
                       Py_ssize_t K, double eps, bint rms,
                       double* mean_out, double* rstd_out) noexcept nogil:
    cdef double mean = 0.0, m2, var, rstd
    cdef real mh, ml, rs, rs2
    cdef Py_ssize_t k
    if rms:
        var = _ssd(x, K, 0.0) / K
    else:
        _moments(x, K, &mean, &m2)
        var = m2 / K
    if var < 0.0:
        var = 0.0
    rstd = 1.0 / sqrt(var + eps)
    mean_out[0] = mean
    rstd_out[0] = rstd
    rs = <real>rstd
    if rms:
        for k in range(K):
            out[k] = x[k] * rs * w[k]
    else:
        # mean = mh + ml exactly enough: x - mh is exact when x is near the mean
        # (Sterbenz), so float32 rows with |mean| >> std keep their digits.
        mh = <real>mean
        ml = <real>(mean - <double>mh)
        rs2 = rs * <real>2     # halves, as in _affine_run: x - mean cannot overflow
        if fabs(ml * rstd) > 1e-9:
            ml = ml * <real>0.5
            mh = mh * <real>0.5
            for k in range(K):
                out[k] = ((x[k] * <real>0.5 - mh) - ml) * rs2 * w[k] + b[k]
        else:      # the low part shifts the output by < 1e-9: a float32 no-op
            mh = mh * <real>0.5
            for k in range(K):
                out[k] = (x[k] * <real>0.5 - mh) * rs2 * w[k] + b[k]


cdef void _rows_forward(const real* x, const real* w, const real* b, real* out,
                        Py_ssize_t R, Py_ssize_t K, double eps, bint rms,
                        double* mean, double* rstd, int nt) noexcept nogil:
    cdef Py_ssize_t r
    if nt > 1:
        for r in prange(R, schedule='static', num_threads=nt):
            _row_forward(x + r * K, w, b, out + r * K, K, eps, rms, mean + r, rstd + r)
    else:
        for r in range(R):
            _row_forward(x + r * K, w, b, out + r * K, K, eps, rms, mean + r, rstd + r)


def rows_forward(cnp.ndarray x not None, cnp.ndarray weight not None,
                 cnp.ndarray bias not None, double eps, bint rms, cnp.ndarray out not None):
    """LayerNorm / RMSNorm forward over the last axis of (R, K) -> (mean, rstd)."""
    cdef int tn = _dtype(x)
    _in(x, tn, 2, "x")
    _nonempty(x)
    cdef Py_ssize_t R = cnp.PyArray_DIM(x, 0), K = cnp.PyArray_DIM(x, 1)
    _vec(weight, tn, K, "weight")
    _vec(bias, tn, K, "bias")
    _out(out, tn, 2, "out")
    _same(x, out, "out")
    mean = _empty(1, R, 0)
    rstd = _empty(1, R, 0)
    cdef int nt = _team(R * K, R)
    cdef char* px = _p(x)
    cdef char* pw = _p(weight)
    cdef char* pb = _p(bias)
    cdef char* po = _p(out)
    cdef double* pm = _dp(mean)
    cdef double* ps = _dp(rstd)
    if R * K >= NOGIL_MIN:
        with nogil:
            if tn == cnp.NPY_FLOAT:
                _rows_forward(<const float*>px, <const float*>pw, <const float*>pb,
                              <float*>po, R, K, eps, rms, pm, ps, nt)
            else:
                _rows_forward(<const double*>px, <const double*>pw, <const double*>pb,
                              <double*>po, R, K, eps, rms, pm, ps, nt)
    elif tn == cnp.NPY_FLOAT:
        _rows_forward(<const float*>px, <const float*>pw, <const float*>pb,
                      <float*>po, R, K, eps, rms, pm, ps, nt)
    else:
        _rows_forward(<const double*>px, <const double*>pw, <const double*>pb,
                      <double*>po, R, K, eps, rms, pm, ps, nt)
    return mean, rstd


# ====================================================================== rows_backward
cdef void _row_backward(const real* dy, const real* x, const real* w, real* dx,
                        Py_ssize_t K, double mean, double rstd, bint rms,
                        double* dw, double* db) noexcept nogil:
    cdef double d, s_g, s_gx, proj, mg
    cdef real a, c, b0, mh, ml
    cdef Py_ssize_t k
    # row sums of g = dy * w and g * (x - mean), in double (one loop each: gcc
    # vectorizes one reduction per loop, not two)
    s_g = _dot(dy, w, K)
    s_gx = _dot3c(dy, w, x, K, mean) * rstd
    # this row's share of dweight / dbias (a buffer private to this block of rows)
    for k in range(K):
        d = dy[k]
        dw[k] += d * ((x[k] - mean) * rstd)
        db[k] += d
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) = a*g + c*(x - mean) + b0
    proj = s_gx / K
    mg = 0.0 if rms else s_g / K
    a = <real>rstd
    c = <real>(-rstd * rstd * proj)
    b0 = <real>(-rstd * mg)
    mh = <real>mean
    ml = <real>(mean - <double>mh)
    for k in range(K):
        dx[k] = a * (dy[k] * w[k]) + (c * ((x[k] - mh) - ml) + b0)


cdef void _rows_backward(const real* dy, const real* x, const double* mean, const double* rstd,
                         const real* w, real* dx, Py_ssize_t R, Py_ssize_t K, bint rms,
                         Py_ssize_t nblk, Py_ssize_t rpb, double* dw, double* db,
                         double* work, int nt) noexcept nogil:
    """Rows in nblk blocks of rpb rows. Block 0 sums dweight/dbias into dw/db, block
    b > 0 into its own buffer work[2*K*(b-1):]; the buffers are then added in order."""
    cdef Py_ssize_t blk, r, k
    cdef double* bw
    if nt > 1:
        for blk in prange(nblk, schedule='static', num_threads=nt):
            bw = work + 2 * K * (blk - 1) if blk > 0 else NULL
            _rows_backward_block(dy, x, mean, rstd, w, dx, blk * rpb, min(R, (blk + 1) * rpb),
                                 K, rms, dw if blk == 0 else bw, db if blk == 0 else bw + K)
    else:
        for blk in range(nblk):
            bw = work + 2 * K * (blk - 1) if blk > 0 else NULL
            _rows_backward_block(dy, x, mean, rstd, w, dx, blk * rpb, min(R, (blk + 1) * rpb),
                                 K, rms, dw if blk == 0 else bw, db if blk == 0 else bw + K)
    for blk in range(1, nblk):
        bw = work + 2 * K * (blk - 1)
        for k in range(K):
            dw[k] += bw[k]
        for k in range(K):
            db[k] += bw[K + k]


cdef void _rows_backward_block(const real* dy, const real* x, const double* mean,
                               const double* rstd, const real* w, real* dx,
                               Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K, bint rms,
                               double* dw, double* db) noexcept nogil:
    cdef Py_ssize_t r
    memset(dw, 0, K * sizeof(double))
    memset(db, 0, K * sizeof(double))
    for r in range(r0, r1):
        _row_backward(dy + r * K, x + r * K, w, dx + r * K, K, mean[r], rstd[r], rms, dw, db)


def rows_backward(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray mean not None,
                  cnp.ndarray rstd not None, cnp.ndarray weight not None, bint rms,
                  cnp.ndarray dx not None):
    """LayerNorm / RMSNorm backward -> (dweight f64[K], dbias f64[K]); writes dx."""
    cdef int tn = _dtype(x)
    _in(x, tn, 2, "x")
    _nonempty(x)
    cdef Py_ssize_t R = cnp.PyArray_DIM(x, 0), K = cnp.PyArray_DIM(x, 1)
    _in(dy, tn, 2, "dy")
    _same(x, dy, "dy")
    _vec(mean, cnp.NPY_DOUBLE, R, "mean")
    _vec(rstd, cnp.NPY_DOUBLE, R, "rstd")
    _vec(weight, tn, K, "weight")
    _out(dx, tn, 2, "dx")
    _same(x, dx, "dx")
    # fixed blocks of >= 8 rows and >= 32K elements (at most 64): the dweight/dbias
    # partials do not depend on the thread count, and their reduction stays small.
    cdef Py_ssize_t rpb = max(8, (32768 + K - 1) // K, (R + 63) // 64)
    cdef Py_ssize_t nblk = (R + rpb - 1) // rpb
    dweight = _empty(1, K, 0)
    dbias = _empty(1, K, 0)
    cdef double* work = _workspace(2 * K * (nblk - 1))
    cdef int nt = _team(R * K, nblk)
    cdef char* pdy = _p(dy)
    cdef char* px = _p(x)
    cdef char* pw = _p(weight)
    cdef char* pdx = _p(dx)
    cdef const double* pm = _dp(mean)
    cdef const double* ps = _dp(rstd)
    cdef double* pdw = _dp(dweight)
    cdef double* pdb = _dp(dbias)
    if R * K >= NOGIL_MIN:
        with nogil:
            if tn == cnp.NPY_FLOAT:
                _rows_backward(<const float*>pdy, <const float*>px, pm, ps, <const float*>pw,
                               <float*>pdx, R, K, rms, nblk, rpb, pdw, pdb, work, nt)
            else:
                _rows_backward(<const double*>pdy, <const double*>px, pm, ps, <const double*>pw,
                               <double*>pdx, R, K, rms, nblk, rpb, pdw, pdb, work, nt)
    elif tn == cnp.NPY_FLOAT:
        _rows_backward(<const float*>pdy, <const float*>px, pm, ps, <const float*>pw,
                       <float*>pdx, R, K, rms, nblk, rpb, pdw, pdb, work, nt)
    else:
        _rows_backward(<const double*>pdy, <const double*>px, pm, ps, <const double*>pw,
                       <double*>pdx, R, K, rms, nblk, rpb, pdw, pdb, work, nt)
    free(work)
    return dweight, dbias


# ====================================================================== per-channel passes
# Channels-first (N, C, S): plane p = n*C + c; its parameters sit at p (N' = N) or
# p % C (N' = 1). Channels-last (N, S, C): row r = n*S + s; parameter row r // S or 0.
# Elementwise passes split the flat element (or row) range evenly between threads.

cdef inline real _halfdiff(real x, real m, real a) noexcept nogil:
    """(x - m) * a computed as (x/2 - m/2) * (2a): power-of-two scalings are exact, so
    the same bits, but x - m cannot overflow for data near the float maximum."""
    return (x * <real>0.5 - m * <real>0.5) * (a * <real>2)


cdef inline void _affine_run(const real* p, real* q, const real* r, Py_ssize_t n,
                             real m, real a, real b, bint relu) noexcept nogil:
    """q = (p - m) * a + b [+ r] [then ReLU] over n values. The four loops keep the
    plain affine exactly the plain expression. r may be q (in-place residual add):
    each element is read before it is written. ReLU: y < 0 ? 0 : y keeps NaN."""
    cdef Py_ssize_t k
    cdef real y
    # (x/2 - m/2) * (2a): power-of-two scalings are exact, so these are the bits of
    # (x - m) * a, but x - m cannot overflow for data near the float maximum
    m = m * <real>0.5
    a = a * <real>2
    if r == NULL:
        if not relu:
            for k in range(n):
                q[k] = (p[k] * <real>0.5 - m) * a + b
        else:
            for k in range(n):
                y = (p[k] * <real>0.5 - m) * a + b
                q[k] = 0 if y < 0 else y
    elif not relu:
        for k in range(n):
            q[k] = (p[k] * <real>0.5 - m) * a + b + r[k]
    else:
        for k in range(n):
            y = (p[k] * <real>0.5 - m) * a + b + r[k]
            q[k] = 0 if y < 0 else y


cdef void _cf_affine_range(const real* x, real* out, const real* sh, const real* sc,
                           const real* of, const real* res, bint relu,
                           Py_ssize_t C, Py_ssize_t S, bint per_sample,
                           Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t plane, s0, e, pi, o
    if lo >= hi:
        return
    plane = lo // S
    s0 = lo - plane * S
    while lo < hi:
        e = S if hi - lo >= S - s0 else s0 + (hi - lo)
        pi = plane if per_sample else plane % C
        o = plane * S + s0
        _affine_run(x + o, out + o, res + o if res != NULL else NULL, e - s0,
                    sh[pi], sc[pi], of[pi], relu)
        lo += e - s0
        plane += 1
        s0 = 0


cdef void _cl_affine_range(const real* x, real* out, const real* sh, const real* sc,
                           const real* of, const real* res, bint relu,
                           Py_ssize_t S, Py_ssize_t C, bint per_sample,
                           Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t r, c, pi, o
    cdef const real* p
    cdef const real* rr
    cdef real* q
    cdef real y
    for r in range(lo, hi):
        pi = (r // S) * C if per_sample else 0
        o = r * C
        p = x + o
        q = out + o
        if res == NULL:
            if not relu:
                for c in range(C):
                    q[c] = _halfdiff(p[c], sh[pi + c], sc[pi + c]) + of[pi + c]
            else:
                for c in range(C):
                    y = _halfdiff(p[c], sh[pi + c], sc[pi + c]) + of[pi + c]
                    q[c] = 0 if y < 0 else y
        else:
            rr = res + o
            if not relu:
                for c in range(C):
                    q[c] = _halfdiff(p[c], sh[pi + c], sc[pi + c]) + of[pi + c] + rr[c]
            else:
                for c in range(C):
                    y = _halfdiff(p[c], sh[pi + c], sc[pi + c]) + of[pi + c] + rr[c]
                    q[c] = 0 if y < 0 else y


cdef void _affine(const real* x, real* out, const real* sh, const real* sc, const real* of,
                  const real* res, bint relu, Py_ssize_t N, Py_ssize_t A, Py_ssize_t B,
                  bint per_sample, bint last, int nt) noexcept nogil:
    """channels-first: (N, A=C, B=S); channels-last: (N, A=S, B=C)."""
    cdef Py_ssize_t t, total = N * A * B if not last else N * A
    if nt > 1:
        for t in prange(nt, schedule='static', num_threads=nt):
            if last:
                _cl_affine_range(x, out, sh, sc, of, res, relu, A, B, per_sample,
                                 _cut(total, nt, t), _cut(total, nt, t + 1))
            else:
                _cf_affine_range(x, out, sh, sc, of, res, relu, A, B, per_sample,
                                 _cut(total, nt, t), _cut(total, nt, t + 1))
    elif last:
        _cl_affine_range(x, out, sh, sc, of, res, relu, A, B, per_sample, 0, total)
    else:
        _cf_affine_range(x, out, sh, sc, of, res, relu, A, B, per_sample, 0, total)


cdef _affine_call(cnp.ndarray x, cnp.ndarray shift, cnp.ndarray scale, cnp.ndarray offset,
                  object residual, bint relu, cnp.ndarray out, bint last):
    cdef int tn = _dtype(x)
    _in(x, tn, 3, "x")
    _out(out, tn, 3, "out")
    _same(x, out, "out")
    cdef char* pr = NULL
    if residual is not None:
        _in(<cnp.ndarray?>residual, tn, 3, "residual")
        _same(x, residual, "residual")
        pr = _p(residual)
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), A = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t B = cnp.PyArray_DIM(x, 2)
    cdef Py_ssize_t C = B if last else A
    cdef Py_ssize_t npr = _params(x, tn, N, C, (shift, scale, offset), ("shift", "scale", "offset"))
    cdef bint per = npr != 1 and N != 1
    if last and C == 1:            # (N, S, 1) is channels-first (N, 1, S)
        last = False
        A, B = 1, A
    elif not last and B == 1:      # (N, C, 1) is channels-last (N, 1, C)
        last = True
        A, B = 1, A
    if N * A * B == 0:
        return
    cdef Py_ssize_t work = N * A * B
    # one read + one write per element is cheap: half weight against _par_min
    cdef int nt = _team(work // 2 if pr == NULL else work, work // 8192 + 1)
    cdef char* px = _p(x)
    cdef char* po = _p(out)
    cdef char* p1 = _p(shift)
    cdef char* p2 = _p(scale)
    cdef char* p3 = _p(offset)
    if work >= NOGIL_MIN:
        with nogil:
            if tn == cnp.NPY_FLOAT:
                _affine(<const float*>px, <float*>po, <const float*>p1, <const float*>p2,
                        <const float*>p3, <const float*>pr, relu, N, A, B, per, last, nt)
            else:
                _affine(<const double*>px, <double*>po, <const double*>p1, <const double*>p2,
                        <const double*>p3, <const double*>pr, relu, N, A, B, per, last, nt)
    elif tn == cnp.NPY_FLOAT:
        _affine(<const float*>px, <float*>po, <const float*>p1, <const float*>p2,
                <const float*>p3, <const float*>pr, relu, N, A, B, per, last, nt)
    else:
        _affine(<const double*>px, <double*>po, <const double*>p1, <const double*>p2,
                <const double*>p3, <const double*>pr, relu, N, A, B, per, last, nt)


def channels_first_affine(cnp.ndarray x not None, cnp.ndarray shift not None,
                          cnp.ndarray scale not None, cnp.ndarray offset not None,
                          cnp.ndarray out not None):
    """out = (x - shift) * scale + offset on (N, C, S), parameters (N', C)."""
    _affine_call(x, shift, scale, offset, None, False, out, False)


def channels_last_affine(cnp.ndarray x not None, cnp.ndarray shift not None,
                         cnp.ndarray scale not None, cnp.ndarray offset not None,
                         cnp.ndarray out not None):
    """out = (x - shift) * scale + offset on (N, S, C), parameters (N', C)."""
    _affine_call(x, shift, scale, offset, None, False, out, True)


def channels_first_affine_act(cnp.ndarray x not None, cnp.ndarray shift not None,
                              cnp.ndarray scale not None, cnp.ndarray offset not None,
                              residual, bint relu, cnp.ndarray out not None):
    """out = (x - shift) * scale + offset [+ residual], then ReLU (NaN kept) if relu;
    (N, C, S), parameters (N', C); residual may be out."""
    _affine_call(x, shift, scale, offset, residual, relu, out, False)


def channels_last_affine_act(cnp.ndarray x not None, cnp.ndarray shift not None,
                             cnp.ndarray scale not None, cnp.ndarray offset not None,
                             residual, bint relu, cnp.ndarray out not None):
    """out = (x - shift) * scale + offset [+ residual], then ReLU (NaN kept) if relu;
    (N, S, C), parameters (N', C); residual may be out."""
    _affine_call(x, shift, scale, offset, residual, relu, out, True)


# ---------------------------------------------------------------------- group_forward
cdef void _block_moments(const real* p, Py_ssize_t n, double* mean, double* m2) noexcept nogil:
    """_moments over segments of SEG values merged in order: exactly what
    _plane_moments computes for a row, whichever path (and thread count) runs."""
    cdef Py_ssize_t j, ln, nseg = (n + SEG - 1) // SEG
    cdef double cm, cm2, na
    if nseg == 1:
        _moments(p, n, mean, m2)
        return
    _moments(p, SEG, mean, m2)
    na = SEG
    for j in range(1, nseg):
        ln = n - j * SEG
        if ln > SEG:
            ln = SEG
        _moments(p + j * SEG, ln, &cm, &cm2)
        _chan(mean, m2, na, cm, cm2, <double>ln)
        na += ln


cdef inline void _group_coefs(double mean, double m2, Py_ssize_t L, double eps, real w,
                              real b, real* shift, real* scale, real* offset,
                              double* rstd_out) noexcept nogil:
    """out = (x - shift) * scale + offset for one channel of a group: the mean split
    into a float shift and its remainder folded into the offset (in double), the
    same numbers as plane_moments followed by channels_first_affine."""
    cdef double rstd = 1.0 / sqrt(m2 / L + eps)
    cdef double sc = rstd * w
    cdef real mh = <real>mean
    rstd_out[0] = rstd
    shift[0] = mh
    scale[0] = <real>sc
    offset[0] = <real>(b - (mean - <double>mh) * sc)


cdef void _group_block(const real* x, real* out, Py_ssize_t Cg, Py_ssize_t S,
                       const real* w, const real* b, double eps,
                       double* mean, double* rstd) noexcept nogil:
    """One (sample, group) block of Cg * S contiguous values: statistics, then the
    normalization while the block is still in cache."""
    cdef Py_ssize_t c
    cdef double m2
    cdef real m, a, o
    _block_moments(x, Cg * S, mean, &m2)
    for c in range(Cg):
        _group_coefs(mean[0], m2, Cg * S, eps, w[c], b[c], &m, &a, &o, rstd)
        _affine_run(x + c * S, out + c * S, <const real*>NULL, S, m, a, o, False)


cdef void _group_forward(const real* x, real* out, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                         Py_ssize_t G, const real* w, const real* b, double eps,
                         double* mean, double* rstd, real* coef, double* part,
                         int nt) noexcept nogil:
    cdef Py_ssize_t Cg = C // G, L = Cg * S, nb = N * G, nseg = (L + SEG - 1) // SEG
    cdef Py_ssize_t u, blk, c, j, ln
    cdef double m2, na
    if coef == NULL:         # one block per task: statistics and output in one visit
        if nt > 1:
            for blk in prange(nb, schedule='static', num_threads=nt):
                _group_block(x + blk * L, out + blk * L, Cg, S, w + (blk % G) * Cg,
                             b + (blk % G) * Cg, eps, mean + blk, rstd + blk)
        else:
            for blk in range(nb):
                _group_block(x + blk * L, out + blk * L, Cg, S, w + (blk % G) * Cg,
                             b + (blk % G) * Cg, eps, mean + blk, rstd + blk)
        return
    # few long blocks: split the statistics (units of SEG values, merged in order as in
    # _block_moments), then one elementwise pass with per-(sample, channel) coefficients
    for u in prange(nb * nseg, schedule='static', num_threads=nt):
        j = u % nseg
        ln = L - j * SEG
        if ln > SEG:
            ln = SEG
        _moments(x + (u // nseg) * L + j * SEG, ln, part + 2 * u, part + 2 * u + 1)
    for blk in range(nb):
        u = blk * nseg
        mean[blk] = part[2 * u]
        m2 = part[2 * u + 1]
        na = SEG
        for j in range(1, nseg):
            ln = L - j * SEG
            if ln > SEG:
                ln = SEG
            _chan(mean + blk, &m2, na, part[2 * (u + j)], part[2 * (u + j) + 1], <double>ln)
            na += ln
        for c in range(Cg):
            j = blk * Cg + c          # (sample, channel) index
            _group_coefs(mean[blk], m2, L, eps, w[(blk % G) * Cg + c], b[(blk % G) * Cg + c],
                         coef + j, coef + N * C + j, coef + 2 * N * C + j, rstd + blk)
    _affine(x, out, coef, coef + N * C, coef + 2 * N * C, <const real*>NULL, False,
            N, C, S, True, False, nt)


def channels_first_group_forward(cnp.ndarray x not None, groups, cnp.ndarray weight not None,
                                 cnp.ndarray bias not None, double eps,
                                 cnp.ndarray out not None):
    """GroupNorm forward on (N, C, S): per (sample, group) statistics, then
    out = (x - mean) * rstd * weight[c] + bias[c]; returns (mean, rstd) f64[N, G]."""
    cdef int tn = _dtype(x)
    _in(x, tn, 3, "x")
    _nonempty(x)
    _out(out, tn, 3, "out")
    _same(x, out, "out")
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t S = cnp.PyArray_DIM(x, 2)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or C % groups:
        raise ValueError(f"groups must be a positive int dividing C={C}, got {groups!r}")
    cdef Py_ssize_t G = groups
    _vec(weight, tn, C, "weight")
    _vec(bias, tn, C, "bias")
    mean = _empty(2, N, G)
    rstd = _empty(2, N, G)
    cdef Py_ssize_t L = (C // G) * S, nb = N * G, nseg = (L + SEG - 1) // SEG
    cdef int nt = _team(N * C * S, nb * nseg)
    cdef double* part = NULL
    cdef double* coef = NULL
    # one task per block unless that leaves threads idle: then split long blocks
    if nt > 1 and nseg > 1 and nb < 4 * nt:
        part = _workspace(2 * nb * nseg)
        coef = _workspace(3 * N * C)      # shift, scale, offset as `real` (<= double)
    cdef char* px = _p(x)
    cdef char* po = _p(out)
    cdef char* pw = _p(weight)
    cdef char* pb = _p(bias)
    cdef double* pm = _dp(mean)
    cdef double* ps = _dp(rstd)
    if N * C * S >= NOGIL_MIN:
        with nogil:
            if tn == cnp.NPY_FLOAT:
                _group_forward(<const float*>px, <float*>po, N, C, S, G, <const float*>pw,
                               <const float*>pb, eps, pm, ps, <float*>coef, part, nt)
            else:
                _group_forward(<const double*>px, <double*>po, N, C, S, G, <const double*>pw,
                               <const double*>pb, eps, pm, ps, <double*>coef, part, nt)
    elif tn == cnp.NPY_FLOAT:
        _group_forward(<const float*>px, <float*>po, N, C, S, G, <const float*>pw,
                       <const float*>pb, eps, pm, ps, <float*>coef, part, nt)
    else:
        _group_forward(<const double*>px, <double*>po, N, C, S, G, <const double*>pw,
                       <const double*>pb, eps, pm, ps, <double*>coef, part, nt)
    free(part)
    free(coef)
    return mean, rstd


# ---------------------------------------------------------------------- grad_apply
cdef void _cf_apply_range(const real* dy, const real* x, real* dx, const real* sh,
                          const real* cdy, const real* cx, const real* c1,
                          Py_ssize_t C, Py_ssize_t S, bint per_sample,
                          Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t plane, s0, e, k, pi, o
    cdef real m, a, b, z
    if lo >= hi:
        return
    plane = lo // S
    s0 = lo - plane * S
    while lo < hi:
        e = S if hi - lo >= S - s0 else s0 + (hi - lo)
        pi = plane if per_sample else plane % C
        m = sh[pi]
        a = cdy[pi]
        b = cx[pi]
        z = c1[pi]
        o = plane * S
        for k in range(o + s0, o + e):
            dx[k] = a * dy[k] + (b * (x[k] - m) + z)
        lo += e - s0
        plane += 1
        s0 = 0


cdef void _cl_apply_range(const real* dy, const real* x, real* dx, const real* sh,
                          const real* cdy, const real* cx, const real* c1,
                          Py_ssize_t S, Py_ssize_t C, bint per_sample,
                          Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t r, c, pi, o
    for r in range(lo, hi):
        pi = (r // S) * C if per_sample else 0
        o = r * C
        for c in range(C):
            dx[o + c] = cdy[pi + c] * dy[o + c] + (cx[pi + c] * (x[o + c] - sh[pi + c]) + c1[pi + c])


cdef void _apply(const real* dy, const real* x, real* dx, const real* sh, const real* cdy,
                 const real* cx, const real* c1, Py_ssize_t N, Py_ssize_t A, Py_ssize_t B,
                 bint per_sample, bint last, int nt) noexcept nogil:
    cdef Py_ssize_t t, total = N * A * B if not last else N * A
    if nt > 1:
        for t in prange(nt, schedule='static', num_threads=nt):
            if last:
                _cl_apply_range(dy, x, dx, sh, cdy, cx, c1, A, B, per_sample,
                                _cut(total, nt, t), _cut(total, nt, t + 1))
            else:
                _cf_apply_range(dy, x, dx, sh, cdy, cx, c1, A, B, per_sample,
                                _cut(total, nt, t), _cut(total, nt, t + 1))
    elif last:
        _cl_apply_range(dy, x, dx, sh, cdy, cx, c1, A, B, per_sample, 0, total)
    else:
        _cf_apply_range(dy, x, dx, sh, cdy, cx, c1, A, B, per_sample, 0, total)


cdef _apply_call(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray shift, cnp.ndarray coef_dy,
                 cnp.ndarray coef_x, cnp.ndarray coef_1, cnp.ndarray dx, bint last):
    cdef int tn = _dtype(x)
    _in(x, tn, 3, "x")
    _in(dy, tn, 3, "dy")
    _same(x, dy, "dy")
    _out(dx, tn, 3, "dx")
    _same(x, dx, "dx")
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), A = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t B = cnp.PyArray_DIM(x, 2)
    cdef Py_ssize_t C = B if last else A
    cdef Py_ssize_t npr = _params(x, tn, N, C, (shift, coef_dy, coef_x, coef_1),
                                  ("shift", "coef_dy", "coef_x", "coef_1"))
    cdef bint per = npr != 1 and N != 1
    if last and C == 1:
        last = False
        A, B = 1, A
    elif not last and B == 1:
        last = True
        A, B = 1, A
    if N * A * B == 0:
        return
    cdef Py_ssize_t work = N * A * B
    cdef int nt = _team(work, work // 8192 + 1)
    cdef char* pdy = _p(dy)
    cdef char* px = _p(x)
    cdef char* pdx = _p(dx)
    cdef char* p1 = _p(shift)
    cdef char* p2 = _p(coef_dy)
    cdef char* p3 = _p(coef_x)
    cdef char* p4 = _p(coef_1)
    if work >= NOGIL_MIN:
        with nogil:
            if tn == cnp.NPY_FLOAT:
                _apply(<const float*>pdy, <const float*>px, <float*>pdx, <const float*>p1,
                       <const float*>p2, <const float*>p3, <const float*>p4, N, A, B, per, last, nt)
            else:
                _apply(<const double*>pdy, <const double*>px, <double*>pdx, <const double*>p1,
                       <const double*>p2, <const double*>p3, <const double*>p4, N, A, B, per, last, nt)
    elif tn == cnp.NPY_FLOAT:
        _apply(<const float*>pdy, <const float*>px, <float*>pdx, <const float*>p1,
               <const float*>p2, <const float*>p3, <const float*>p4, N, A, B, per, last, nt)
    else:
        _apply(<const double*>pdy, <const double*>px, <double*>pdx, <const double*>p1,
               <const double*>p2, <const double*>p3, <const double*>p4, N, A, B, per, last, nt)


def channels_first_grad_apply(cnp.ndarray dy not None, cnp.ndarray x not None,
                              cnp.ndarray shift not None, cnp.ndarray coef_dy not None,
                              cnp.ndarray coef_x not None, cnp.ndarray coef_1 not None,
                              cnp.ndarray dx not None):
    """dx = coef_dy * dy + coef_x * (x - shift) + coef_1 on (N, C, S)."""
    _apply_call(dy, x, shift, coef_dy, coef_x, coef_1, dx, False)


def channels_last_grad_apply(cnp.ndarray dy not None, cnp.ndarray x not None,
                             cnp.ndarray shift not None, cnp.ndarray coef_dy not None,
                             cnp.ndarray coef_x not None, cnp.ndarray coef_1 not None,
                             cnp.ndarray dx not None):
    """dx = coef_dy * dy + coef_x * (x - shift) + coef_1 on (N, S, C)."""
    _apply_call(dy, x, shift, coef_dy, coef_x, coef_1, dx, True)


# ---------------------------------------------------------------------- grad_sums
cdef void _gs_plane(const real* dy, const real* x, double m, Py_ssize_t n,
                    double* sdy, double* sdyx) noexcept nogil:
    """sum(dy) and sum(dy * (x - m)) over n values: one loop per sum (each
    vectorizes), over L1-sized blocks."""
    cdef Py_ssize_t done = 0, ln
    cdef double s = 0.0, t = 0.0
    while done < n:
        ln = n - done
        if ln > CHUNK:
            ln = CHUNK
        s += _sum(dy + done, ln)
        t += _dotc(dy + done, x + done, ln, m)
        done += ln
    sdy[0] = s
    sdyx[0] = t


cdef void _gs_rows(const real* dy, const real* x, const real* sh, Py_ssize_t rows,
                   Py_ssize_t C, double* sdy, double* sdyx) noexcept nogil:
    """Per-column sum(dy) and sum(dy * (x - sh)) over rows of (rows, C)."""
    cdef Py_ssize_t r, c, o
    cdef double d
    memset(sdy, 0, C * sizeof(double))
    memset(sdyx, 0, C * sizeof(double))
    for r in range(rows):
        o = r * C
        for c in range(C):
            d = dy[o + c]
            sdy[c] += d
            sdyx[c] += d * (<double>x[o + c] - <double>sh[c])


cdef void _grad_sums(const real* dy, const real* x, const real* sh, Py_ssize_t N,
                     Py_ssize_t A, Py_ssize_t B, bint per_sample, bint last,
                     Py_ssize_t seg, Py_ssize_t nseg, double* sdy, double* sdyx,
                     double* part, int nt) noexcept nogil:
    """Units of `seg` elements (first: plane p = unit // nseg) or `seg` rows (last:
    sample n = unit // nseg); partials in `part` when nseg > 1, added in order."""
    cdef Py_ssize_t u, P, j, k, C, base
    P = N * A if not last else N
    C = B if last else A
    if nt > 1:
        for u in prange(P * nseg, schedule='static', num_threads=nt):
            _gs_unit(dy, x, sh, N, A, B, per_sample, last, seg, nseg, u, sdy, sdyx, part)
    else:
        for u in range(P * nseg):
            _gs_unit(dy, x, sh, N, A, B, per_sample, last, seg, nseg, u, sdy, sdyx, part)
    if nseg == 1:
        return
    if not last:
        for j in range(P):
            base = 2 * j * nseg
            sdy[j] = part[base]
            sdyx[j] = part[base + 1]
            for k in range(1, nseg):
                sdy[j] += part[base + 2 * k]
                sdyx[j] += part[base + 2 * k + 1]
    else:
        for j in range(P):
            base = 2 * j * nseg * C
            memcpy(sdy + j * C, part + base, C * sizeof(double))
            memcpy(sdyx + j * C, part + base + C, C * sizeof(double))
            for k in range(1, nseg):
                for u in range(C):
                    sdy[j * C + u] += part[base + 2 * k * C + u]
                for u in range(C):
                    sdyx[j * C + u] += part[base + 2 * k * C + C + u]


cdef inline void _gs_unit(const real* dy, const real* x, const real* sh, Py_ssize_t N,
                          Py_ssize_t A, Py_ssize_t B, bint per_sample, bint last,
                          Py_ssize_t seg, Py_ssize_t nseg, Py_ssize_t u,
                          double* sdy, double* sdyx, double* part) noexcept nogil:
    cdef Py_ssize_t p = u // nseg, start = (u % nseg) * seg, ln, C, pi
    cdef double* o1
    cdef double* o2
    if not last:     # (N, C=A, S=B): plane p
        ln = B - start
        if ln > seg:
            ln = seg
        pi = p if per_sample else p % A
        if nseg == 1:
            o1 = sdy + p
            o2 = sdyx + p
        else:
            o1 = part + 2 * u
            o2 = o1 + 1
        _gs_plane(dy + p * B + start, x + p * B + start, <double>sh[pi], ln, o1, o2)
    else:            # (N, S=A, C=B): sample p, rows [start, start + ln)
        C = B
        ln = A - start
        if ln > seg:
            ln = seg
        pi = p * C if per_sample else 0
        if nseg == 1:
            o1 = sdy + p * C
            o2 = sdyx + p * C
        else:
            o1 = part + 2 * u * C
            o2 = o1 + C
        _gs_rows(dy + (p * A + start) * C, x + (p * A + start) * C, sh + pi, ln, C, o1, o2)


cdef _grad_sums_call(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray shift, bint last):
    cdef int tn = _dtype(x)
    _in(x, tn, 3, "x")
    _nonempty(x)
    _in(dy, tn, 3, "dy")
    _same(x, dy, "dy")
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), A = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t B = cnp.PyArray_DIM(x, 2)
    cdef Py_ssize_t C = B if last else A
    cdef Py_ssize_t npr = _params(x, tn, N, C, (shift,), ("shift",))
    cdef bint per = npr != 1 and N != 1
    sdy = _empty(2, N, C)
    sdyx = _empty(2, N, C)
    if last and C == 1:
        last = False
        A, B = 1, A
    elif not last and B == 1:
        last = True
        A, B = 1, A
    cdef Py_ssize_t seg, nseg, units, nwork
    if last:
        seg = max(1, SEG // B)                   # rows per unit
        nseg = (A + seg - 1) // seg
        units = N * nseg
        nwork = 2 * units * B if nseg > 1 else 0
    else:
        seg = SEG
        nseg = (B + seg - 1) // seg
        units = N * A * nseg
        nwork = 2 * units if nseg > 1 else 0
    cdef double* part = _workspace(nwork)
    cdef Py_ssize_t work = N * A * B
    cdef int nt = _team(work, units)
    cdef char* pdy = _p(dy)
    cdef char* px = _p(x)
    cdef char* ps = _p(shift)
    cdef double* o1 = _dp(sdy)
    cdef double* o2 = _dp(sdyx)
    if work >= NOGIL_MIN:
        with nogil:
            if tn == cnp.NPY_FLOAT:
                _grad_sums(<const float*>pdy, <const float*>px, <const float*>ps, N, A, B,
                           per, last, seg, nseg, o1, o2, part, nt)
            else:
                _grad_sums(<const double*>pdy, <const double*>px, <const double*>ps, N, A, B,
                           per, last, seg, nseg, o1, o2, part, nt)
    elif tn == cnp.NPY_FLOAT:
        _grad_sums(<const float*>pdy, <const float*>px, <const float*>ps, N, A, B,
                   per, last, seg, nseg, o1, o2, part, nt)
    else:
        _grad_sums(<const double*>pdy, <const double*>px, <const double*>ps, N, A, B,
                   per, last, seg, nseg, o1, o2, part, nt)
    free(part)
    return sdy, sdyx


def channels_first_grad_sums(cnp.ndarray dy not None, cnp.ndarray x not None,
                             cnp.ndarray shift not None):
    """(N, C, S) -> sum(dy), sum(dy * (x - shift)) over S, each f64[N, C]."""
    return _grad_sums_call(dy, x, shift, False)


def channels_last_grad_sums(cnp.ndarray dy not None, cnp.ndarray x not None,
                            cnp.ndarray shift not None):
    """(N, S, C) -> sum(dy), sum(dy * (x - shift)) over S, each f64[N, C]."""
    return _grad_sums_call(dy, x, shift, True)
