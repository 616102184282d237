"""The fused inference epilogue: relu(norm(x) + residual) in one pass, for BN and GN."""
import numpy as np
import pytest

import normkit as nk

import _cases as K

BACKENDS = K.BACKENDS


def _relu(a):
    return np.where(a < 0, 0, a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("norm", ["batch_norm", "batch_norm_train", "group_norm"])
def test_matches_the_unfused_composition(backend, dtype, axis, with_residual, norm):
    rng = np.random.default_rng(0)
    shape = (3, 6, 17, 5) if axis == 1 else (3, 17, 5, 6)
    x = rng.standard_normal(shape).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype) if with_residual else None
    w, b = rng.standard_normal(6).astype(dtype), rng.standard_normal(6).astype(dtype)
    rm, rv = rng.standard_normal(6).astype(dtype), (rng.random(6) + 0.5).astype(dtype)
    call = {
        "batch_norm": lambda **k: nk.batch_norm(x, rm, rv, w, b, False, axis=axis,
                                                backend=backend, **k),
        "batch_norm_train": lambda **k: nk.batch_norm(x, None, None, w, b, True, axis=axis,
                                                      backend=backend, **k),
        "group_norm": lambda **k: nk.group_norm(x, 3, w, b, axis=axis, backend=backend, **k),
    }[norm]
    plain, mean, rstd = call(return_stats=True)
    plain = plain.astype(np.float64)
    expected = _relu(plain + (0 if r is None else r.astype(np.float64)))
    y = call(activation="relu", residual=r)
    assert y.dtype == dtype and y.shape == shape
    # the fused and the unfused call are two computations of the normalization (bound
    # from _cases with this call's n and conditioning), then the fused one adds r in
    # dtype and the expected value adds it to the rounded plain output (8 u_d of each)
    n = 1 if norm == "batch_norm" else x.size // 6 if norm == "batch_norm_train" else \
        x.size // (3 * 3)
    scale = max(1.0, float(np.abs(w).max()), float(np.abs(b).max()), float(np.abs(plain).max()))
    tol = K.tol_normalized(dtype, n, K.conditioning(mean, rstd), scale)
    bound = 2 * tol["atol"] + K.bound_elementwise(dtype, plain, 0 if r is None else r)
    K.assert_within(y, expected, bound, f"{norm} relu(norm(x) + r)")
    assert (y >= 0).all()
    if r is not None:   # residual only, no activation
        y = call(residual=r)
        K.assert_within(y, plain + r, bound, f"{norm} norm(x) + r")


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_may_be_out_and_nan_stays_nan(backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9)).astype(np.float32)
    x[0, 1, 3] = np.nan
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    plain = nk.batch_norm(x, rm, rv, backend=backend)
    expected = _relu(plain + r)
    acc = r.copy()
    y = nk.batch_norm(x, rm, rv, out=acc, residual=acc, activation="relu", backend=backend)
    assert y is acc
    # same normalization (eval, mean 0, var 1); the sums differ by their float32 roundings
    K.assert_within(acc, expected, K.bound_elementwise(np.float32, plain, r), "in place")
    assert np.isnan(acc[0, 1, 3]) and np.isfinite(acc[0, 1, 2])


def test_bad_activation_arguments():
    x = np.ones((2, 4, 3), np.float32)
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        nk.batch_norm(x, rm, rv, activation="gelu")
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 4, 3\)"):
        nk.group_norm(x, 2, residual=np.ones((2, 4)))
    with pytest.raises(TypeError, match="int64"):
        nk.batch_norm(x, rm, rv, residual=np.ones((2, 4, 3), np.int64))
