"""Small-batch diagnostics: the statistics are validated by Monte Carlo, the warnings by
their behaviour (when, how often, how to silence them), the eval check by drift and
convergence scenarios. Formulas and assumptions: docs/diagnostics.md.
"""
import math
import warnings

import _cases as K
import numpy as np
import pytest

import normkit as nk
from normkit import diagnostics as D
from normkit.diagnostics import UnstableBatchStatisticsWarning as W


@pytest.fixture(autouse=True)
def _fresh_config():
    D.reset_config()
    yield
    D.reset_config()


def _collect(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [w for w in got if issubclass(w.category, W)]


def _image_like(rng, n, c, h, rho, dtype=np.float32):
    """Per-(sample, channel) random offsets plus i.i.d. noise: intra-sample correlation rho."""
    a = math.sqrt(rho) * rng.standard_normal((n, c, 1, 1))
    return (a + math.sqrt(1 - rho) * rng.standard_normal((n, c, h, h))).astype(dtype)


# ============================================================ report object
def test_report_fields_and_text():
    rng = np.random.default_rng(6)
    x = _image_like(rng, 2, 16, 56, 0.5)
    r = D.batch_stats_report(x)
    assert r.values_per_channel == 2 * 56 * 56
    for name in ("n_eff", "mean_rel_se", "var_rel_se", "rho", "kurtosis"):
        assert getattr(r, name).shape == (16,)
    assert r.unstable and r.reasons
    assert "GroupNorm(num_groups=8, num_channels=16)" in r.recommendation
    assert np.median(r.n_eff) < 50                     # 6272 values, a handful effective
    text = str(r)
    assert "var_rel_se" in text and "n_eff" in text and text == r.summary()
    ok = D.batch_stats_report(rng.standard_normal((256, 16)))
    assert not ok.unstable and ok.reasons == [] and ok.recommendation == ""


def test_report_kinds_and_layouts():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 8, 5, 6))
    a = D.batch_stats_report(x, axis=1)
    b = D.batch_stats_report(np.moveaxis(x, 1, -1), axis=-1)
    # rounding only (same values, other summation order): n_eff is smooth in rho, so the
    # bound of the correlation estimate applies (see _lam_rtol)
    rho = np.clip(a.rho, 0.0, 1 - 1e-12)
    np.testing.assert_allclose(a.n_eff, b.n_eff, rtol=_lam_rtol(x, rho / (1 - rho)))
    rows = x.transpose(1, 0, 2, 3).reshape(8, -1)
    # two float64 centered variances of the same 90 values: K.bound_m2 / n
    K.assert_within(a.var, rows.var(axis=1), K.bound_m2(rows, 1) / rows.shape[1], "var")
    inst = D.batch_stats_report(x, kind="instance")
    assert inst.var_rel_se.shape == (3, 8) and inst.values_per_channel == 30
    grp = D.batch_stats_report(x, kind="group", num_groups=2)
    assert grp.var_rel_se.shape == (3, 2) and grp.values_per_channel == 120
    with pytest.raises(ValueError, match="num_groups"):
        D.batch_stats_report(x, kind="group")
    with pytest.raises(ValueError, match="kind"):
        D.batch_stats_report(x, kind="layer")
    tiny = D.batch_stats_report(rng.standard_normal((4, 8, 3)), kind="instance")
    assert tiny.unstable and "too few values" in " ".join(tiny.reasons)


def test_report_zero_variance_and_nonfinite_channels():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((16, 6, 4, 4))
    x[:, 2] = 7.0
    x[3, 4, 1, 1] = np.nan
    r = D.batch_stats_report(x)
    assert list(r.zero_var) == [2] and list(r.nonfinite) == [4]
    assert r.unstable and any("near-zero variance" in s for s in r.reasons)
    assert any("non-finite" in s for s in r.reasons)


# ============================================================ layer warnings
def test_warns_at_two_values_per_channel():
    rng = np.random.default_rng(9)
    bn = nk.BatchNorm(16)
    bn.name = "encoder.bn1"
    got = _collect(bn, rng.standard_normal((2, 16)).astype(np.float32))
    assert len(got) == 1
    msg = str(got[0].message)
    assert "'encoder.bn1'" in msg and "n = 2 values per channel" in msg
    assert "var_rel_se = 1.41" in msg and "recommendation" in msg
    assert got[0].filename == __file__                    # points at the caller's line


def test_warns_at_batch_2_on_56x56_maps():
    rng = np.random.default_rng(10)
    bn = nk.BatchNorm(64)
    got = _collect(bn, _image_like(rng, 2, 64, 56, 0.5))
    assert len(got) == 1
    msg = str(got[0].message)
    assert "n = 6272 values per channel (2 samples x 3136)" in msg
    assert "n_eff" in msg and "GroupNorm(num_groups=32, num_channels=64)" in msg
    assert "a batch of at least" in msg and "renorm=True" in msg


@pytest.mark.parametrize("shape", [(256, 16), (32, 16, 16, 16)])
def test_silent_on_large_normal_batches(shape):
    rng = np.random.default_rng(11)
    bn = nk.BatchNorm(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(12):                                 # warm-up: all fully checked
            bn(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("warn_every,expected", [(10, 10), (1, 100), (None, 1), (1000, 1)])
def test_rate_limiting_over_100_steps(warn_every, expected):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    bn = nk.BatchNorm(8, diagnostics={"warn_every": warn_every, "check_every": 1})
    got = _collect(lambda: [bn(x) for _ in range(100)])
    assert len(got) == expected


def test_filters_turn_it_into_an_error_or_silence_it():
    x = np.random.default_rng(13).standard_normal((2, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", W)
        with pytest.raises(W, match="cannot be trusted"):
            nk.BatchNorm(8)(x)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("ignore", W)
        nk.BatchNorm(8)(x)
    assert not got
    assert issubclass(nk.UnstableBatchStatisticsWarning, UserWarning)


def test_per_layer_off_and_global_configuration():
    x = np.random.default_rng(14).standard_normal((2, 8)).astype(np.float32)
    off = nk.BatchNorm(8, diagnostics=False)
    assert _collect(off, x) == [] and off._diag_state is None      # no work at all
    with D.configure(enabled=False):
        assert _collect(nk.BatchNorm(8), x) == []
        assert len(_collect(nk.BatchNorm(8, diagnostics=True), x)) == 1   # layer wins
    assert D.get_config().enabled
    assert len(_collect(nk.BatchNorm(8), x)) == 1
    lax = {"max_var_rel_se": 2.0, "max_mean_rel_se": 1.0, "min_values": 2}
    assert _collect(nk.BatchNorm(8, diagnostics=lax), x) == []
    D.configure(**lax)
    assert _collect(nk.BatchNorm(8), x) == []
    D.reset_config()
    bn = nk.BatchNorm(8)
    bn.diagnostics = False                                   # switch off later
    assert _collect(bn, x) == []
    with pytest.raises(TypeError, match="unknown diagnostics setting"):
        nk.BatchNorm(8, diagnostics={"max_var": 1})
    with pytest.raises(ValueError, match="max_var_rel_se"):
        D.configure(max_var_rel_se=-1)
    with pytest.raises(TypeError):
        nk.BatchNorm(8, diagnostics="yes")


def test_outputs_unchanged_by_diagnostics():
    rng = np.random.default_rng(15)
    for axis, x in ((1, _image_like(rng, 2, 8, 9, 0.5)),
                    (-1, np.ascontiguousarray(
                        _image_like(rng, 2, 8, 9, 0.5).transpose(0, 2, 3, 1)))):
        a = nk.BatchNorm(8, axis=axis, diagnostics=False)
        b = nk.BatchNorm(8, axis=axis, diagnostics={"warn_every": None})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", W)
            for _ in range(3):
                np.testing.assert_array_equal(a(x), b(x))
        np.testing.assert_array_equal(a.running_var, b.running_var)


def _lam_rtol(x, lam):
    """Rounding bound of the intra-sample correlation estimate (see the caller)."""
    n, c = x.shape[:2]
    planes = x.astype(np.float64).reshape(n, c, -1)             # (N, C, m)
    m = planes.shape[2]
    mu = planes.mean(axis=2)
    d_mu = K.bound_mean(planes, 2)
    m2 = ((planes - mu[..., None]) ** 2).sum(axis=2)
    rel = 2 * d_mu.max(axis=0) / mu.std(axis=0) + (K.bound_m2(planes, 2) / m2).max(axis=0)
    return float(np.max(4 * rel * (1 + 1 / (m * np.maximum(lam, 1e-300)))))


def test_layouts_give_the_same_diagnosis():
    rng = np.random.default_rng(16)
    x = _image_like(rng, 4, 8, 12, 0.4)
    states = []
    for axis, xi in ((1, x), (-1, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))):
        bn = nk.BatchNorm(8, axis=axis, diagnostics={"warn_every": None})
        _collect(bn, xi)
        states.append(bn._diag_state)
    # Not a statistical tolerance: both layouts subsample the same values for the
    # kurtosis, so only rounding differs. lam (between- over within-sample variance) is
    # formed from per-sample moments of m values, each within K.bound_mean / K.bound_m2;
    # to first order its relative error is 2 d_mu / spread(mu) + d_m2 / m2, amplified by
    # (1 + 1/(m lam)) where lam is small; vse and rho are smooth in lam (derivative <= 1
    # in relative terms), and the float32 -> float64 widening is exact. Factor 4 covers
    # the two layouts plus the report's separate evaluation.
    rtol = _lam_rtol(x, states[0].pool["lam"])
    np.testing.assert_allclose(states[0].pool["lam"], states[1].pool["lam"], rtol=rtol)
    np.testing.assert_allclose(states[0].last_vse, states[1].last_vse, rtol=rtol)
    rep = D.batch_stats_report(x)                              # same numbers as the report
    np.testing.assert_allclose(states[0].pooled_rho(), rep.rho, rtol=rtol)


def test_cheap_checks_every_step_and_batch_size_change():
    rng = np.random.default_rng(17)
    bn = nk.BatchNorm(6, diagnostics={"check_every": 10**6, "warmup_checks": 1})
    clean = lambda n=32: _image_like(rng, n, 6, 4, 0.5)  # noqa: E731
    assert _collect(lambda: [bn(clean()) for _ in range(5)]) == []
    bad = clean()
    bad[0, 3, 0, 0] = np.inf
    got = _collect(bn, bad)                               # not a full-check step
    assert len(got) == 1 and "non-finite" in str(got[0].message)
    assert "channels 3" in str(got[0].message)
    const = clean()
    const[:, 1] = 2.0
    got = _collect(bn, const)
    assert len(got) == 1 and "near-zero variance" in str(got[0].message)
    got = _collect(bn, clean(2))                          # the last, small batch of an epoch
    assert len(got) == 1 and "2 samples" in str(got[0].message)


def test_instance_norm_warnings():
    rng = np.random.default_rng(18)
    big = rng.standard_normal((4, 8, 16, 16)).astype(np.float32)
    assert _collect(nk.InstanceNorm(8), big) == []
    got = _collect(nk.InstanceNorm(8), rng.standard_normal((4, 8, 3)).astype(np.float32))
    assert len(got) == 1 and "only n = 3 values per instance" in str(got[0].message)
    x = rng.standard_normal((4, 8, 16, 16)).astype(np.float32)
    x[1, 5] = 0.5
    got = _collect(nk.InstanceNorm(8), x)
    assert len(got) == 1 and "(1, 5)" in str(got[0].message)
    assert _collect(nk.InstanceNorm(8, diagnostics=False), x) == []
    xl = np.ascontiguousarray(rng.standard_normal((4, 3, 8)).astype(np.float32))
    assert len(_collect(nk.InstanceNorm(8, axis=-1), xl)) == 1


# ============================================================ eval-time check
def _trained(rng, steps, momentum=0.1):
    bn = nk.BatchNorm(8, momentum=momentum, diagnostics=False)
    for _ in range(steps):
        bn(_image_like(rng, 32, 8, 8, 0.3))
    return bn.eval()


def test_eval_check_convergence():
    rng = np.random.default_rng(19)
    young = _trained(rng, 5)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        r = D.check_running_stats(young, _image_like(rng, 32, 8, 8, 0.3))
    # (1 - 0.1)^5 by either pow or 5 products: <= 6 roundings of a value < 1 (plus
    # pow's 1 ulp), relative 8 u64
    assert not r.converged and r.init_weight == pytest.approx(0.9 ** 5, rel=8 * K.U64)
    assert r.batches_needed == 29 and r.unstable
    assert any(issubclass(w.category, W) and "not converged" in str(w.message) for w in got)
    old = _trained(rng, 60)
    r = D.check_running_stats(old, _image_like(rng, 32, 8, 8, 0.3), warn=False)
    assert r.converged and not r.unstable and len(r.drifting) == 0
    cma = _trained(rng, 3, momentum=None)
    assert D.check_running_stats(cma, _image_like(rng, 32, 8, 8, 0.3), warn=False).converged


def test_eval_check_drift():
    rng = np.random.default_rng(20)
    bn = _trained(rng, 60)
    x = _image_like(rng, 32, 8, 8, 0.3)
    x[:, [1, 6]] += 1.5                                   # two channels shifted by ~1.5 std
    x[:, 3] *= 3.0                                        # one channel with 9x the variance
    r = D.check_running_stats(bn, x, warn=False)
    assert set(r.drifting.tolist()) == {1, 3, 6}
    assert r.var_ratio[3] > 5 and abs(r.mean_shift[1]) > 1
    # every channel drifting: unstable, warns with the same category
    got = _collect(D.check_running_stats, bn, _image_like(rng, 32, 8, 8, 0.3) + 2.0)
    assert len(got) == 1 and "drift" in str(got[0].message)
    # a small shift in a batch of 2 is within that batch's own noise: no drift
    r = D.check_running_stats(bn, _image_like(rng, 2, 8, 8, 0.3) + 0.6, warn=False)
    assert len(r.drifting) == 0 and "running statistics check" in str(r)
    with pytest.raises(ValueError, match="track_running_stats"):
        D.check_running_stats(nk.BatchNorm(8, track_running_stats=False), x)


def test_eval_check_uses_structure_pooled_in_training():
    """Trained with diagnostics on, the layer knows rho: the drift test then uses normal
    quantiles; from a single batch it uses Student-t quantiles on N - 1 df."""
    rng = np.random.default_rng(21)
    bn = nk.BatchNorm(8, diagnostics={"check_every": 1})
    for _ in range(40):
        bn(_image_like(rng, 32, 8, 8, 0.3))
    bn.eval()
    r = D.check_running_stats(bn, _image_like(rng, 4, 8, 8, 0.3), warn=False)
    assert r.z_threshold == 3.0 and r.running_var_rel_se is not None
    bare = _trained(rng, 40)
    r = D.check_running_stats(bare, _image_like(rng, 4, 8, 8, 0.3), warn=False)
    assert r.z_threshold == pytest.approx(9.2189, rel=0, abs=_table_tol(4, 3.0, 3))  # t(3)


def _table_tol(decimals, z, df):
    """Tolerance against a t quantile printed with ``decimals`` decimals at the normal
    level Phi(z): half a unit of the last printed digit, plus the effect of z itself
    being printed to 6 decimals (|dt/dz| = phi(z) / f_t(t) times 5e-7). Not a rounding
    bound of our arithmetic: the table's own precision."""
    from scipy import stats
    t = stats.t.isf(stats.norm.sf(z), df)
    return 0.5 * 10.0 ** -decimals + stats.norm.pdf(z) / stats.t.pdf(t, df) * 5e-7


def test_drift_threshold_is_the_student_t_quantile():
    """The eval check's z threshold on df degrees of freedom: the t quantile at the
    normal level Phi(drift_z) (SciPy), inf without a degree of freedom."""
    from normkit.diagnostics._running_stats import drift_threshold
    # t quantiles from tables, at the levels of z = 1.959964 (0.975) and z = 3 (0.99865)
    for z, df, table, decimals in ((1.959964, 1, 12.7062, 4), (1.959964, 2, 4.3027, 4),
                                   (1.959964, 10, 2.2281, 4), (3.0, 1, 235.80, 2)):
        assert drift_threshold(z, df) == pytest.approx(
            table, rel=0, abs=_table_tol(decimals, z, df)), (z, df)   # docs: 236 at N = 2
    # -> normal: Cornish-Fisher, t_df(Phi(z)) = z + (z^3 + z) / (4 df) + O(1/df^2);
    # twice the first term (7.5e-9 here) bounds the difference, plus a few u64 of 3
    assert drift_threshold(3.0, 10**9) == pytest.approx(
        3.0, rel=0, abs=2 * (27 + 3) / (4 * 10**9) + 8 * 3 * K.U64)
    assert drift_threshold(3.0, 0) == math.inf


# ============================================================ what a newcomer meets (issue 11)
def test_array_likes_are_accepted_everywhere():
    """A Python list works in training mode (it used to raise AttributeError from
    inside the diagnostics) and gives what the ndarray gives, in the reports too."""
    rows = [[1.0, 2.0, 3.0], [4.0, 5.0, 7.0], [1.0, 1.5, 1.0]]
    arr = np.array(rows)
    got = _collect(lambda: np.testing.assert_array_equal(nk.BatchNorm(3)(rows),
                                                         nk.BatchNorm(3)(arr)))
    assert len(got) == 2 and "input (3, 3)" in str(got[0].message)
    planes = [[[1.0, 2.0, 4.0]] * 3, [[0.0, 3.0, 1.0]] * 3]
    got = _collect(nk.InstanceNorm(3), planes)
    assert len(got) == 1 and "input (2, 3, 3)" in str(got[0].message)
    rep = D.batch_stats_report(rows)
    np.testing.assert_array_equal(rep.var, D.batch_stats_report(arr).var)
    bn = _trained(np.random.default_rng(30), 40)
    x = _image_like(np.random.default_rng(31), 16, 8, 4, 0.3)
    np.testing.assert_array_equal(D.check_running_stats(bn, x.tolist(), warn=False).var_ratio,
                                  D.check_running_stats(bn, x, warn=False).var_ratio)


def _lines(warning):
    msg = str(warning.message)
    assert "0 of 0" not in msg
    lines = msg.splitlines()
    assert not any(line.rstrip().endswith((":", ",")) for line in lines[1:]), msg
    return lines


def test_nonfinite_input_leads_the_warning_and_names_its_channels():
    all_nan = np.full((4, 3), np.nan, np.float32)
    got = _collect(nk.BatchNorm(3), all_nan)
    assert len(got) == 1
    lines = _lines(got[0])
    assert lines[1] == "  - non-finite statistics: NaN/Inf in the input in channels 0, 1, 2"
    assert "var_rel_se" not in str(got[0].message)         # nothing to say about noise
    rec = next(line for line in lines if "recommendation" in line)
    assert rec.startswith("  recommendation: find where the NaN/Inf come from")
    # one bad channel in a noisy batch: the NaN first, then the noise of the others
    x = np.random.default_rng(32).standard_normal((4, 3)).astype(np.float32)
    x[2, 1] = np.inf
    lines = _lines(_collect(nk.BatchNorm(3), x)[0])
    assert lines[1].endswith("in channels 1") and "noisy in 2 of 2 channels" in lines[3]
    # InstanceNorm names the (sample, channel) pairs
    xi = np.random.default_rng(33).standard_normal((2, 3, 16)).astype(np.float32)
    xi[1, 2, 5] = np.nan
    lines = _lines(_collect(nk.InstanceNorm(3), xi)[0])
    assert lines[1] == ("  - non-finite statistics: NaN/Inf in the input in 1 of 6 "
                        "instances, e.g. (sample, channel) (1, 2)")
    # every instance NaN and too few values: the noise line has numbers, not "nan"
    msg = str(_collect(nk.InstanceNorm(3), np.full((2, 3, 3), np.nan, np.float32))[0].message)
    assert "var_rel_se = 1.00" in msg and "nan" not in msg.lower().replace("nan/inf", "")


def test_instance_norm_warning_speaks_of_per_instance_statistics():
    x = np.random.default_rng(34).standard_normal((4, 8, 3)).astype(np.float32)
    msg = str(_collect(nk.InstanceNorm(8), x)[0].message)
    assert "per-instance statistics" in msg and "batch statistics" not in msg
    assert "batch statistics in training mode" in str(
        _collect(nk.BatchNorm(8), x[:, :, 0])[0].message)


# ============================================================ bad arguments (issue 15)
_X = np.random.default_rng(40).standard_normal((4, 4, 5))
_MASK = np.zeros(_X.shape, bool)
_MASK[0, 0, 0] = True

BAD_ARGUMENTS = [
    # (keyword arguments, exception, message pattern)
    ({"kind": "group", "num_groups": 0}, ValueError,
     r"^num_groups: expected a positive int dividing the 4 channels, got 0$"),
    ({"kind": "group", "num_groups": -2}, ValueError, r"^num_groups: expected .*, got -2$"),
    ({"kind": "group", "num_groups": 3}, ValueError, r"dividing the 4 channels, got 3$"),
    ({"kind": "group", "num_groups": 2.5}, TypeError, r"^num_groups: expected .*, got 2.5"),
    ({"kind": "group", "num_groups": True}, TypeError, r"^num_groups: expected .*, got True"),
    ({"kind": "group"}, ValueError, r"^num_groups: kind='group' needs .*, got None$"),
    ({"num_groups": 2}, ValueError, r"^num_groups: only used with kind='group'"),
    ({"axis": 1.0}, TypeError, r"^axis: expected an int, got 1.0"),
    ({"axis": np.float64(1.0)}, TypeError, r"^axis: expected an int, got 1.0"),
    ({"axis": True}, TypeError, r"^axis: expected an int, got True"),
    ({"axis": 3}, ValueError, r"^axis: expected an int in \[-3, 3\) for input of shape "
                              r"\(4, 4, 5\), got 3$"),
    ({"kind": "instance", "axis": 0}, ValueError, r"^axis: kind='instance' expects"),
    ({"kind": "layer"}, ValueError, r"^kind: expected 'batch', 'instance' or 'group', got 'layer'"),
    ({"eps": -1e-5}, ValueError, r"^eps: expected a finite real number >= 0, got -1e-05$"),
    ({"eps": float("nan")}, ValueError, r"^eps: expected a finite real number >= 0, got nan"),
    ({"eps": "1e-5"}, TypeError, r"^eps: expected a real number >= 0, got '1e-5'"),
    ({"eps": None}, TypeError, r"^eps: expected a real number >= 0, got None"),
    ({"thresholds": 3}, TypeError, r"^thresholds: expected None, a Thresholds or a dict"),
    ({"thresholds": {"max_var": 1}}, TypeError, r"unknown diagnostics setting"),
    ({"thresholds": {"min_values": 2.5}}, TypeError, r"^min_values: expected an int >= 0"),
]

BAD_DATA = [
    # (x, exception, message pattern)
    (_X.astype(np.complex128), TypeError, r"^x: expected a floating-point array .*, got "
                                          r"dtype complex128$"),
    (_X.astype(object), TypeError, r"got dtype object$"),
    (_X.astype(np.int64), TypeError, r"got dtype int64$"),
    (_X > 0, TypeError, r"got dtype bool$"),
    (np.ma.masked_array(_X, mask=_MASK), TypeError,
     r"^x: expected an ndarray, got a masked array; .*x\.filled\(value\).*x\.data"),
    ("abc", TypeError, r"^x: expected an array of floats \(N, C, \.\.\.\), got str$"),
    (None, TypeError, r"got NoneType$"),
    ({"a": 1.0}, TypeError, r"got dict$"),
    (np.ones(5), ValueError,
     r"^x: expected at least 2 dimensions \(N, C, \.\.\.\), got shape \(5,\)$"),
    (np.ones((0, 3)), ValueError, r"^x: expected a non-empty array, got shape \(0, 3\)$"),
    ([[1.0, 2.0], [3.0]], ValueError, r"^x: expected an array of floats .* cannot convert"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", BAD_ARGUMENTS,
                         ids=[repr(k) for k, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_name_what_was_expected_and_given(kwargs, exc, pattern):
    before = _X.copy()
    with pytest.raises(exc, match=pattern):
        D.batch_stats_report(_X, **kwargs)
    np.testing.assert_array_equal(_X, before)                 # input untouched


@pytest.mark.parametrize("x,exc,pattern", BAD_DATA,
                         ids=[f"{type(x).__name__}-{getattr(x, 'dtype', '')}"
                              for x, _, _ in BAD_DATA])
def test_bad_data_is_rejected_with_a_clear_error(x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        D.batch_stats_report(x)


def test_integral_arguments_of_any_integer_type():
    """operator.index: np.int64 is an int; the results equal those of plain ints."""
    a = D.batch_stats_report(_X, axis=np.int64(-1), kind="group", num_groups=np.int32(5))
    b = D.batch_stats_report(_X, axis=-1, kind="group", num_groups=5)
    np.testing.assert_array_equal(a.var, b.var)
    assert D.batch_stats_report(_X, eps=np.float32(0.0)).unstable in (True, False)


def test_bad_arguments_of_the_eval_check_and_the_thresholds():
    bn = _trained(np.random.default_rng(41), 3)
    x = _image_like(np.random.default_rng(42), 4, 8, 4, 0.3)
    with pytest.raises(TypeError, match=r"^layer: expected a normkit BatchNorm or InstanceNorm"):
        D.check_running_stats(None, x)
    with pytest.raises(TypeError, match=r"got LayerNorm$"):
        D.check_running_stats(nk.LayerNorm(4), x)
    with pytest.raises(ValueError, match=r"^x: expected 8 channels on axis 1 \(the layer's "
                                         r"num_features\), got 4"):
        D.check_running_stats(bn, x[:, :4])
    with pytest.raises(TypeError, match=r"^warn: expected True or False, got 'yes'"):
        D.check_running_stats(bn, x, warn="yes")
    with pytest.raises(TypeError, match=r"^x: expected a floating-point array"):
        D.check_running_stats(bn, x.astype(np.complex64))
    with pytest.raises(ValueError, match=r"^warn_every: expected an int >= 1, got 0$"):
        D.configure(warn_every=0)
    with pytest.raises(TypeError, match=r"^ema: expected a number in \(0, 1\], got 'a'$"):
        D.Thresholds(ema="a")
    with pytest.raises(ValueError, match=r"^channel_fraction: expected a number in \[0, 1\)"):
        D.Thresholds(channel_fraction=1.0)
    with pytest.raises(TypeError, match=r"^check_every: expected an int >= 1, got 2.0$"):
        nk.BatchNorm(8, diagnostics={"check_every": 2.0})
    with pytest.raises(TypeError, match=r"^diagnostics: expected None"):
        nk.BatchNorm(8, diagnostics="yes")
    later = nk.BatchNorm(8)
    later.diagnostics = "yes"                     # reassigned after construction
    with pytest.raises(TypeError, match=r"^diagnostics: expected None"):
        later(x)


# ============================================================ no NumPy warnings leak out
_RNG = np.random.default_rng(43)
HARD_DATA = {
    "constant": np.full((4, 3, 5), 2.0),
    "all NaN": np.full((4, 3, 5), np.nan),
    "all Inf": np.full((4, 3, 5), np.inf),
    "some NaN": np.where(_RNG.random((4, 3, 5)) < 0.3, np.nan, _RNG.standard_normal((4, 3, 5))),
    "single sample": _RNG.standard_normal((1, 3, 5)),
    "one value per sample": _RNG.standard_normal((5, 3)),
    "near float64 max": np.full((4, 3, 5), 1e308) * np.array([1, -1, 1, -1, 1]),
}
REPORT_KINDS = [{}, {"kind": "instance"}, {"kind": "group", "num_groups": 3}, {"axis": 0},
                {"eps": 0.0}, {"kind": "instance", "eps": 0.0}]


@pytest.mark.parametrize("name", list(HARD_DATA))
def test_no_floating_point_warning_leaks(name):
    """Under warnings.simplefilter("error") the diagnostics raise no NumPy
    RuntimeWarning (nor anything else) on data they are meant to report on."""
    x = HARD_DATA[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kwargs in REPORT_KINDS:
            rep = D.batch_stats_report(x, **kwargs)
            assert str(rep) and rep.var.dtype == np.float64
        bn = _trained(np.random.default_rng(44), 3)
        bn.running_var[0] = -1.0                              # a corrupted running state
        bn.running_mean[1] = np.nan
        xc = np.concatenate([x] * 3, axis=1)[:, :8] if x.ndim == 3 else None
        if xc is not None:
            assert str(D.check_running_stats(bn, xc, warn=False))


@pytest.mark.parametrize("name", ["constant", "all NaN", "all Inf", "some NaN", "single sample"])
@pytest.mark.parametrize("layer_type", [nk.BatchNorm, nk.InstanceNorm])
def test_no_floating_point_warning_leaks_from_the_layer_checks(name, layer_type):
    """The training-time checks on the same data: only the diagnostics' own warning."""
    layer = layer_type(3, diagnostics={"check_every": 1, "warn_every": 1})
    x = HARD_DATA[name].astype(np.float32)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("error")
        warnings.simplefilter("always", W)
        for _ in range(2):
            layer(x)
    assert all(issubclass(w.category, W) for w in got)


# ============================================================ 16-bit input
def _half_dtypes():
    dts = [np.dtype(np.float16)]
    try:
        import ml_dtypes
        dts.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    return dts


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"kind": "instance"}, {"kind": "group", "num_groups": 2},
                                    {"axis": -1}, {"axis": 0}], ids=repr)
def test_16_bit_input_to_the_report(dtype, kwargs):
    """16-bit data are widened exactly to float64: the report equals that of the
    widened data, field for field, and every per-statistic field is float64."""
    x = np.random.default_rng(45).standard_normal((4, 6, 8, 8)).astype(dtype)
    rep = D.batch_stats_report(x, **kwargs)
    ref = D.batch_stats_report(x.astype(np.float64), **kwargs)
    for f in ("n_eff", "n_eff_var", "rho", "mean_rel_se", "var_rel_se", "var_rel_bias",
              "kurtosis", "mean", "var"):
        assert getattr(rep, f).dtype == np.float64, f
        np.testing.assert_array_equal(getattr(rep, f), getattr(ref, f), err_msg=f)
    assert rep.reasons == ref.reasons and rep.recommendation == ref.recommendation


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=str)
@pytest.mark.parametrize("layer_type", [nk.BatchNorm, nk.InstanceNorm])
def test_16_bit_input_to_the_layer_warnings(dtype, layer_type):
    x = np.random.default_rng(46).standard_normal((2, 6, 2, 2)).astype(dtype)
    layer = layer_type(6, diagnostics={"warn_every": 1})
    got = _collect(layer, x)
    assert len(got) == 1 and "input (2, 6, 2, 2)" in str(got[0].message)
    assert layer._diag_state.last_vse.dtype == np.float64
