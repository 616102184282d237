"""Small-batch diagnostics, Monte Carlo: the reported standard errors and effective
sample sizes against their empirical spread over many batches. Split from
tests/test_diagnostics.py (its fixture and data generator are reused). Formulas and
assumptions: docs/diagnostics.md.
"""
import math
import warnings

import _bounds_extra as BX
import numpy as np
import pytest
from test_diagnostics import _fresh_config, _image_like  # noqa: F401 (autouse fixture)

import normkit as nk
from normkit import diagnostics as D
from normkit.diagnostics import UnstableBatchStatisticsWarning as W


# ============================================================ Monte Carlo: the statistics
def _monte_carlo(gen, batches, sigma2=None):
    """Empirical spread of the batch statistics over many batches vs the reports.

    Returns (empirical var CV, predicted var_rel_se, empirical n_eff, predicted n_eff
    (median), predicted mean_rel_se, empirical mean SE / sigma). Channels are independent
    replicates, so spreads are taken per channel over batches and pooled (RMS) over
    channels; predictions are the RMS of the per-batch estimates (they estimate a
    variance, so averaging squares is what is unbiased).
    """
    reps = [D.batch_stats_report(gen()) for _ in range(batches)]
    var = np.array([r.var for r in reps])
    mean = np.array([r.mean for r in reps])
    emp_cv = math.sqrt(np.mean((var.std(axis=0, ddof=1) / var.mean(axis=0)) ** 2))
    pred_cv = math.sqrt(np.mean(np.array([r.var_rel_se for r in reps]) ** 2))
    s2 = var.mean() if sigma2 is None else sigma2
    var_of_mean = mean.var(axis=0, ddof=1).mean()
    emp_neff = s2 / var_of_mean
    pred_neff = float(np.median([r.n_eff for r in reps]))
    pred_mse = math.sqrt(np.mean(np.array([r.mean_rel_se for r in reps]) ** 2))
    return emp_cv, pred_cv, emp_neff, pred_neff, pred_mse, math.sqrt(var_of_mean / s2), reps


# Monte-Carlo tolerances: Z standard errors of the compared estimates under the test's
# own sampling model (tests/_bounds_extra.py: P_FAIL = 1e-9 per check, Z = 6.11; the
# seeds are fixed), plus, where the noise model is an approximation, its documented
# accuracy: the expectation of each estimate within ACCURACY of the truth
# (docs/diagnostics.md, "within 20% (25% for n_eff at N = 4)"). Where the model is
# exact (i.i.d. normal data, the textbook formulas) no accuracy term is added.
Z = BX.z_score()
ACCURACY, ACCURACY_N4 = 0.2, 0.25


def _se_var_cv(reps, n=None):
    """Relative SE of the empirical CV of the variance (pooled over channels): from the
    kurtosis of the sample variance, 3 + 12 / (n - 1) for n normal values, else its
    plug-in estimate over the batches."""
    var = np.array([r.var for r in reps])
    if n is None:
        d = var - var.mean(axis=0)
        k = float(np.mean((d ** 4).mean(axis=0) / (d ** 2).mean(axis=0) ** 2))
    else:
        k = 3 + 12 / (n - 1)
    return BX.rel_se_sd(k, var.size)


def _check_cv(reps, pred, emp, accuracy, n=None):
    """|pred / emp - 1| within accuracy + Z (SE of emp + SE of pred, the RMS of the
    per-batch var_rel_se)."""
    se = _se_var_cv(reps, n) + BX.rel_se_rms([r.var_rel_se for r in reps])
    assert abs(pred / emp - 1) <= accuracy + Z * se, (pred, emp, accuracy + Z * se)
    return se


def _check_mean_se(reps, pred_mse, emp_mse, accuracy):
    """emp_mse^2 = Var(batch mean) / sigma^2 over (B - 1) C degrees of freedom: exact
    chi2 interval for normal batch means; pred_mse: RMS of per-batch mean_rel_se."""
    lo, hi = BX.chi2_ratio_interval((len(reps) - 1) * reps[0].mean.size)
    tol = accuracy + (math.sqrt(hi) - math.sqrt(lo)) / 2 + Z * BX.rel_se_rms(
        [r.mean_rel_se for r in reps])
    assert abs(pred_mse / emp_mse - 1) <= tol, (pred_mse, emp_mse, tol)


@pytest.mark.parametrize("shape", [(4, 32, 8, 8), (16, 32), (64, 32), (2, 48)])
def test_var_rel_se_iid_normal(shape):
    rng = np.random.default_rng(1)
    emp, pred, emp_neff, pred_neff, pred_mse, emp_mse, reps = _monte_carlo(
        lambda: rng.standard_normal(shape), 250, sigma2=1.0)
    n = reps[0].values_per_channel
    assert n == math.prod(shape) // shape[1]
    # i.i.d. normal: the model is exact, sampling error only
    se = _check_cv(reps, pred, emp, 0.0, n)
    # the textbook CV sqrt(2 / (n - 1)) is emp's expectation: pred / textbook =
    # (pred / emp) (emp / textbook), within Z (2 SE of emp + SE of pred)
    textbook = math.sqrt(2 / (n - 1))
    assert abs(pred / textbook - 1) <= Z * (se + _se_var_cv(reps, n)), (pred, textbook)
    # mean_rel_se: per-batch rho estimates clipped at 0 bias it up at N = 4 (+13%,
    # docs/diagnostics.md): the model's accuracy
    _check_mean_se(reps, pred_mse, emp_mse, ACCURACY)
    # no correlation: n_eff ~ n. The per-batch n_eff is n wherever rho_hat <= 0, so the
    # population median is n: n inside the distribution-free median interval
    lo, hi = BX.median_interval([r.n_eff for r in reps])
    assert lo <= n <= hi, (lo, n, hi, pred_neff)


def test_var_rel_se_heavy_tails_uses_kurtosis():
    """Student t(6) has kurtosis 6: the normal formula would be ~37% too small."""
    rng = np.random.default_rng(2)
    shape = (8, 16, 8, 8)
    emp, pred, *_, reps = _monte_carlo(lambda: rng.standard_t(6, shape), 200, sigma2=1.5)
    n = 8 * 64
    normal = math.sqrt(2 / (n - 1))
    # the normal formula fails: farther from emp than emp's sampling error allows
    assert abs(normal / emp - 1) > Z * _se_var_cv(reps), (normal, emp)
    _check_cv(reps, pred, emp, ACCURACY)


@pytest.mark.parametrize("n,h,rho", [(8, 16, 0.3), (16, 8, 0.1), (4, 32, 0.5)])
def test_correlated_image_like_n_eff_and_var_rel_se(n, h, rho):
    rng = np.random.default_rng(3)
    emp, pred, emp_neff, pred_neff, pred_mse, emp_mse, reps = _monte_carlo(
        lambda: _image_like(rng, n, 32, h, rho, np.float64), 250, sigma2=1.0)
    values = n * h * h
    # the truth measured (variance of the batch mean over batches: normal, an exact
    # chi2 interval) agrees with the model's n_eff, far below the number of values
    true_neff = values / (1 + (h * h - 1) * rho)
    lo, hi = BX.chi2_ratio_interval((250 - 1) * 32)
    assert true_neff / hi <= emp_neff <= true_neff / lo, (emp_neff, true_neff)
    # n_eff estimate: median interval vs emp's chi2 interval, within the model's
    # accuracy (per-batch n_eff from N samples is a ratio estimate, biased up at small N:
    # the layers pool it over steps; see test_layer_pools_structure_over_steps_at_batch_2)
    m_lo, m_hi = BX.median_interval([r.n_eff for r in reps])
    acc = ACCURACY if n > 4 else ACCURACY_N4
    tol = acc + (m_hi - m_lo) / (2 * pred_neff) + (1 / lo - 1 / hi) / 2
    assert abs(pred_neff / emp_neff - 1) <= tol, (pred_neff, emp_neff, tol)
    _check_mean_se(reps, pred_mse, emp_mse, ACCURACY)
    # var_rel_se from the variance components matches the empirical spread ...
    se = _check_cv(reps, pred, emp, ACCURACY)
    # ... where the naive sqrt(2 / (n_eff - 1)) does not (it treats the variance like
    # the mean; the between-sample part enters the variance squared): it is off by more
    # than the model's accuracy plus emp's and emp_neff's sampling error
    if rho >= 0.3:
        naive = math.sqrt(2 / (emp_neff - 1))
        assert naive / emp - 1 > ACCURACY + Z * se + (1 / lo - 1 / hi) / 2, (naive, emp)


def test_heteroscedastic_samples():
    """Samples of different scale: the per-sample variances spread more than the model
    of identical samples allows; the empirical term keeps var_rel_se calibrated."""
    rng = np.random.default_rng(4)

    def gen():
        s = np.exp(0.4 * rng.standard_normal((8, 32, 1, 1)))
        return (math.sqrt(0.3) * rng.standard_normal((8, 32, 1, 1))
                + math.sqrt(0.7) * s * rng.standard_normal((8, 32, 16, 16)))
    emp, pred, *_, reps = _monte_carlo(gen, 250)
    _check_cv(reps, pred, emp, ACCURACY)


def test_layer_pools_structure_over_steps_at_batch_2():
    """One batch of 2 samples measures rho on 1 degree of freedom; the layer pools the
    variance components over steps and converges to the true rho."""
    rng = np.random.default_rng(5)
    bn = nk.BatchNorm(32, diagnostics={"check_every": 1, "warn_every": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", W)
        for _ in range(60):
            bn(_image_like(rng, 2, 32, 28, 0.5))
    # Tolerance: the 32 channels are independent replicates; the pooled lambda of each
    # is an average of 60 unbiased estimates (docs/diagnostics.md), close to symmetric,
    # so the true value is its median, and rho (monotone in lambda) and n_eff (monotone
    # in rho) keep it: the true rho and n_eff lie in the distribution-free median
    # intervals over channels (BX.median_interval, P_FAIL each).
    rho = bn._diag_state.pooled_rho()
    lo, hi = BX.median_interval(rho)
    assert lo <= 0.5 <= hi, (lo, hi)
    true_neff = 2 * 784 / (1 + 783 * 0.5)                      # 3.99
    pool = bn._diag_state.pool
    n_eff, mse, vse, _ = D._noise_model.expected_noise(
        rho, 784, 2, *(pool[k] for k in ("beta_w", "het", "beta_b")))
    lo, hi = BX.median_interval(n_eff)
    assert lo <= true_neff <= hi, (lo, true_neff, hi)
