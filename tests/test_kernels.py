"""Every kernel of the contract (``normkit.backends._spec.KERNELS``) on every backend,
against the NumPy reference backend.

One test, driven by the kernel list: ``KERNEL_CASES`` below says, for each kernel, how to
build its inputs from a case of the table in ``_cases.py`` ((N, C, S) shapes with the odd
sizes 1, 3, 17, 1023 and long planes; float32/float64 and the 16-bit float16/bfloat16
data with float32 parameters; normal / offset / constant data) and the error bound of
each result (``_cases.py`` derives them). A backend whose 16-bit kernels are pending
(``_cases.PENDING_16BIT``) has its 16-bit rows as strict xfail(TypeError). Inputs are read-only;
kernels that write ``out`` are also run in place (``out`` is ``x``) and must give the
same bits. A kernel added to ``_spec.KERNELS`` without an entry here fails the table
test. NaN/Inf propagation has its own test over the same table.
"""
import _bounds_extra as BX
import _cases as K
import numpy as np
import pytest

from normkit.backends import numpy_ref as ref
from normkit.backends import resolve
from normkit.backends._spec import KERNELS

EPS = 1e-5


# ====================================================================== input builders
def _layout(shape, last):
    n, c, s = shape
    return (n, s, c) if last else (n, c, s)


def _params(rows, c, dtype, seed, center=0.0):
    """A read-only (rows, C) parameter array: N(center, 1) in the parameter dtype of
    data of ``dtype`` (float32 for 16-bit data)."""
    pdt = K.param_dtype(dtype)
    return K.readonly(K.make((rows, c), pdt, seed=seed) / pdt.type(2) + pdt.type(center))


def _shift_center(kind, dtype):
    """Shift near the data's mean, as the callers pass it (mean 1e4 for offset data;
    100 and 10 for float16 and bfloat16, see ``_cases.values``)."""
    return {"offset": K.offset_center(dtype), "constant": 1234.0}.get(kind, 0.5)


class Call:
    """One kernel call: positional args (``out`` marked by its index), the results to
    compare and their bounds."""

    def __init__(self, args, out=None, bounds=(), inplace=True):
        self.args, self.out, self.bounds, self.inplace = list(args), out, list(bounds), inplace


# Each builder: (shape (N, C, S), dtype, kind, variant, seed) -> Call. ``bounds`` is a
# list with one bound per returned result, then one for ``out`` when there is one.
def _moments(shape, dtype, kind, variant, seed):
    n, c, s = shape
    if variant == "planes":
        x = K.readonly(K.make((n * c, s), dtype, kind, seed=seed))
        return Call([x], bounds=[K.bound_mean(x, 1), K.bound_m2(x, 1)])
    x = K.readonly(K.make((n, s, c), dtype, kind, seed=seed))
    return Call([x], bounds=[K.bound_mean(x, 1), K.bound_m2(x, 1)])


def _rows_forward(shape, dtype, kind, variant, seed):
    n, c, s = shape
    rms = variant == "rms"
    x = K.readonly(K.make((n * c, s), dtype, kind, seed=seed))
    w, b = _params(1, s, dtype, seed + 1)[0], _params(1, s, dtype, seed + 2)[0]
    out = np.empty_like(x)
    bounds = [0.0 if rms else K.bound_mean(x, 1), K.bound_rstd(x, 1, EPS, rms),
              K.bound_normalized(x, 1, EPS, w, None if rms else b, dtype, rms)]
    return Call([x, w, b, EPS, rms, out], out=5, bounds=bounds)


def _rows_backward(shape, dtype, kind, variant, seed):
    n, c, s = shape
    rms = variant == "rms"
    x = K.readonly(K.make((n * c, s), dtype, kind, seed=seed))
    dy = K.readonly(K.make((n * c, s), dtype, "normal", seed=seed + 1))
    w = _params(1, s, dtype, seed + 2)[0]
    mean, rstd = ref.rows_forward(x, w, w, EPS, rms, np.empty(x.shape))
    return Call([dy, x, mean, rstd, w, rms, np.empty_like(x)], out=6,
                bounds=BX.bound_rows_backward(dy, x, mean, rstd, w, rms, dtype),
                inplace=False)


def _per_channel_inputs(shape, dtype, kind, variant, seed):
    last = variant.startswith("last")
    rows = shape[0] if "N'=N" in variant else 1
    kshape = _layout(shape, last)
    x = K.readonly(K.make(kshape, dtype, kind, seed=seed))
    shift = _params(rows, shape[1], dtype, seed + 1, _shift_center(kind, dtype))
    put = (lambda p: p.astype(np.float64)[:, None, :]) if last else \
        (lambda p: p.astype(np.float64)[:, :, None])
    return last, kshape, x, shift, put


def _affine(shape, dtype, kind, variant, seed):
    _, _, x, shift, put = _per_channel_inputs(shape, dtype, kind, variant, seed)
    scale, offset = (_params(shift.shape[0], shape[1], dtype, seed + i) for i in (2, 3))
    xc = x.astype(np.float64) - put(shift)
    bound = K.bound_elementwise(dtype, xc * put(scale), put(offset))
    return Call([x, shift, scale, offset, np.empty_like(x)], out=4, bounds=[bound])


def _affine_act(shape, dtype, kind, variant, seed):
    _, kshape, x, shift, put = _per_channel_inputs(shape, dtype, kind, variant, seed)
    scale, offset = (_params(shift.shape[0], shape[1], dtype, seed + i) for i in (2, 3))
    res = K.readonly(K.make(kshape, dtype, seed=seed + 4)) if "res" in variant else None
    xc = x.astype(np.float64) - put(shift)
    bound = K.bound_elementwise(dtype, xc * put(scale), put(offset), 0.0 if res is None else res)
    return Call([x, shift, scale, offset, res, "relu" in variant, np.empty_like(x)], out=6,
                bounds=[bound])


def _grad_sums(shape, dtype, kind, variant, seed):
    last, kshape, x, shift, put = _per_channel_inputs(shape, dtype, kind, variant, seed)
    dy = K.readonly(K.make(kshape, dtype, seed=seed + 5))
    axis = 1 if last else 2
    dy64 = dy.astype(np.float64)
    terms = np.abs(dy64 * (x.astype(np.float64) - put(shift)))
    return Call([dy, x, shift],
                bounds=[K.bound_sum(np.abs(dy64).sum(axis=axis), shape[2], dtype),
                        K.bound_sum(terms.sum(axis=axis), shape[2], dtype)])


def _grad_apply(shape, dtype, kind, variant, seed):
    _, kshape, x, shift, put = _per_channel_inputs(shape, dtype, kind, variant, seed)
    dy = K.readonly(K.make(kshape, dtype, seed=seed + 5))
    cdy, cx, c1 = (_params(shift.shape[0], shape[1], dtype, seed + i) for i in (6, 7, 8))
    xc = x.astype(np.float64) - put(shift)
    bound = K.bound_elementwise(dtype, put(cdy) * dy, put(cx) * xc, put(c1))
    return Call([dy, x, shift, cdy, cx, c1, np.empty_like(x)], out=6, bounds=[bound],
                inplace=False)


def _group_forward(shape, dtype, kind, variant, seed):
    n, c, s = shape
    g = {"G=1": 1, "G=C": c}[variant]
    x = K.readonly(K.make(shape, dtype, kind, seed=seed))
    w, b = _params(1, c, dtype, seed + 1)[0], _params(1, c, dtype, seed + 2)[0]
    blocks = x.reshape(n * g, -1)
    per = lambda p: p.reshape(1, g, c // g, 1)
    out = K.bound_normalized(x.reshape(n, g, c // g, s), (2, 3), EPS, per(w), per(b), dtype)
    bounds = [K.bound_mean(blocks, 1).reshape(n, g),
              K.bound_rstd(blocks, 1, EPS).reshape(n, g), out.reshape(shape)]
    return Call([x, g, w, b, EPS, np.empty_like(x)], out=5, bounds=bounds)


def _batch_forward(shape, dtype, kind, variant, seed):
    n, c, s = shape
    x = K.readonly(K.make(shape, dtype, kind, seed=seed))
    w, b = _params(1, c, dtype, seed + 1)[0], _params(1, c, dtype, seed + 2)[0]
    channels = np.moveaxis(x, 1, 0).reshape(c, n * s)
    per = lambda p: p.reshape(1, c, 1)
    bounds = [K.bound_mean(channels, 1), K.bound_m2(channels, 1),
              K.bound_normalized(x, (0, 2), EPS, per(w), per(b), dtype)]
    return Call([x, w, b, EPS, np.empty_like(x)], out=4, bounds=bounds)


def _shared_stat_backward(shape, dtype, kind, variant, seed):
    """GroupNorm (G=1, G=C) and training BatchNorm backward in one kernel. Bounds: the
    per-plane sums as grad_sums', dx as rows_backward's with each unit of planes that
    shares a statistic as one row (weight expanded over its values)."""
    n, c, s = shape
    x = K.readonly(K.make(shape, dtype, kind, seed=seed))
    dy = K.readonly(K.make(shape, dtype, "normal", seed=seed + 1))
    w = _params(1, c, dtype, seed + 2)[0]
    if variant == "batch":
        rows = np.moveaxis(x, 1, 0).reshape(c, n * s)
        dy_rows = np.moveaxis(dy, 1, 0).reshape(c, n * s)
        w_rows = w[:, None]
        back = lambda a: np.moveaxis(a.reshape(c, n, s), 0, 1)
    else:
        g = {"G=1": 1, "G=C": c}[variant]
        rows, dy_rows = x.reshape(n * g, -1), dy.reshape(n * g, -1)
        w_rows = np.tile(np.repeat(w.reshape(g, c // g), s, axis=1), (n, 1))
        back = lambda a: a.reshape(shape)
    mean, m2 = ref.plane_moments(rows)
    rstd = 1.0 / np.sqrt(m2 / rows.shape[1] + EPS)
    dx_bound = BX.bound_rows_backward(dy_rows, rows, mean, rstd, w_rows, False, dtype)[2]
    plane_mean = back(np.broadcast_to(mean[:, None], rows.shape))[:, :, :1]
    dy64 = dy.astype(np.float64)
    terms = np.abs(dy64 * (x.astype(np.float64) - plane_mean))
    # (sum_dy_xc: summed around the mean rounded to the parameter dtype, then corrected
    # by the rounding's float64 residual times sum_dy)
    resid = K.U64 * np.abs(plane_mean[:, :, 0]) * np.abs(dy64).sum(axis=2)
    bounds = [K.bound_sum(np.abs(dy64).sum(axis=2), s, dtype),
              K.bound_sum(terms.sum(axis=2), s, dtype) + resid, back(dx_bound)]
    if variant == "batch":
        args = [dy, x, mean, rstd, w, np.empty_like(x)]
    else:
        args = [dy, x, g, mean.reshape(n, g), rstd.reshape(n, g), w, np.empty_like(x)]
    return Call(args, out=len(args) - 1, bounds=bounds, inplace=False)


# ====================================================================== the table
PER_CHANNEL = ["first,N'=1", "first,N'=N", "last,N'=1", "last,N'=N"]
# parameter rows x residual x activation, pairwise: every pair of values appears
_ACT = ["N'=1,nores,id", "N'=N,res,relu", "N'=1,res,id", "N'=N,nores,relu",
        "N'=1,res,relu", "N'=N,nores,id"]
ELEMENTWISE_KINDS = ["normal", "offset"]   # constant data adds nothing without a reduction

# kernel: (builder, variants, kinds)
KERNEL_CASES = {
    "plane_moments": (_moments, ["planes"], K.KINDS),
    "channels_last_moments": (_moments, ["last"], K.KINDS),
    "rows_forward": (_rows_forward, ["layer", "rms"], K.KINDS),
    "rows_backward": (_rows_backward, ["layer", "rms"], ["normal", "offset"]),
    "channels_first_affine": (_affine, PER_CHANNEL[:2], ELEMENTWISE_KINDS),
    "channels_last_affine": (_affine, PER_CHANNEL[2:], ELEMENTWISE_KINDS),
    "channels_first_grad_sums": (_grad_sums, PER_CHANNEL[:2], K.KINDS),
    "channels_last_grad_sums": (_grad_sums, PER_CHANNEL[2:], K.KINDS),
    "channels_first_grad_apply": (_grad_apply, PER_CHANNEL[:2], ELEMENTWISE_KINDS),
    "channels_last_grad_apply": (_grad_apply, PER_CHANNEL[2:], ELEMENTWISE_KINDS),
    "channels_first_group_forward": (_group_forward, ["G=1", "G=C"], K.KINDS),
    "channels_first_batch_forward": (_batch_forward, ["batch"], K.KINDS),
    "channels_first_group_backward": (_shared_stat_backward, ["G=1", "G=C"],
                                      ["normal", "offset"]),
    "channels_first_batch_backward": (_shared_stat_backward, ["batch"], ["normal", "offset"]),
    "channels_first_affine_act": (_affine_act, ["first," + v for v in _ACT], ["offset"]),
    "channels_last_affine_act": (_affine_act, ["last," + v for v in _ACT], ["offset"]),
}


def _table():
    return [pytest.param(name, variant, kind, id=f"{name}-{variant}-{kind}")
            for name in KERNELS for variant in KERNEL_CASES.get(name, (None, [None]))[1]
            for kind in KERNEL_CASES.get(name, (None, None, ["normal"]))[2]]


def test_every_kernel_of_the_contract_is_in_the_table():
    assert set(KERNEL_CASES) == set(KERNELS)


# the reference against itself would check nothing; its aliasing behaviour is covered
# by test_kernels_fused.py (every backend)
COMPILED = [b for b in K.BACKENDS if b != "numpy"]


def _results(fn, call, args):
    got = fn(*args)
    got = [] if got is None else list(got)
    return got + ([args[call.out]] if call.out is not None else [])


def _run(be, name, call, what):
    """The backend's and the reference's results of one call, checked against the
    bounds; returns the backend's results."""
    args = list(call.args)
    if call.out is not None:
        args[call.out] = np.empty_like(call.args[call.out])
    got = _results(getattr(be, name), call, args)
    ref_args = list(call.args)
    if call.out is not None:     # float64 (unrounded); 16-bit: rounded once, as the kernel
        out = call.args[call.out]
        ref_args[call.out] = np.empty(out.shape, out.dtype if K.is_half(out.dtype)
                                      else np.float64)
    want = _results(getattr(ref, name), call, ref_args)
    assert len(got) == len(want) == len(call.bounds), what
    for i, (a, r, bound) in enumerate(zip(got, want, call.bounds)):
        if i < len(got) - (call.out is not None):       # statistics: float64
            assert a.dtype == np.float64 and a.shape == r.shape, (what, i, a.dtype, a.shape)
        K.assert_within(a, r, bound, f"{what} result {i}")
    return got


@pytest.mark.parametrize("shape", K.SHAPES3, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "variant", "kind"), _table())
@pytest.mark.parametrize(("backend", "dtype"), K.backend_dtype_params(COMPILED))
def test_kernel(backend, dtype, name, variant, kind, shape):
    be = resolve(backend)
    dtype = K.np_dtype(dtype)
    builder = KERNEL_CASES[name][0]
    call = builder(shape, dtype, kind, variant, seed=sum(map(ord, name)))
    got = _run(be, name, call, f"{name}[{variant}, {kind}, {shape}]")
    if call.out is not None and call.inplace:
        # in place: out is x (read before written, element by element)
        args = list(call.args)
        args[call.out] = args[0] = np.array(call.args[0], copy=True)
        again = _results(getattr(be, name), call, args)
        for a, b in zip(again, got):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} in place")
