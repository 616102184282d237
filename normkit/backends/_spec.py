"""The kernel contract every backend implements.

The public functions (``normkit.functional``) reduce every norm to a few canonical
shapes (see ``normkit/_canonical.py``) and call only the kernels below, so a backend
is a module exposing exactly these names with exactly these signatures. Nothing in
the public code asks which backend it is talking to.

Conventions shared by all kernels
---------------------------------
* ``x``, ``dy``, ``out``, ``dx`` and ``residual`` (the *data*) are C-contiguous,
  aligned, native-order arrays of one *storage dtype*: float32, float64, float16 or
  bfloat16 (``ml_dtypes.bfloat16``, what JAX, ONNX and TensorFlow hand out).
  ``x`` and ``dy`` may be read-only; ``out`` may be the same array as ``x``
  (in-place), so an element of ``x`` must be read before the same element of
  ``out`` is written, and no kernel reads ``x`` after writing ``out``.
* Per-channel / per-row parameters (``weight``, ``bias``, ``shift``, ``scale``,
  ``offset``, ``coef_*``) are C-contiguous arrays of the *parameter dtype*: float64
  for float64 data, float32 for float32, float16 and bfloat16 data.
  ``(N', C)`` means the first dimension is either 1 (the same values for every
  sample: BatchNorm) or N (one row per sample: GroupNorm, InstanceNorm).
* 16-bit data is read directly and widened in registers (exactly) to float32;
  elementwise results are computed in float32 and narrowed once, on write, with
  round-to-nearest-even (NaN stays NaN, float16 overflow gives +-Inf). No float32
  copy of the data is ever made: extra memory is the per-channel/per-row arrays.
* Statistics (``mean``, ``m2``, ``rstd`` and the gradient sums) are float64 so that
  float32 and 16-bit data is accumulated in double precision, and variances are
  *centered* (two-pass or Welford/Chan merges, never E[x^2] - E[x]^2).
* Arrays are never empty (the callers handle size 0).
* NaN and Inf in the data propagate into the results; they must never crash.

Kernels
-------
plane_moments(x: (P, S)) -> (mean: f64[P], m2: f64[P])
    Per row: mean and sum of squared deviations from that mean.
    (BatchNorm NCHW planes, GroupNorm/InstanceNorm rows.)

channels_last_moments(x: (N, S, C)) -> (mean: f64[N, C], m2: f64[N, C])
    Per (n, c): mean and M2 over S. N == 1 is the BatchNorm NHWC case, so the
    S axis itself must be split across threads (per-chunk partials, merged).

rows_forward(x: (R, K), weight: [K], bias: [K], eps: float, rms: bool, out: (R, K))
        -> (mean: f64[R], rstd: f64[R])
    LayerNorm (rms=False): out = (x - mean) * rstd * weight + bias,
    rstd = 1 / sqrt(var + eps), var biased.
    RMSNorm (rms=True): mean is all zeros, rstd = 1 / sqrt(mean(x^2) + eps),
    out = x * rstd * weight (bias is ignored; callers pass zeros).

rows_backward(dy: (R, K), x: (R, K), mean: f64[R], rstd: f64[R], weight: [K],
              rms: bool, dx: (R, K)) -> (dweight: f64[K], dbias: f64[K])
    With g = dy * weight and xhat = (x - mean) * rstd:
    LayerNorm: dx = rstd * (g - mean_K(g) - xhat * mean_K(g * xhat))
    RMSNorm:   dx = rstd * (g - xhat * mean_K(g * xhat))      (mean is zeros)
    dweight = sum_R(dy * xhat), dbias = sum_R(dy).

channels_first_affine(x: (N, C, S), shift, scale, offset: (N', C), out: (N, C, S))
channels_last_affine(x: (N, S, C), shift, scale, offset: (N', C), out: (N, S, C))
    out = (x - shift) * scale + offset, broadcast per (n, c). The centered form keeps
    float32 accurate when |mean| >> std (x*a + b would cancel).

channels_first_grad_sums(dy: (N, C, S), x: (N, C, S), shift: (N', C))
        -> (sum_dy: f64[N, C], sum_dy_xc: f64[N, C])
channels_last_grad_sums(dy: (N, S, C), x: (N, S, C), shift: (N', C))
        -> (sum_dy: f64[N, C], sum_dy_xc: f64[N, C])
    Per (n, c) over S: sum(dy) and sum(dy * (x - shift)).

channels_first_grad_apply(dy, x: (N, C, S), shift, coef_dy, coef_x, coef_1: (N', C),
                          dx: (N, C, S))
channels_last_grad_apply(dy, x: (N, S, C), shift, coef_dy, coef_x, coef_1: (N', C),
                         dx: (N, S, C))
    dx = coef_dy * dy + coef_x * (x - shift) + coef_1, broadcast per (n, c).

channels_first_group_forward(x: (N, C, S), groups: int, weight: [C], bias: [C],
                             eps: float, out: (N, C, S)) -> (mean: f64[N, G], rstd: f64[N, G])
    GroupNorm (and InstanceNorm, groups == C) on channels-first data in one kernel:
    the statistics of each (sample, group) -- a contiguous block of C/G * S values --
    then out = (x - mean) * rstd * weight[c] + bias[c] while the block is in cache.
    Saves a full read of x against plane_moments + channels_first_affine.

channels_first_batch_forward(x: (N, C, S), weight: [C], bias: [C], eps: float,
                             out: (N, C, S)) -> (mean: f64[C], m2: f64[C])
    BatchNorm training forward on channels-first data in one kernel: the mean and M2
    of each channel over its N planes, then out = (x - mean) * rstd * weight[c] +
    bias[c] with rstd = 1 / sqrt(m2 / (N * S) + eps) (computed exactly so in double,
    as the caller recomputes it), each channel while its planes are still in cache.
    Saves a read of x and the Python merge of N * C plane moments against
    plane_moments + channels_first_affine.

channels_first_group_backward(dy: (N, C, S), x: (N, C, S), groups: int,
                              mean: f64[N, G], rstd: f64[N, G], weight: [C],
                              dx: (N, C, S)) -> (sum_dy: f64[N, C], sum_dy_xc: f64[N, C])
channels_first_batch_backward(dy: (N, C, S), x: (N, C, S), mean: f64[C], rstd: f64[C],
                              weight: [C], dx: (N, C, S))
        -> (sum_dy: f64[N, C], sum_dy_xc: f64[N, C])
    GroupNorm / training BatchNorm backward with batch statistics on channels-first
    data in one kernel: per plane (n, c), sum(dy) and sum(dy * (x - mean)); then, for
    the planes sharing a statistic (a (sample, group) block; a channel over N), with
    count values, A = sum(weight[c] * sum_dy_xc), B = sum(weight[c] * sum_dy):
    dx = rstd * weight[c] * dy - rstd^3 * A / count * (x - mean) - rstd * B / count,
    while those planes are still in cache. Saves a read of dy and x against
    grad_sums + grad_apply.

channels_first_affine_act(x: (N, C, S), shift, scale, offset: (N', C),
                          residual: (N, C, S) or None, relu: bool, out: (N, C, S))
channels_last_affine_act(x: (N, S, C), shift, scale, offset: (N', C),
                         residual: (N, S, C) or None, relu: bool, out: (N, S, C))
    out = (x - shift) * scale + offset [+ residual], then max(out, 0) when relu --
    with NaN kept as NaN (as torch.relu) -- in the same single pass. ``residual`` has
    x's dtype and is C-contiguous; it may be ``out`` itself (in-place residual add).

Module-level members besides the kernels
----------------------------------------
NAME: str
set_num_threads(n: int) -> None     honour n in every later call, from any thread
info() -> dict                       what was built / how it runs (for `normkit info`)
"""

KERNELS = (
    "plane_moments",
    "channels_last_moments",
    "rows_forward",
    "rows_backward",
    "channels_first_affine",
    "channels_last_affine",
    "channels_first_grad_sums",
    "channels_last_grad_sums",
    "channels_first_grad_apply",
    "channels_last_grad_apply",
    "channels_first_group_forward",
    "channels_first_batch_forward",
    "channels_first_group_backward",
    "channels_first_batch_backward",
    "channels_first_affine_act",
    "channels_last_affine_act",
)

MEMBERS = KERNELS + ("NAME", "set_num_threads", "info")
