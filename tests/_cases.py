"""The test suite's one case table, one data generator and one set of error bounds.

Data: :func:`make` builds every input of the suite from a *kind* (what the values are)
and a *layout* (how they sit in memory), as numbagg's and bottleneck's test helpers do.

Tolerances: no test states a bare ``rtol=1e-11``. Every comparison of a computed result
with a reference uses a bound derived here from the length of the reduction, the unit
roundoff of the dtype and the conditioning of the data, so it holds for any summation
order (serial, pairwise, per-thread chunks merged in any order, SIMD lanes), any thread
count, with or without FMA contraction, on any CPU.

Derivation
----------
``u`` is the unit roundoff of a dtype (``finfo.eps / 2``: 2**-53 float64, 2**-24
float32, 2**-11 float16, 2**-8 bfloat16) and ``gamma(n) = n u / (1 - n u)``.

* **Sums.** Whatever the order (any binary tree of additions has depth <= n - 1) and
  whether or not a multiply is fused into the add (an FMA rounds once instead of twice),
  a computed sum of n terms satisfies ``|fl(sum) - sum| <= gamma(n-1) * sum|terms|``
  (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sec. 4.2). Terms
  that are themselves products or differences formed in float64 add a few ``u`` each:
  :func:`gamma` is taken at ``n + 3``.
* **Mean.** ``|mean_hat - mean| <= gamma(n + 1) * mean|x|``.
* **Centered M2** (sum of squared deviations). For every algorithm the kernel contract
  allows (two-pass, Welford updating, Chan pairwise merges) the relative error is at
  most ``n u kappa + (n u kappa)**2`` to within a small constant, with the condition
  number ``kappa = sqrt(sum x^2 / M2)`` (about ``|mean| / std + 1``): Chan, Golub &
  LeVeque, "Algorithms for computing the sample variance", Amer. Stat. 37 (1983), table 1
  (two-pass ``n u + n^2 u^2 kappa^2``; updating ``n u kappa``; pairwise ``u kappa log n``).
  In absolute terms: ``|dM2| <= c (gamma(n) sqrt(M2 * sum x^2) + gamma(n)^2 sum x^2)``,
  which stays meaningful for constant data (M2 = 0). ``E[x^2] - E[x]^2`` has error
  ``n u kappa^2`` and fails these bounds on the offset data.
* **Normalized output** ``y = (x - mean) * rstd * w + b`` in the data dtype ``d``: the
  contract (``_spec.py``: "the centered form keeps float32 accurate") forms ``x - mean``
  to working precision of ``d`` (the mean kept as a float64 or as a float32 hi/lo pair),
  then ~5 rounded operations in ``d``. Per element::

      |dy| <= |w| rstd (d_mean + |x - mean| d_rstd/rstd) + 8 u_d (|w| rstd |x - mean| + |b|)
              + 2 u_d^2 |w| rstd |mean|

  where ``d_mean`` and ``d_rstd`` are the statistics bounds above (float64). The
  "conditioning" of the output is ``rstd * mean|x|`` (~ ``|mean|/std + 1``): it
  multiplies the reduction error, exactly the ``eps * (|mean|/std + 1) * f(K)`` shape.
* **Elementwise passes** (affine, gradient apply, residual add): each output is a few
  rounded operations in ``d`` on the same inputs the float64 reference sees, so
  ``|dy| <= 8 u_d * (sum of the magnitudes of the terms)``.

Every bound counts the kernel's error *and* the reference's (factor 2 in the reduction
terms; the reference is float64, so its share of the ``u_d`` terms is included in the 8).

* **16-bit data** (float16, bfloat16; ``_spec.py``): the kernel widens x exactly to
  float32, computes the elementwise result in float32 and rounds it once to the 16-bit
  dtype; the reference computes in float64 and rounds once (``numpy_ref.narrow``).
  Both see the same 16-bit inputs, so input quantization cancels. With ``B32`` the
  float32 bound above (``u_d`` = u32: the elementwise operations are float32's) and y
  the exact result: kernel ``|k - y| <= B32 + u16 (|y| + B32)``, reference
  ``|o - y| <= u16 |y|`` (its float64 error is inside B32), so
  ``|k - o| <= B32 (1 + u16) + 2 u16 |y| + s``: the float32 terms plus one 16-bit ulp
  of the result, ``s`` the subnormal spacing (each side's rounding is at most half of
  it where the result is subnormal). Terms of the float64 reductions may be formed in
  float32 for 16-bit data (``term_roundoff``): a few u32 of each term's magnitude
  more in the statistics and gradient sums.
The float64 results of a kernel (statistics, gradient sums) are accumulated from terms
formed in float64, as the contract requires ("float32 data is accumulated in double
precision").

Cross-checks against torch compare two *independent* float64 (or float32) computations
of a whole norm; :func:`tol_normalized` and :func:`tol_grad` give the scalar
``assert_allclose`` arguments for those, from the same bounds with the data's
conditioning passed in.
"""
from __future__ import annotations

import ml_dtypes  # a dependency of normkit (bfloat16)
import numpy as np
import pytest

import normkit

# ============================================================ the case table
BACKENDS = normkit.available_backends()
KERNEL_DTYPES = [np.float32, np.float64]          # the full-precision storage dtypes
HALF_DTYPES = ["float16", "bfloat16"]             # the 16-bit storage dtypes (issue 13)

# THE switch for 16-bit data in the compiled backends: a backend listed here still
# rejects float16/bfloat16 at the kernel boundary (its 16-bit kernels are on another
# branch), so its 16-bit rows are expected to raise TypeError -- strict xfail, never a
# skip: once the backend accepts 16-bit data they XPASS and fail until it leaves this
# set. The lead empties it after merging the cython and numba 16-bit work.
PENDING_16BIT: set = set()
KINDS = ["normal", "offset", "constant"]          # value kinds every kernel is run on
LAYOUTS = ["contiguous", "strided", "negative", "fortran", "readonly", "byteswapped"]
ODD_SIZES = (1, 3, 17, 1023)

# (N, C, S) triples: odd sizes, a single element, long planes (split across threads),
# many channels, N = 1 (BatchNorm NHWC splits S)
SHAPES3 = [(1, 1, 1), (1, 3, 17), (2, 3, 1), (3, 17, 5), (2, 5, 1023), (17, 1, 3),
           (1, 64, 130), (4, 1023, 3), (1, 2, 70000), (2, 7, 40000)]
# (R, K) rows: odd sizes, a single row, long rows
SHAPES2 = [(1, 1), (1, 8), (3, 17), (17, 3), (5, 1023), (2, 4096), (513, 33), (1, 70000)]


def api_dtypes():
    """dtypes of the public API as pytest params: float32/float64/float16/bfloat16.
    (With a backend in the grid, use :func:`backend_dtype_params`.)"""
    return [pytest.param(d, id=d) for d in ("float32", "float64", "float16", "bfloat16")]


def np_dtype(name):
    """np.dtype for a name of the table or a dtype-like (bfloat16 from ml_dtypes)."""
    if isinstance(name, str) and name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_half(dtype):
    """float16 (either byte order) or bfloat16."""
    dt = np_dtype(dtype)
    return dt.itemsize == 2 and (dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16))


def dtype_name(dtype):
    return np_dtype(dtype).name


def pending_16bit(backend, dtype):
    """The marks of a (backend, dtype) row: strict xfail(TypeError) while ``backend`` is
    in PENDING_16BIT and ``dtype`` is 16-bit, else none."""
    if backend in PENDING_16BIT and is_half(dtype):
        return [pytest.mark.xfail(raises=TypeError, strict=True,
                                  reason=f"{backend}: 16-bit kernels pending merge "
                                         "(issue 13; tests/_cases.py PENDING_16BIT)")]
    return []


def backend_dtype_params(backends=None, dtypes=None):
    """(backend, dtype name) pytest params over every backend and dtype, with the
    PENDING_16BIT marks."""
    backends = BACKENDS if backends is None else backends
    dtypes = ["float32", "float64", *HALF_DTYPES] if dtypes is None else dtypes
    return [pytest.param(b, dtype_name(d), id=f"{b}-{dtype_name(d)}",
                         marks=pending_16bit(b, d))
            for b in backends for d in dtypes]


# ============================================================ the data generator
def values(shape, kind="normal", seed=0):
    """float64 values of one kind.

    normal: N(0.5, 2^2). offset: mean 1e4, std 1 (catches E[x^2] - E[x]^2 and an
    uncentered x*a + b in float32). constant: 1234 everywhere (M2 must be 0, not NaN).
    small_spread: 100 +- 0.01. nonfinite: normal with a NaN, +Inf and -Inf planted at
    fixed flat positions (element 0 stays finite).

    Kinds for 16-bit data, whose 11 (float16) or 8 (bfloat16) significant bits cannot
    hold "1e4 +- 1" (float16 spacing at 1e4 is 8, bfloat16's 64): offset_f16: N(100, 1)
    (spacing 1/16 at 100: |mean|/std = 100 with 16 steps per std); offset_bf16: N(10, 1)
    (spacing 1/16 at 10); large: N(0, 1e4^2) clipped to +-6e4 (float16's max is 65504:
    squares and sums overflow a 16-bit accumulator); tiny: N(0, 1) * 1e-5 (float16
    subnormals start below 6.1e-5).
    """
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(shape) * 2.0 + 0.5
    if kind == "offset":
        return rng.standard_normal(shape) + 1e4
    if kind == "offset_f16":
        return rng.standard_normal(shape) + 100.0
    if kind == "offset_bf16":
        return rng.standard_normal(shape) + 10.0
    if kind == "large":
        return np.clip(rng.standard_normal(shape) * 1e4, -6e4, 6e4)
    if kind == "tiny":
        return rng.standard_normal(shape) * 1e-5
    if kind == "constant":
        return np.full(shape, 1234.0)
    if kind == "small_spread":
        return rng.standard_normal(shape) * 0.01 + 100.0
    if kind == "nonfinite":
        a = rng.standard_normal(shape)
        flat = a.reshape(-1)
        for i, v in zip((3, 10, 17), (np.nan, np.inf, -np.inf)):
            if i < flat.size:
                flat[i] = v
        return a
    raise ValueError(f"unknown data kind {kind!r}")


def in_layout(a, layout):
    """The same values as ``a`` in another memory layout (a fresh array each call)."""
    if layout == "contiguous":
        return np.ascontiguousarray(a).copy()
    if layout == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "negative":
        return a[..., ::-1].copy()[..., ::-1]
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "readonly":
        r = np.array(a, copy=True)
        r.setflags(write=False)
        return r
    if layout == "byteswapped":
        if np.dtype(a.dtype) == np.dtype(ml_dtypes.bfloat16):
            raise ValueError("bfloat16 has no byte-swapped NumPy dtype (ml_dtypes gives "
                             "'>V2', a void type)")
        return np.array(a, dtype=np.dtype(a.dtype).newbyteorder())
    raise ValueError(f"unknown layout {layout!r}")


def make(shape, dtype=np.float64, kind="normal", layout="contiguous", seed=0):
    """Test data: ``values(shape, kind, seed)`` cast to ``dtype`` (a name or a dtype)
    and laid out as ``layout``. ``kind="offset"`` on 16-bit dtypes is the offset kind
    that dtype can hold (offset_f16 / offset_bf16)."""
    dt = np_dtype(dtype)
    if kind == "offset" and is_half(dt):
        kind = "offset_f16" if dt.kind == "f" else "offset_bf16"
    return in_layout(values(shape, kind, seed).astype(dt), layout)


def offset_center(dtype):
    """The mean of ``make(..., kind="offset")`` data of ``dtype``."""
    dt = np_dtype(dtype)
    if not is_half(dt):
        return 1e4
    return 100.0 if dt.kind == "f" else 10.0


def param_dtype(dtype):
    """The kernels' parameter dtype for data of ``dtype`` (``_spec.py``)."""
    return np.dtype(np.float64) if np_dtype(dtype).itemsize == 8 else np.dtype(np.float32)


def readonly(a):
    """A C-contiguous read-only copy (kernels must accept read-only inputs)."""
    r = np.array(a, copy=True, order="C")
    r.setflags(write=False)
    return r


# ============================================================ error bounds
U64 = 2.0 ** -53
U32 = 2.0 ** -24


def unit_roundoff(dtype):
    """finfo(dtype).eps / 2 (works for bfloat16 via ml_dtypes)."""
    return float(ml_dtypes.finfo(np_dtype(dtype)).eps) / 2


def compute_roundoff(dtype):
    """Unit roundoff of the kernels' elementwise arithmetic for data of ``dtype``:
    float32's for 16-bit data (widened in registers), the dtype's own otherwise."""
    return unit_roundoff(np.float32) if is_half(dtype) else unit_roundoff(dtype)


def term_roundoff(dtype):
    """Extra relative error of each term of a float64 reduction: 0 for float32/64 data
    (terms formed in float64), u32 for 16-bit data (terms may be formed in float32)."""
    return unit_roundoff(np.float32) if is_half(dtype) else 0.0


def narrowing(dtype, bound, result_abs):
    """``bound`` (a float32 bound of a 16-bit result) plus both sides' final rounding
    to 16 bits (module docstring): B32 (1 + u16) + 2 u16 |y| + the subnormal spacing.
    Returns ``bound`` unchanged for float32/float64."""
    if not is_half(dtype):
        return bound
    u = unit_roundoff(dtype)
    sub = float(ml_dtypes.finfo(np_dtype(dtype)).smallest_subnormal)
    return bound * (1 + u) + 2 * u * np.abs(_f64(result_abs)) + sub


def gamma(n, u=U64):
    """Higham's gamma_n = n u / (1 - n u): relative error bound of an n-term sum."""
    nu = (n + 3) * u                    # + 3: terms formed by a few float64 operations
    assert nu < 0.5, "reduction too long for the float64 bound"
    return nu / (1 - nu)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# The compiled backends' 16-bit statistics: d = x - k in float32, s1 = sum d and
# s2 = sum d^2 summed in float32 over short runs, the run sums added in double.
# Higham 4.2: a float32 sum whose tree has depth h, of terms rounded at most 3 times (d
# once, d^2 through d twice and the product once), has |ds1| <= G sum|x - k| and
# |ds2| <= G sum (x - k)^2 with G = gamma_{h+3}(u32). The depth h, per backend:
# * Cython (nk_half.h, nk_moments32 / nk_gsum): lanes that add at most M32_STEPS values
#   each, then 2 pairwise adds of the 4 accumulators: h = M32_STEPS + 2;
# * Numba (numba_sums.py): float32 sums of at most NUMBA_CHUNK16 values that LLVM
#   vectorizes under ``reassoc`` -- in whatever order it picks, so the bound takes the
#   worst tree, a sequential one: h = NUMBA_CHUNK16 - 1.
# The tests use the larger G (it bounds both). Blocks pass the check n (mean - k)^2 <= M2
# (else they are recomputed in double), so sum (x - k)^2 <= 2 M2 and
# sum|x - k| <= sqrt(2 n M2): mean within sqrt(2) G sigma, M2 within
# (2 + 2 sqrt(2)) G M2 per block (constants 2 and 6 with the check made on computed
# sums); merging blocks in double moves the between-block term by at most
# 2 G M2_row, so a row's M2 is within 8 G M2_row. bfloat16 squares below float32's
# normal range are subnormal: n 2^-150 more in s2 (float16's never are).
M32_STEPS = 16                  # nk_half.h NK_M32_STEPS
NUMBA_CHUNK16 = 256             # numba_sums._CHUNK16


def half_stat_roundoff(dtype):
    """G = gamma_{h+3}(u32) for 16-bit data, h the deeper of the two backends' float32
    sums (comment above), 0 for float32/float64 data (double sums)."""
    if not is_half(dtype):
        return 0.0
    h = max(M32_STEPS + 2, NUMBA_CHUNK16 - 1)
    nu = (h + 3) * U32
    return nu / (1 - nu)


def _half_underflow(dtype, n):
    """Absolute error of n float32 squares that may be subnormal (bfloat16 data): the
    float32 rounding of each is at most half its spacing 2^-149 (above: 2^-149 n covers
    kernel rounding and a margin)."""
    return n * 2.0 ** -149 if is_half(dtype) and np_dtype(dtype).kind != "f" else 0.0


def bound_mean(x, axis, dtype=None):
    """|mean_kernel - mean_ref| bound, per row: kernel and reference each within
    gamma(n + 1) * mean|x| of the exact mean; for 16-bit ``dtype`` (default x's) the
    kernel's float32 partial sums add 2 G sigma (``half_stat_roundoff``: comment above)."""
    dtype = x.dtype if dtype is None else dtype
    x = _f64(x)
    n = x.shape[axis]
    g = half_stat_roundoff(dtype)
    return 2 * gamma(n + 1) * np.abs(x).mean(axis=axis) + 2 * g * x.std(axis=axis)


def bound_m2(x, axis, dtype=None):
    """|M2_kernel - M2_ref| bound, per row (Chan, Golub & LeVeque; see the module
    docstring): 2 sides x 2 (constant of the published bound). For 16-bit ``dtype``
    the squared deviations may be formed in float32 around a float32 shift k within
    u32 |mean| of the mean: 4 u32 sum (|x - mean| + u32 |mean|)^2 more; and the
    kernel's float32 partial sums add 8 G M2 (+ the subnormal squares of bfloat16;
    ``half_stat_roundoff``, comment above bound_mean)."""
    dtype = x.dtype if dtype is None else dtype
    x = _f64(x)
    n = x.shape[axis]
    mean = x.mean(axis=axis, keepdims=True)
    m2 = ((x - mean) ** 2).sum(axis=axis)
    sumsq = (x * x).sum(axis=axis)
    g = gamma(n)
    ut = term_roundoff(dtype)
    terms = ((np.abs(x - mean) + ut * np.abs(mean)) ** 2).sum(axis=axis)
    half = 8 * half_stat_roundoff(dtype) * m2 + _half_underflow(dtype, n)
    return 4 * (g * np.sqrt(m2 * sumsq) + g * g * sumsq + g * m2) + 4 * ut * terms + half


def bound_rstd(x, axis, eps, rms=False, dtype=None):
    """|rstd_kernel - rstd_ref| bound, per row, rstd = 1/sqrt(var + eps): the relative
    error of rstd is half that of (var + eps), plus a few roundings (sqrt, divide).
    16-bit RMSNorm: sum(x^2) in float32 partial sums, G relative (x^2 of a 16-bit
    value is exact in float32 but for bfloat16's subnormal squares; comment above
    bound_mean), so G var (+ 2^-149 for those) more in var."""
    dtype = x.dtype if dtype is None else dtype
    x = _f64(x)
    n = x.shape[axis]
    if rms:
        var = (x * x).mean(axis=axis)
        d_var = (2 * gamma(n + 1) + 4 * term_roundoff(dtype)) * var   # non-negative terms
        d_var = d_var + half_stat_roundoff(dtype) * var + _half_underflow(dtype, 1)
    else:
        var = x.var(axis=axis)
        d_var = bound_m2(x, axis, dtype) / n
    rstd = 1 / np.sqrt(var + eps)
    return rstd * (0.5 * d_var / (var + eps) + 8 * U64)


def bound_normalized(x, axis, eps, weight, bias, dtype, rms=False):
    """Per-element bound on y = (x - mean) * rstd * w + b computed for data of ``dtype``
    against the float64 reference (module docstring, "Normalized output"; 16-bit data:
    the float32 bound plus the 16-bit rounding of both sides). ``weight`` and
    ``bias`` broadcast against x (None: 1 and 0); ``axis`` may be a tuple."""
    x = _f64(x)
    u = compute_roundoff(dtype)
    axes = axis if isinstance(axis, tuple) else (axis,)
    flat = _rows_last(x, axes)                   # (..., n) with the reduced axes last
    mean = np.zeros(flat.shape[:-1]) if rms else flat.mean(axis=-1)
    var = (flat * flat).mean(axis=-1) if rms else flat.var(axis=-1)
    rstd = 1 / np.sqrt(var + eps)
    d_mean = np.zeros_like(mean) if rms else bound_mean(flat, -1)
    d_rstd = bound_rstd(flat, -1, eps, rms, dtype)
    keep = lambda a: np.expand_dims(a, axes)
    xc = np.abs(x - keep(mean))
    w = np.abs(_f64(1.0 if weight is None else weight))
    b = np.abs(_f64(0.0 if bias is None else bias))
    r = keep(rstd)
    bound = (w * (r * keep(d_mean) + xc * keep(d_rstd))
             + 8 * u * (w * r * xc + b) + 2 * u * u * w * r * np.abs(keep(mean)))
    return narrowing(dtype, bound, w * r * xc + b)


def _rows_last(x, axes):
    axes = tuple(a % x.ndim for a in axes)
    keep = [i for i in range(x.ndim) if i not in axes]
    moved = np.transpose(x, keep + list(axes))
    return moved.reshape(moved.shape[:len(keep)] + (-1,))


def bound_elementwise(dtype, *terms):
    """Bound for a few rounded operations on data of ``dtype`` whose terms have these
    magnitudes (arrays broadcasting together): 8 u_d * sum |term| (u32 for 16-bit
    data, plus the 16-bit rounding of both sides, |result| <= sum |term|)."""
    total = sum(np.abs(_f64(t)) for t in terms)
    return narrowing(dtype, 8 * compute_roundoff(dtype) * total, total)


def bound_sum(abs_terms_sum, n, dtype=np.float64):
    """Bound for a float64 sum of n terms whose absolute values sum to abs_terms_sum
    (kernel and reference: 2 gamma(n)); for 16-bit data the terms (products of two
    factors formed in float32) carry 4 u32 more each, and the compiled kernels' float32
    partial sums (nk_half.h nk_gsum_*: runs of M32_STEPS values per lane) add
    G sum|terms| (G = ``half_stat_roundoff``; bfloat16: + n 2^-149 for subnormal
    float32 products)."""
    g = 2 * gamma(n) + 4 * term_roundoff(dtype) + half_stat_roundoff(dtype)
    return g * _f64(abs_terms_sum) + _half_underflow(dtype, n)


def assert_same(actual, desired, err_msg=""):
    """Equal values, NaN matching NaN, for every dtype (bfloat16 included, whose NaN
    NumPy's assert_array_equal does not recognise): compared widened to float64 (exact)."""
    np.testing.assert_array_equal(_f64(actual), _f64(desired), err_msg=err_msg)


def assert_within(actual, desired, bound, what=""):
    """|actual - desired| <= bound elementwise; NaN must match NaN and +-Inf must match
    exactly. The message names the worst element and its bound."""
    a, d = _f64(actual), _f64(desired)
    b = np.broadcast_to(_f64(bound), d.shape)
    assert a.shape == d.shape, f"{what}: shape {a.shape} != {d.shape}"
    np.testing.assert_array_equal(np.isnan(a), np.isnan(d), err_msg=f"{what}: NaN positions")
    inf = np.isinf(d)
    np.testing.assert_array_equal(a[inf], d[inf], err_msg=f"{what}: Inf values")
    fin = np.isfinite(d)
    with np.errstate(invalid="ignore"):
        excess = np.where(fin, np.abs(a - d) - b, -1.0)
    if excess.size and excess.max() > 0:
        i = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(
            f"{what}: |actual - desired| exceeds its error bound at {i}: actual {a[i]!r}, "
            f"desired {d[i]!r}, difference {abs(a[i] - d[i]):.3g}, bound {b[i]:.3g} "
            f"({int((excess > 0).sum())} of {excess.size} elements over)")


# ------------------------------------------------------------ scalar tolerances
def conditioning(mean, rstd):
    """max over statistics of rstd * |mean| + 1 >= rstd * mean|x| (since
    mean|x - mean| <= std): how much the normalization amplifies the reduction error;
    ~1 for centred data, 1e4 for the offset kind."""
    mean = 0.0 if mean is None else _f64(mean)
    return float(np.max(_f64(rstd) * np.abs(mean), initial=0.0)) + 1.0


def _acc_roundoff(dtype):
    """Unit roundoff of the accumulation: float64 data in float64; float32 and the 16-bit
    types in (at least) float32 -- torch's CPU norms accumulate float32 in float32."""
    return U64 if np.dtype(np_dtype(dtype) if isinstance(dtype, str) else dtype) == \
        np.float64 else 2.0 ** -24


def tol_normalized(dtype, n, cond=1.0, scale=1.0):
    """``assert_allclose`` kwargs for a normalized output computed in ``dtype`` by two
    independent implementations (normkit and torch, or two backends), each reducing n
    values per statistic.

    ``cond``: :func:`conditioning` of the data; ``scale``: an upper bound of |w|, |b|
    and |y| (pass the max of the three, at least 1). From the per-element bound (module
    docstring): the mean error amplified by rstd is gamma_n cond |w| per side, the rstd
    error times |xhat w| <= 2 scale adds 2 gamma_n cond scale per side, so
    8 gamma_n(u_acc) cond scale covers both sides; the last few operations in
    ``dtype`` add 8 u_d scale."""
    u = unit_roundoff(dtype)
    atol = 8 * gamma(n, _acc_roundoff(dtype)) * cond * scale + 8 * u * scale
    return dict(rtol=0.0, atol=atol)


def tol_grad(dtype, n, cond=1.0, scale=1.0):
    """``assert_allclose`` kwargs for dx, dweight, dbias of a norm. dx = rstd (g - mean(g)
    - xhat mean(g xhat)), g = dy w: two more n-term reductions whose terms are at most
    ``scale`` = rstd max|g| (1 + max|xhat|^2) (pass that, or for dweight/dbias the sum of
    |dy xhat| / |dy| over the reduced values), each with the forward's conditioning
    through xhat, and ~10 roundings in ``dtype``: 3x the forward bound."""
    t = tol_normalized(dtype, n, cond, scale)
    return dict(rtol=0.0, atol=3 * t["atol"])
