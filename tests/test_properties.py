"""Property tests (Hypothesis) of the five norms on random shapes, axes and data.

* Without affine, each normalized group has mean 0 and variance ``var / (var + eps)``
  (RMSNorm: mean square ``ms / (ms + eps)``), i.e. variance 1 whenever eps is
  negligible against the data's variance, which the data scale makes the usual case.
* Invariances: adding a constant to x (LayerNorm, BatchNorm, GroupNorm, InstanceNorm)
  changes nothing; scaling x by ``a > 0`` changes nothing when eps is scaled by ``a**2``
  (all five, RMSNorm included), an identity that holds exactly, eps and all (eps = 0
  among the drawn values gives the plain ``norm(a * x) == norm(x)``).
* Output dtype and shape equal the input's (float16/bfloat16/float32/float64, any
  parameter dtype), and ``return_stats`` shapes follow API.md.
* Non-contiguous, negative-stride, Fortran-order, byte-swapped and read-only inputs
  (and parameters) give the results of a contiguous copy.
* ``out=x`` (in place) and ``out=<other array>`` equal the out-of-place result.
* Inputs are never modified (forward and backward), except running statistics in
  training mode, which are updated exactly as on a contiguous copy.

Every test runs on every backend through the ``backend`` fixture, or through the
(backend, dtype) grid of ``_cases.backend_dtype_params`` where the data dtype is a
parameter (16-bit rows of a backend in ``_cases.PENDING_16BIT``: strict xfail).
"""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normkit

import _cases as K

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
# per data dtype (the dtype a pytest parameter): about the examples one test drew
# over all dtypes before
DTYPE_SETTINGS = settings(SETTINGS, max_examples=12)
DATA_DTYPES = K.backend_dtype_params()           # (backend, dtype) incl. 16-bit

NORMALIZING = ["batch", "instance", "group", "layer", "rms"]   # use their own statistics
ALL_KINDS = NORMALIZING + ["batch_eval", "instance_eval"]      # + fixed-statistics modes
SHIFT_INVARIANT = ["batch", "instance", "group", "layer"]      # not RMSNorm


def _tol(spec, x, dtype, w=None, b=None, rm=None, rv=None, eps=1e-5):
    """``assert_allclose`` kwargs for two computations of this norm on ``x`` in ``dtype``
    (or one against float64), from ``_cases.tol_normalized``: n values per statistic
    (1 in eval mode), the conditioning rstd |mean| + 1 of these groups, scale bounding
    |w|, |b| and |y| (|xhat| <= (max|x| + |mean|) rstd). rtol: the statistics (mean,
    rstd, running values) are within gamma_n of their own magnitude."""
    kind = spec["kind"]
    x64 = np.asarray(x, np.float64)
    if kind.endswith("_eval"):
        n, mean, rstd = 1, np.asarray(rm, np.float64), 1 / np.sqrt(np.asarray(rv, np.float64) + eps)
    else:
        xg = groups_of(spec, x64)
        n = xg.shape[1]
        mean = np.zeros(len(xg)) if kind == "rms" else xg.mean(axis=1)
        rstd = 1 / np.sqrt(((xg - mean[:, None]) ** 2).mean(axis=1) + eps)
    amax = lambda a: 0.0 if a is None else float(np.max(np.abs(np.asarray(a, np.float64))))  # noqa: E731
    xhat = (amax(x64) + amax(mean)) * amax(rstd)
    scale = max(1.0, amax(w), amax(b), xhat * max(1.0, amax(w)) + amax(b))
    tol = K.tol_normalized(dtype, n, K.conditioning(mean, rstd), scale)
    return dict(rtol=16 * K.gamma(n, K.unit_roundoff(np.float32) if np.dtype(dtype) !=
                                  np.float64 else K.U64), atol=tol["atol"])


def _xhat_scale(spec, x, w, eps):
    """max |w| (|x| + |mean|) rstd over the groups: how far a relative change of u in
    every value can move the output, per unit u."""
    xg = groups_of(spec, np.asarray(x, np.float64))
    mean = np.zeros(len(xg)) if spec["kind"] == "rms" else xg.mean(axis=1)
    ms = (xg ** 2).mean(axis=1) if spec["kind"] == "rms" else xg.var(axis=1)
    rstd = 1 / np.sqrt(ms + eps)
    wmax = 1.0 if w is None else float(np.abs(w).max())
    return float(((np.abs(xg).max(axis=1) + np.abs(mean)) * rstd).max()) * wmax


# ------------------------------------------------------------------ drawing cases
def _divisors(c):
    return [g for g in range(1, c + 1) if c % g == 0]


@st.composite
def specs(draw, kind, min_group=2):
    """A shape and the norm's structural arguments; every normalized group has at
    least ``min_group`` values."""
    base = kind.split("_")[0]
    seed = draw(st.integers(0, 2**32 - 1))
    if base in ("layer", "rms"):
        ndim = draw(st.integers(1, 4))
        shape = draw(st.lists(st.integers(1, 4), min_size=ndim - 1, max_size=ndim - 1))
        shape.append(draw(st.integers(min_group, 6)))
        k = draw(st.integers(1, ndim))
        return dict(kind=kind, shape=tuple(shape), ns=tuple(shape[ndim - k:]), seed=seed)
    min_ndim = 2 if base == "batch" else 3     # per-sample norms need spatial axes here
    ndim = draw(st.integers(min_ndim, 4))
    axes = [1, -1] + ([2] if ndim == 4 else [])
    axis = draw(st.sampled_from(axes))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1, 4), min_size=ndim - 2, max_size=ndim - 2))
    groups = draw(st.sampled_from(_divisors(c))) if base == "group" else c
    per_group = {"batch": n * math.prod(spatial),
                 "instance": math.prod(spatial),
                 "group": (c // groups) * math.prod(spatial)}[base]
    if per_group < min_group:                  # grow the first batch/spatial extent
        factor = -(-min_group // per_group)
        if spatial:
            spatial[0] *= factor
        else:
            n *= factor
    dims = [n] + spatial
    dims.insert(axis % ndim, c)
    return dict(kind=kind, shape=tuple(dims), axis=axis, groups=groups, seed=seed)


def _data(spec, dtype, scale=1.0, offset=0.0):
    rng = np.random.default_rng(spec["seed"])
    return (offset + scale * rng.standard_normal(spec["shape"])).astype(K.np_dtype(dtype))


def _channels(spec):
    return spec["shape"][spec["axis"]]


def _param_shape(spec):
    return spec["ns"] if "ns" in spec else (_channels(spec),)


def _params(spec, dtype=np.float64, affine=True):
    """weight, bias, running_mean, running_var for the spec (None where not used)."""
    rng = np.random.default_rng(spec["seed"] + 1)
    kind = spec["kind"]
    ps = _param_shape(spec)
    w = (rng.uniform(0.5, 2.0, ps) * rng.choice([-1, 1], ps)).astype(dtype) if affine else None
    b = rng.standard_normal(ps).astype(dtype) if affine and kind != "rms" else None
    rm = rv = None
    if kind.endswith("_eval"):
        rm = rng.standard_normal(ps).astype(dtype)
        rv = rng.uniform(0.5, 2.0, ps).astype(dtype)
    return w, b, rm, rv


def forward(spec, x, w=None, b=None, rm=None, rv=None, *, eps=1e-5, out=None,
            backend, return_stats=False):
    kind = spec["kind"]
    kw = dict(out=out, backend=backend, return_stats=return_stats)
    if kind == "batch":
        return normkit.batch_norm(x, rm, rv, w, b, True, 0.1, eps, axis=spec["axis"], **kw)
    if kind == "batch_eval":
        return normkit.batch_norm(x, rm, rv, w, b, False, 0.1, eps, axis=spec["axis"], **kw)
    if kind == "instance":
        return normkit.instance_norm(x, rm, rv, w, b, True, 0.1, eps, axis=spec["axis"],
                                     **kw)
    if kind == "instance_eval":
        return normkit.instance_norm(x, rm, rv, w, b, False, 0.1, eps, axis=spec["axis"],
                                     **kw)
    if kind == "group":
        return normkit.group_norm(x, spec["groups"], w, b, eps, axis=spec["axis"], **kw)
    if kind == "layer":
        return normkit.layer_norm(x, spec["ns"], w, b, eps, **kw)
    if kind == "rms":
        return normkit.rms_norm(x, spec["ns"], w, eps, **kw)
    raise AssertionError(kind)


def backward(spec, g, x, mean, rstd, w, *, backend):
    kind = spec["kind"]
    if kind.startswith("batch"):
        return normkit.batch_norm_backward(g, x, mean, rstd, w, training=kind == "batch",
                                           axis=spec["axis"], backend=backend)
    if kind.startswith("instance"):
        return normkit.instance_norm_backward(g, x, mean, rstd, w,
                                              use_input_stats=kind == "instance",
                                              axis=spec["axis"], backend=backend)
    if kind == "group":
        return normkit.group_norm_backward(g, x, spec["groups"], mean, rstd, w,
                                           axis=spec["axis"], backend=backend)
    if kind == "layer":
        return normkit.layer_norm_backward(g, x, spec["ns"], mean, rstd, w, backend=backend)
    return normkit.rms_norm_backward(g, x, spec["ns"], mean, rstd, w, backend=backend)


def groups_of(spec, a):
    """a (shaped like x) as (number of normalized groups, values per group)."""
    kind = spec["kind"]
    if kind in ("layer", "rms"):
        return a.reshape(-1, math.prod(spec["ns"]))
    c = _channels(spec)
    if kind == "batch":
        return np.moveaxis(a, spec["axis"], 0).reshape(c, -1)
    n = a.shape[0]
    g = c if kind == "instance" else spec["groups"]
    return np.moveaxis(a, spec["axis"], 1).reshape(n * g, -1)


def stats_shape(spec):
    kind, shape = spec["kind"], spec["shape"]
    if kind.startswith("batch"):
        return (_channels(spec),)
    if kind.startswith("instance"):
        return (shape[0], _channels(spec))
    if kind == "group":
        return (shape[0], spec["groups"])
    return shape[:len(shape) - len(spec["ns"])]


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("kind", NORMALIZING)
def test_normalized_groups_have_mean_0_variance_1(kind, backend):
    @SETTINGS
    @given(spec=specs(kind, min_group=4), scale=st.floats(0.5, 1e3),
           rel_offset=st.floats(-10, 10), dtype=st.sampled_from([np.float64, np.float32]))
    def check(spec, scale, rel_offset, dtype):
        eps = 1e-5
        x = _data(spec, dtype, scale, rel_offset * scale)
        y = forward(spec, x, eps=eps, backend=backend)
        assert y.dtype == x.dtype and y.shape == x.shape
        xg = groups_of(spec, x.astype(np.float64))
        yg = groups_of(spec, y.astype(np.float64))
        # each y is within atol of the exact value, |y| <= scale (see _tol): a mean of y
        # moves by <= atol, a mean square / variance by <= 2 scale atol + atol^2
        atol = _tol(spec, x, dtype, eps=eps)["atol"]
        ymax = max(1.0, float(np.abs(yg).max()))
        vtol = dict(rtol=0, atol=2 * ymax * atol + atol * atol)
        if kind == "rms":
            ms = (xg ** 2).mean(axis=1)
            np.testing.assert_allclose((yg ** 2).mean(axis=1), ms / (ms + eps), **vtol)
            big = ms > 1e3 * eps     # then 1 - ms / (ms + eps) < 1e-3 exactly
            np.testing.assert_allclose((yg[big] ** 2).mean(axis=1), 1.0,
                                       atol=1e-3 + vtol["atol"])
            return
        var = xg.var(axis=1)
        np.testing.assert_allclose(yg.mean(axis=1), 0.0, atol=atol)
        # exact statement, eps included: var(y) = var(x) / (var(x) + eps)
        np.testing.assert_allclose(yg.var(axis=1), var / (var + eps), **vtol)
        # and where eps is negligible against the data's variance (1 - var / (var + eps)
        # < 1e-3 exactly): variance 1
        big = var > 1e3 * eps
        np.testing.assert_allclose(yg[big].var(axis=1), 1.0, atol=1e-3 + vtol["atol"])

    check()


# ------------------------------------------------------------------ invariances
@pytest.mark.parametrize("kind", SHIFT_INVARIANT)
def test_invariant_to_adding_a_constant(kind, backend):
    @SETTINGS
    @given(spec=specs(kind, min_group=4), scale=st.floats(0.5, 100),
           shift=st.floats(-50, 50), affine=st.booleans(),
           dtype=st.sampled_from([np.float64, np.float32]))
    def check(spec, scale, shift, affine, dtype):
        x = _data(spec, np.float64, scale)
        # the constant is added in float64 then rounded once to the test dtype
        x0, x1 = x.astype(dtype), (x + shift * scale).astype(dtype)
        w, b, _, _ = _params(spec, affine=affine)
        y0 = forward(spec, x0, w, b, backend=backend).astype(np.float64)
        y1 = forward(spec, x1, w, b, backend=backend).astype(np.float64)
        # each within its bound; the exact results differ by the rounding of x + shift to
        # dtype: u_d |x1| per value, moved into the output through |w| rstd (twice: the
        # value and the mean)
        t0, t1 = _tol(spec, x0, dtype, w, b), _tol(spec, x1, dtype, w, b)
        x1g = groups_of(spec, x1.astype(np.float64))
        rstd = 1 / np.sqrt(x1g.var(axis=1) + 1e-5)
        wmax = 1.0 if w is None else float(np.abs(w).max())
        shift_err = 2 * K.unit_roundoff(dtype) * float(np.abs(x1g).max() * rstd.max()) * wmax
        np.testing.assert_allclose(y1, y0, rtol=0, atol=t0["atol"] + t1["atol"] + shift_err)

    check()


@pytest.mark.parametrize("kind", NORMALIZING)
def test_invariant_to_positive_scaling(kind, backend):
    """norm(a * x, eps = a**2 * eps) == norm(x, eps) exactly (in exact arithmetic);
    eps = 0 is the plain statement norm(a * x) == norm(x)."""
    # training batch_norm needs eps > 0, as torch; the other norms accept eps = 0
    epss = [1e-5, 1e-2, 1.0] if kind == "batch" else [0.0, 1e-5, 1e-2, 1.0]

    @SETTINGS
    @given(spec=specs(kind, min_group=4), log_a=st.floats(-3, 3), affine=st.booleans(),
           eps=st.sampled_from(epss),
           dtype=st.sampled_from([np.float64, np.float32]))
    def check(spec, log_a, affine, eps, dtype):
        a = 10.0 ** log_a
        x = _data(spec, np.float64, 1.0, 0.3)
        w, b, _, _ = _params(spec, affine=affine)
        y0 = forward(spec, x.astype(dtype), w, b, eps=eps, backend=backend)
        y1 = forward(spec, (a * x).astype(dtype), w, b, eps=eps * a * a, backend=backend)
        # each within its bound; a x rounded to dtype is a relative change of u_d per
        # value, which moves xhat by <= 2 u_d (|x| + |mean|) rstd = 2 u_d xhat-scale
        t0, t1 = _tol(spec, x.astype(dtype), dtype, w, b, eps=max(eps, 1e-300)), \
            _tol(spec, (a * x).astype(dtype), dtype, w, b, eps=max(eps * a * a, 1e-300))
        scale_err = 2 * K.unit_roundoff(dtype) * _xhat_scale(spec, x, w, eps)
        np.testing.assert_allclose(y1.astype(np.float64), y0.astype(np.float64), rtol=0,
                                   atol=t0["atol"] + t1["atol"] + scale_err)

    check()


# ------------------------------------------------------------------ dtype / shape
FLOATS = [np.float16, np.float32, np.float64, K.np_dtype("bfloat16")]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(("backend", "dtype"), DATA_DTYPES)
def test_dtype_and_shape_preserved(kind, backend, dtype):
    dtype = K.np_dtype(dtype)

    @DTYPE_SETTINGS
    @given(spec=specs(kind), pdtype=st.sampled_from(FLOATS), affine=st.booleans())
    def check(spec, pdtype, affine):
        x = _data(spec, dtype, 2.0, 1.0)
        w, b, rm, rv = _params(spec, pdtype, affine=affine)
        y, mean, rstd = forward(spec, x, w, b, rm, rv, backend=backend, return_stats=True)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert isinstance(y, np.ndarray)
        stat_dtype = np.float64 if dtype == np.float64 else np.float32
        assert rstd.shape == stats_shape(spec) and rstd.dtype == stat_dtype
        if spec["kind"] == "rms":
            assert mean is None
        else:
            assert mean.shape == stats_shape(spec) and mean.dtype == stat_dtype
        # the low-precision result agrees with the float64 computation
        x64 = x.astype(np.float64)
        p64 = [None if p is None else p.astype(np.float64) for p in (w, b, rm, rv)]
        y64 = forward(spec, x64, *p64, backend=backend)
        # 16-bit data computes in float32 and rounds the output once (u_16, in _tol)
        np.testing.assert_allclose(y.astype(np.float64), y64,
                                   atol=_tol(spec, x, dtype, w, b, rm, rv)["atol"])

    check()


# ------------------------------------------------------------------ memory layouts
LAYOUTS = ["strided", "negative", "fortran", "transposed", "byteswapped", "readonly"]


def relayout(a, layout):
    """A new array equal to ``a`` (C-contiguous) in another memory layout."""
    if layout == "strided":                    # every other element of a bigger array
        big = np.zeros(tuple(2 * d for d in a.shape), a.dtype)
        r = big[tuple(slice(1, None, 2) for _ in a.shape)]
        r[...] = a
    elif layout == "negative":                 # negative strides on every axis
        flip = tuple(slice(None, None, -1) for _ in a.shape)
        r = a[flip].copy()[flip]
    elif layout == "fortran":
        r = np.array(a, order="F", copy=True)
    elif layout == "transposed":               # a C-contiguous array seen through .T
        r = a.T.copy().T
    elif layout == "byteswapped":
        r = a.astype(a.dtype.newbyteorder())
    elif layout == "readonly":
        r = a.copy()
        r.setflags(write=False)
    else:
        raise AssertionError(layout)
    assert not np.shares_memory(r, a)
    return r


def assert_is_layout(a, layout):
    """The relayout really produced what it claims (where the shape allows it)."""
    several = sum(d > 1 for d in a.shape)
    if layout in ("strided", "negative") and a.size > 1:
        assert not a.flags.c_contiguous
    if layout == "negative" and a.size > 1:
        assert min(a.strides) < 0
    if layout in ("fortran", "transposed") and several > 1:
        assert a.flags.f_contiguous and not a.flags.c_contiguous
    if layout == "byteswapped":
        assert not a.dtype.isnative
    if layout == "readonly":
        assert not a.flags.writeable


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_any_memory_layout_equals_contiguous_copy(kind, backend):
    @SETTINGS
    @given(spec=specs(kind), dtype=st.sampled_from([np.float32, np.float64]),
           with_running=st.booleans())
    def check(spec, dtype, with_running):
        x = _data(spec, dtype, 1.5, -0.5)
        w, b, rm, rv = _params(spec, np.float32)
        training = spec["kind"] in ("batch", "instance")
        if training and with_running:
            rm, rv = np.zeros(_param_shape(spec)), np.ones(_param_shape(spec))
        rc = [None if p is None else p.copy() for p in (rm, rv)]
        y_ref, m_ref, r_ref = forward(spec, x, w, b, *rc, backend=backend,
                                      return_stats=True)
        for layout in LAYOUTS:
            xv = relayout(x, layout)
            np.testing.assert_array_equal(xv, x)
            assert_is_layout(xv, layout)
            # parameters and running statistics in the same layout; training updates
            # the running statistics in place, so those cannot be read-only
            pv = [None if p is None
                  else p.copy() if (training and i >= 2 and layout == "readonly")
                  else relayout(p, layout)
                  for i, p in enumerate((w, b, rm, rv))]
            y, m, r = forward(spec, xv, *pv, backend=backend, return_stats=True)
            assert y.shape == x.shape and y.dtype == xv.dtype, layout
            tol = _tol(spec, x, dtype, w, b, rm, rv)
            np.testing.assert_allclose(y.astype(np.float64), y_ref.astype(np.float64),
                                       err_msg=layout, rtol=0, atol=tol["atol"])
            np.testing.assert_allclose(r, r_ref, err_msg=layout, rtol=tol["rtol"])
            if m_ref is not None:
                np.testing.assert_allclose(m, m_ref, err_msg=layout, **tol)
            if training and rm is not None:   # in-place running-stat updates agree too
                np.testing.assert_allclose(pv[2], rc[0], err_msg=layout, **tol)
                np.testing.assert_allclose(pv[3], rc[1], err_msg=layout, **tol)
            np.testing.assert_array_equal(xv, x)   # the view itself was not written to

    check()


# ------------------------------------------------------------------ out=
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(("backend", "dtype"), DATA_DTYPES)
def test_out_in_place_equals_out_of_place(kind, backend, dtype):
    dtype = K.np_dtype(dtype)

    @DTYPE_SETTINGS
    @given(spec=specs(kind), target=st.sampled_from(["x", "x_strided", "other",
                                                     "other_fortran"]))
    def check(spec, target):
        x = _data(spec, dtype, 1.5, 0.25)
        w, b, rm, rv = _params(spec)
        y_ref = forward(spec, x, w, b, rm, rv, backend=backend)
        if target == "x":
            xin = x.copy()
            out = xin
        elif target == "x_strided":            # in place on a non-contiguous view
            xin = relayout(x, "strided")
            out = xin
            base = xin.base
            outside = base.copy()
        else:
            xin = x
            out = (np.empty_like(x) if target == "other"
                   else np.asfortranarray(np.empty_like(x)))
        res = forward(spec, xin, w, b, rm, rv, out=out, backend=backend)
        assert res is out
        np.testing.assert_allclose(out.astype(np.float64), y_ref.astype(np.float64), rtol=0,
                                   atol=_tol(spec, x, dtype, w, b, rm, rv)["atol"])
        if target == "x_strided":              # nothing outside the view was touched
            mask = np.ones(base.shape, bool)
            mask[tuple(slice(1, None, 2) for _ in base.shape)] = False
            np.testing.assert_array_equal(base[mask], outside[mask])
        if target.startswith("other"):
            np.testing.assert_array_equal(xin, x)

    check()


# ------------------------------------------------------------------ inputs untouched
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(("backend", "dtype"), DATA_DTYPES)
def test_inputs_are_never_modified(kind, backend, dtype):
    dtype = K.np_dtype(dtype)

    @DTYPE_SETTINGS
    @given(spec=specs(kind), affine=st.booleans(), nonfinite=st.booleans())
    def check(spec, affine, nonfinite):
        x = _data(spec, dtype, 1.5, 0.25)
        if nonfinite:                           # NaN/Inf must not change the rule
            x.reshape(-1)[0] = np.nan
            x.reshape(-1)[-1] = np.inf
        w, b, rm, rv = _params(spec, affine=affine)
        g = _data(dict(spec, seed=spec["seed"] + 7), dtype)
        training = spec["kind"] in ("batch", "instance")
        if training:                            # updated in place: allowed, checked below
            rm, rv = np.zeros(_param_shape(spec)), np.ones(_param_shape(spec))
        before = {name: (None if a is None else a.copy())
                  for name, a in dict(x=x, w=w, b=b, rm=rm, rv=rv, g=g).items()}
        y, mean, rstd = forward(spec, x, w, b, rm, rv, backend=backend, return_stats=True)
        assert y is not x and not np.shares_memory(y, x)
        stats_before = (None if mean is None else mean.copy(), rstd.copy())
        gx, gw, gb = backward(spec, g, x, mean, rstd, w, backend=backend)
        assert gx.shape == x.shape and gx.dtype == x.dtype
        for name, a in dict(x=x, w=w, b=b, g=g).items():
            if a is not None:
                K.assert_same(a, before[name], err_msg=name)
        if mean is not None:
            np.testing.assert_array_equal(mean, stats_before[0])
        np.testing.assert_array_equal(rstd, stats_before[1])
        if spec["kind"].endswith("_eval"):      # fixed statistics are only read
            np.testing.assert_array_equal(rm, before["rm"])
            np.testing.assert_array_equal(rv, before["rv"])
        elif training and not nonfinite:        # torch's update, in place
            assert not np.array_equal(rm, before["rm"]) or np.allclose(mean, 0)

    check()


# ------------------------------------------------------------------ NaN / Inf
def _nonfinite_case(kind, axis, dtype):
    spec = dict(kind=kind, shape=(3, 4, 5) if axis == 1 else (3, 5, 4), axis=axis,
                groups=2, seed=3)
    if kind in ("layer", "rms"):
        spec["ns"] = spec["shape"][-1:]
    x = _data(spec, dtype, 1.5, 0.25)
    # Inf alone in one channel/group/row of sample 0 (mean = inf), NaN in another
    # channel/group/row of sample 1
    if axis == 1:
        x[0, 1, 2], x[1, 2, 3] = np.inf, np.nan
    else:
        x[0, 2, 1], x[1, 3, 2] = np.inf, np.nan
    return spec, x


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(("backend", "dtype"), DATA_DTYPES)
def test_nonfinite_input_propagates_as_torch(kind, dtype, axis, backend):
    """A group holding NaN/Inf normalizes to all-NaN (mean/variance are NaN there);
    every other group stays finite. With fixed statistics it stays elementwise. RMSNorm
    of a row holding Inf but no NaN: mean square = inf, so finite values become 0 and
    the Inf becomes NaN (inf * 0), as ``torch.nn.functional.rms_norm``."""
    import warnings
    spec, x = _nonfinite_case(kind, axis, dtype)
    w, b, rm, rv = _params(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # warnings: the next test
        y = forward(spec, x, w, b, rm, rv, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    if kind.endswith("_eval"):
        np.testing.assert_array_equal(~np.isfinite(y), ~np.isfinite(x))
        return
    xg = groups_of(spec, x)
    bad = ~np.isfinite(xg).all(axis=1)
    yg = groups_of(spec, y)
    assert bad.any() and not bad.all()
    assert np.isfinite(yg[~bad]).all()
    if kind == "rms":
        inf_only = bad & ~np.isnan(xg).any(axis=1)
        assert inf_only.any()
        assert np.isnan(yg[bad & ~inf_only]).all()
        finite = np.isfinite(xg[inf_only])
        np.testing.assert_array_equal(yg[inf_only][finite], 0)
        assert np.isnan(yg[inf_only][~finite]).all()
    else:
        assert np.isnan(yg[bad]).all()


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(("backend", "dtype"), DATA_DTYPES)
def test_nonfinite_input_does_not_warn(kind, dtype, backend):
    """The NumPy reference kernels silence floating-point warnings on purpose (NaN/Inf
    are data to propagate); the functional layer must not add its own. (Regression:
    functional._split_shift computed inf - inf with a RuntimeWarning for float16/32
    BatchNorm/InstanceNorm/GroupNorm input holding Inf, fixed in ad874b6.)"""
    import warnings
    spec, x = _nonfinite_case(kind, -1, dtype)
    w, b, rm, rv = _params(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y, mean, rstd = forward(spec, x, w, b, rm, rv, backend=backend, return_stats=True)
        gx, _, _ = backward(spec, np.ones_like(x), x, mean, rstd, w, backend=backend)
    assert np.isnan(y).any() and y.shape == gx.shape == x.shape
