"""Code paths of the Numba backend added for 16-bit speed (issue 13): the small-plane run
of ``channels_first_affine_act`` (several whole planes of <= 512 values per work item,
per-plane parameters looked up from the plane index) and the F16C narrowing, checked
against the float64 NumPy reference with the bounds of ``_cases.py``."""
from __future__ import annotations

import _cases as K
import numpy as np
import pytest

from normkit.backends import numba_backend as nb
from normkit.backends import numba_convert as conv
from normkit.backends import numba_kernels as nk
from normkit.backends import numpy_ref as ref

DTYPES = [np.float32, np.float64, "float16", "bfloat16"]
# plane sizes around the vector widths, the 7x7 planes of ResNet, and the run limit
PLANES = (1, 3, 15, 16, 17, 33, 49, 1023)


def _per_plane(p):
    """(N', C) parameters broadcast over (N, C, S) planes, in float64."""
    return p.astype(np.float64)[:, :, None]


def _setup(N, C, S, dtype, per_sample, seed):
    dtype = K.np_dtype(dtype)
    x = K.make((N, C, S), dtype, "offset", seed=seed)
    rng = np.random.default_rng(seed + 1)
    pdt = K.param_dtype(dtype)
    rows = N if per_sample else 1
    shift = (rng.standard_normal((rows, C)) + K.offset_center(dtype)).astype(pdt)
    scale, offset = (rng.standard_normal((rows, C)).astype(pdt) for _ in range(2))
    return dtype, x, (shift, scale, offset), K.make((N, C, S), dtype, "normal", seed=seed + 2)


@pytest.mark.parametrize("par", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["N'=1", "N'=N"])
@pytest.mark.parametrize("S", PLANES)
@pytest.mark.parametrize("dtype", DTYPES, ids=K.dtype_name)
def test_small_plane_runs_match_reference(dtype, S, per_sample, par):
    """Runs of _RUN // S planes: C chosen so that runs straddle samples and the last run
    is partial; residual + ReLU, out of place and in place (out is x, out is residual)."""
    N, C = 3, max(2, 2 * nk._RUN // S // 3 + 1)
    dtype, x, params, r = _setup(N, C, S, dtype, per_sample, seed=S)
    old, nb._S.par_min = nb._S.par_min, (1 if par else 1 << 62)
    try:
        for res, relu in ((None, False), (r, True)):
            out = np.empty_like(x)
            nb.channels_first_affine_act(x, *params, res, relu, out)
            want = np.empty(x.shape)
            ref.channels_first_affine_act(x, *params, res, relu, want)
            affine = (x.astype(np.float64) - _per_plane(params[0])) * _per_plane(params[1])
            terms = (affine, _per_plane(params[2])) + (() if res is None else (res,))
            K.assert_within(out, want, K.bound_elementwise(dtype, *terms), f"S={S}")
            y = x.copy()
            nb.channels_first_affine_act(y, *params, res, relu, y)
            K.assert_same(y, out)
            if res is not None:
                o = r.copy()
                nb.channels_first_affine_act(x, *params, o, relu, o)
                K.assert_same(o, out)
    finally:
        nb._S.par_min = old


@pytest.mark.parametrize("dtype", DTYPES, ids=K.dtype_name)
def test_small_plane_runs_nan_inf(dtype):
    """NaN/Inf in x propagate per element exactly as in the reference (plane size 49)."""
    dtype, x, params, _ = _setup(2, 200, 49, dtype, False, seed=5)
    x.reshape(-1)[[0, 48, 49, 5000, x.size - 1]] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
    out = np.empty_like(x)
    nb.channels_first_affine(x, *params, out)
    want = np.empty(x.shape)
    ref.channels_first_affine(x, *params, want)
    with np.errstate(invalid="ignore"):
        affine = (x.astype(np.float64) - _per_plane(params[0])) * _per_plane(params[1])
        K.assert_within(out, want, K.bound_elementwise(dtype, affine, _per_plane(params[2])), "out")


def test_software_f16_narrowing_equals_numpy_bit_for_bit():
    """The software float32 -> float16 path (used where F16C is not, e.g. under
    NUMBA_CPU_NAME=generic) on every 1021st float32 pattern and every tie, and the
    kernels' path (F16C here when the host has it) on the same patterns, NaN included."""
    u = np.uint32
    ties = ((np.arange(1 << 19, dtype=u)[:, None] << u(13)) | np.array([0xFFF, 0x1000, 0x1001], u))
    stride = np.arange(0, 1 << 32, 1021, dtype=np.uint64).astype(u)
    f = np.concatenate([ties.ravel(), stride]).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        want = f.astype(np.float16).view(np.int16)
    for narrow in (conv.narrow_f16_software, conv.convert):
        got = np.empty(f.size, np.int16)
        narrow(f, got)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, [hex(b) for b in f.view(np.uint32)[bad[:5]]]
