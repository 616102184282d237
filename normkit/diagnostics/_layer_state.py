"""Per-layer diagnostics state: the hooks the layers call in training mode.

A layer calls ``start(layer, x)`` before its training forward, ``state.release()``
after it (also when it raised) and ``state.check(mean, rstd)`` after a successful one.
The cheap checks (non-finite values, near-zero variances) run on every step from the
statistics the forward returns; the full analysis on the first ``warmup_checks`` steps,
every ``check_every`` steps after that and whenever the input shape changes. For
BatchNorm the full analysis reuses the per-sample moments the forward computed anyway
(``_engine.capture``); repeated warnings of one layer and cause are rate-limited.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _engine, _moments
from . import _layer_warnings as texts
from . import _noise_model as noise
from ._config import check_setting, get_config, resolve


def _capture_hook():
    """The forward's thread-local capture of its per-plane moments (the one place that
    names it: the engine's hook, made for this module)."""
    return _engine.capture


def _shape_of(x):
    """The shape of an input before the forward validated it (None if it has none)."""
    shape = getattr(x, "shape", None)
    if shape is not None:
        return tuple(shape)
    try:
        return np.shape(x)
    except (ValueError, TypeError):      # ragged or not array-like: the forward says so
        return None


def start(layer, x):
    """Called by a layer at the start of a training forward; None means no diagnostics.

    Returns the layer's state object, whose ``release()`` must run after the forward
    (also when it raised) and ``check(mean, rstd)`` after a successful one. With the
    layer's diagnostics off, the cost is this call and one attribute test.
    """
    setting = layer.diagnostics
    if setting is False:
        return None
    state = state_of(layer)
    thr = state.thr
    if state.src is not setting or state.cfg is not get_config():
        thr = state.resolve(setting)
    if not thr.enabled:
        return None
    state.step = step = state.step + 1
    shape = _shape_of(x)
    full = (step <= thr.warmup_checks or (step - thr.warmup_checks) % thr.check_every == 0
            or shape is None or shape != state.last_shape)
    state.full, state.x, state.shape = full, x, shape
    if full and state.capture:
        cap = _capture_hook()
        cap.on, cap.value = True, None
    return state


def state_of(layer):
    """The layer's diagnostics state, created on first use."""
    st = getattr(layer, "_diag_state", None)
    if st is None:
        st = layer._diag_state = LayerState(layer)
    return st


def warn_eval(layer, thr, reasons, recommendation, causes):
    """Warn about an eval check, rate-limited per layer and cause like training steps."""
    st = state_of(layer)
    st.eval_checks += 1
    if [cz for cz in sorted(causes) if st.due("eval:" + cz, st.eval_checks, thr)]:
        texts.emit(texts.eval_message(layer, reasons, recommendation))


def _cheap_causes(mean, rstd, gate, zero_limit, thr):
    """Non-finite and near-zero-variance channels from the forward's own statistics.
    One small reduction covers both: NaN/Inf in the input make rstd NaN (and the sum
    with it), a near-constant channel makes rstd^2 >= the gate."""
    r = rstd.reshape(-1)
    causes = {}
    if r.dot(r) < gate:
        return causes
    bad = ~np.isfinite(mean) | np.isnan(rstd)     # rstd = inf: eps = 0 and var = 0
    if bad.any():
        causes["nonfinite"] = bad
    if thr.near_zero_var is not None:
        zero = ~bad & (rstd >= zero_limit)
        if zero.any():
            causes["zero_var"] = zero
    return causes


def _noise_causes(causes, n, n_samples, m, valid, noisy, thr):
    """Add the noise causes of a full analysis to ``causes``."""
    if n < thr.min_values:
        causes["few_values"] = True
    n_noisy = np.count_nonzero(noisy)
    if n_noisy and n_noisy > thr.channel_fraction * np.count_nonzero(valid):
        causes["noisy"] = noisy
    if n_samples == 1 and m > 1:
        causes["single_sample"] = True


class LayerState:
    """Per-layer diagnostics: step counter, rate limits, pooled structure, and the
    step in progress (a layer's forward is not re-entrant, so one object serves)."""

    def __init__(self, layer):
        self.layer = layer
        self.capture = type(layer).__name__ != "InstanceNorm"
        self.src = self.cfg = self.thr = None
        self.step = 0
        self.checks = 0
        self.eval_checks = 0
        self.last_shape = None        # input shape of the last full check
        self.warned = {}              # cause -> step of the last warning
        self.pool = None              # pooled per-channel structure arrays
        self.last_vse = None          # per-channel var_rel_se of the last full check
        self.gate = (None, None, False)   # ((eps, dtype, size), rstd^2 sum gate, fast ok)
        self.full, self.x, self.shape = False, None, None   # the step in progress

    def resolve(self, setting):
        self.src, self.cfg = setting, get_config()
        # checked again here: the layer attribute can be reassigned after construction
        self.thr = resolve(check_setting(setting))
        self.gate = (None, None, False)
        return self.thr

    @property
    def last_var_rel_se(self):
        v = self.last_vse
        return None if v is None else noise.nanmed(v, None)

    def due(self, cause, step, thr):
        last = self.warned.get(cause)
        if last is not None and (thr.warn_every is None or step - last < thr.warn_every):
            return False
        self.warned[cause] = step
        return True

    # ---------------------------------------------------------------- per step
    def release(self):
        """Stop capturing the forward's per-sample moments (also when it raised)."""
        if self.full and self.capture:
            _capture_hook().on = False

    def _zero_limit(self, eps):
        """rstd at or above this means var <= near_zero_var * eps."""
        f = self.thr.near_zero_var
        if f is None or not eps > 0:
            return math.inf
        return 1.0 / math.sqrt((1.0 + f) * eps)

    def check(self, mean, rstd):
        """After the forward: cheap checks every step, the full analysis on check steps."""
        x, self.x = self.x, None
        if not self.shape or 0 in self.shape:
            return                        # an empty batch has no statistics to judge
        eps = self.layer.eps
        key = (eps, rstd.dtype, rstd.size)
        if self.gate[0] != key:
            # rstd <= 1/sqrt(eps), so the sum of squares is at most size/eps: when that
            # fits the dtype with room to spare, summing it cannot overflow
            fits = eps > 0 and rstd.size / eps < np.finfo(rstd.dtype).max / 4
            self.gate = (key, self._zero_limit(eps) ** 2, fits)
        if not self.full and self.gate[2]:
            # The common step, without np.errstate (it costs more than the check): the
            # sum of squares is NaN when the input held NaN/Inf and reaches the gate
            # when a channel's variance is near zero; below it there is nothing to say.
            r = rstd.reshape(-1)
            if r.dot(r) < self.gate[1]:
                return
        with np.errstate(all="ignore"):   # NaN, Inf and eps = 0 are reported in words
            self._check(x, self.shape, mean, rstd)

    def _check(self, x, shape, mean, rstd):
        thr, eps = self.thr, self.layer.eps
        causes = _cheap_causes(mean, rstd, self.gate[1], self._zero_limit(eps), thr)
        details = None
        if self.full:
            details = (self._full_batch(causes, shape) if self.capture
                       else self._full_instance(causes, np.asarray(x)))
        if not causes:
            return
        due = [cz for cz in causes if self.due(cz, self.step, thr)]
        if due:
            c = mean.shape[0] if self.capture else mean.shape[1]
            texts.emit(texts.training_message(self.layer, self.step, shape, thr, due, causes,
                                              details, self.pool, c))

    # ---------------------------------------------------------------- full analyses
    def _sample_moments(self, big_n):
        """Per-sample channel moments (mu, m2: (N', C)), values per sample m and the
        within-sample kurtosis, from what the forward captured; None if nothing was."""
        cap = _capture_hook()
        captured, cap.value = getattr(cap, "value", None), None
        if captured is None:
            return None
        be, view, pmean, pm2 = captured
        c, k = view.c, self.thr.kurtosis_sample
        if view.layout == "first" and view.n % big_n == 0:
            p, m_plane = view.n, view.s
            sub = noise.subsample_planes(view.data, max(1, -(-k // p)))
            beta_w = noise.within_kurtosis(sub, pmean, pm2, m_plane, 2)
            if p == big_n:
                return pmean, pm2, m_plane, beta_w
            g = p // big_n                      # several planes per sample: merge them
            mu, m2 = _moments.merge_equal(pmean.reshape(big_n, g, c),
                                          pm2.reshape(big_n, g, c), m_plane, axis=1)
            return mu, m2, g * m_plane, beta_w
        if view.layout == "last" and big_n > 1 and view.s % big_n == 0 and view.s > big_n:
            # channels last: per-sample moments cost one extra reduction here
            m = view.s // big_n
            data = view.data.reshape(big_n, m, c)
            mu, m2 = be.channels_last_moments(data)
        else:                                   # (N, C) input, or channels on axis 0
            flat = (view.data.reshape(-1, c) if view.layout == "last"
                    else view.data.reshape(c, -1).T)
            data, m = flat.reshape(-1, 1, c), 1
            mu = flat.astype(np.float64)
            m2 = np.zeros_like(mu)
        step, kk = noise.strided(m, max(1, -(-k // data.shape[0])))
        beta_w = (noise.within_kurtosis(data[:, :step * kk:step, :].astype(np.float64),
                                        mu, m2, m, 1) if m > 3 else np.full(c, 3.0))
        return mu, m2, m, beta_w

    def _full_batch(self, causes, shape):
        moments = self._sample_moments(shape[0])
        if moments is None:
            return None
        mu, m2, m, beta_w = moments
        thr, n_samples = self.thr, mu.shape[0]
        st = noise.Structure(mu, m2, m, beta_w)
        self.checks += 1
        self.last_shape = shape
        self.update_pool(st, thr.ema)
        pool = self.pool
        rho = self.pooled_rho()
        n_eff, mse, vse, bias = noise.expected_noise(rho, m, n_samples, pool["beta_w"],
                                                     pool["het"], pool["beta_b"])
        valid = np.isfinite(st.var)
        if "zero_var" in causes:
            valid &= ~causes["zero_var"]
        self.last_vse = np.where(valid, vse, np.nan)
        noisy = valid & ((vse > thr.max_var_rel_se) | (mse > thr.max_mean_rel_se))
        _noise_causes(causes, n_samples * m, n_samples, m, valid, noisy, thr)
        return dict(n=n_samples * m, n_samples=n_samples, m=m, n_eff=n_eff, mse=mse,
                    vse=vse, bias=bias, rho=rho, valid=valid, noisy=noisy)

    def _full_instance(self, causes, x):
        thr = self.thr
        ax = self.layer.axis % x.ndim
        big_n, c = x.shape[0], x.shape[ax]
        s = x.size // (big_n * c)
        self.checks += 1
        self.last_shape = x.shape
        beta = _instance_kurtosis(x, ax, thr.kurtosis_sample)
        vse = noise.per_statistic_cv(beta, s)
        mse = np.full(c, 1.0 / math.sqrt(s))
        valid = np.ones(c, bool)
        if "nonfinite" in causes:
            valid &= ~causes["nonfinite"].any(axis=0)
        self.last_vse = np.where(valid, vse, np.nan)
        noisy = valid & ((vse > thr.max_var_rel_se) | (mse > thr.max_mean_rel_se))
        _noise_causes(causes, s, big_n, 1, valid, noisy, thr)
        return dict(n=s, vse=vse, mse=mse, valid=valid, noisy=noisy)

    # ---------------------------------------------------------------- pooling
    def update_pool(self, st, a):
        """Fold one batch's structure into the per-layer pooled estimates (an EMA with
        weight ``a``, an equal-weight mean over the first 1 / a checks)."""
        new = {"lam": st.lam, "beta_w": st.beta_w, "het": st.het}
        if st.has_beta_b:
            new["beta_b"] = st.beta_b
        p = self.pool
        if p is None or p["lam"].shape != st.lam.shape:
            nan = np.full_like(st.lam, np.nan)
            p = self.pool = {"lam": nan, "beta_w": np.full_like(nan, 3.0),
                             "het": np.zeros_like(nan), "beta_b": np.full_like(nan, 3.0),
                             "n": 0}
        p["n"] += 1
        a = max(a, 1.0 / p["n"])
        for key, val in new.items():
            old = p[key]
            upd = old + a * (val - old)
            if not np.isfinite(upd.sum()):   # NaN channels: keep the old, or take the new
                upd = np.where(np.isfinite(val), np.where(np.isfinite(old), upd, val), old)
            p[key] = upd

    def pooled_rho(self):
        lam = np.maximum(self.pool["lam"], 0.0)
        return lam / (1.0 + lam)


def _instance_kurtosis(x, ax, kurtosis_sample):
    """Kurtosis per channel, averaged over instances, from a strided subsample of each
    instance (shrunk towards 3; 3 when an instance has too few values to tell)."""
    big_n, c = x.shape[0], x.shape[ax]
    s = x.size // (big_n * c)
    if x.flags.c_contiguous and ax == 1:
        sub = noise.subsample_planes(x.reshape(big_n, c, s),
                                     max(4, -(-kurtosis_sample // big_n)))
    else:
        xm = np.moveaxis(x, ax, 1)
        sl = (slice(None), slice(None)) + tuple(
            slice(None, None, max(1, d // 8)) for d in xm.shape[2:])
        sub = np.asarray(xm[sl], dtype=np.float64).reshape(big_n, c, -1)
    kk = sub.shape[2]
    if not (kk > 3 and s > 3):
        return np.full(c, 3.0)
    _, _, g = noise.plane_kurtosis(sub)                   # (N, C): one per instance
    ok = np.isfinite(g)
    g_mean = np.where(ok, g, 0.0).sum(axis=0) / ok.sum(axis=0)
    return noise.shrink_kurtosis(g_mean * (kk + 1.0) / (kk - 1.0), big_n * kk)
