"""Regenerate every figure (and the data behind it) of the normkit documentation.

One command does it all, from the repository root::

    python docs/tools/make_figures.py              # full runs (~30 min on 2 cores)
    python docs/tools/make_figures.py --plot-only  # re-plot from the committed data
    python docs/tools/make_figures.py --fast --out /tmp/figs   # reduced variant, < 1 min

Outputs: data in ``docs/_data/`` (JSON) and figures in ``docs/figures/`` (PNG), both
committed, so the documentation build only reads them and never retrains. ``--out DIR``
writes both into ``DIR`` instead (the tests use that with ``--fast``).

Figures:

1. ``accuracy_vs_batch.png``: test accuracy (eval mode) of a tiny conv net trained on
   scikit-learn's digits with plain SGD, for BatchNorm, GroupNorm, LayerNorm and no
   normalization at batch sizes 2..64, several seeds (``tools/digits_net.py``).
2. ``speed.png``: throughput per norm, backend and layout next to PyTorch and ONNX
   Runtime, from the benchmark suite (``python -m normkit bench --json``); the same
   part also measures import time and first-call latency (``coldstart.json``).
3. ``stat_noise.png``: relative standard error of the batch variance vs batch size,
   naive (n = N*H*W), effective sample size (Kish), and measured over random batches.
4. ``train_eval_gap.png``: how far BatchNorm's eval-mode outputs drift from its
   training-mode outputs as the batch shrinks (same trained networks as figure 1).

Data without a figure: ``bench16.json`` (part ``dtypes``), the 16-bit rows of the
benchmark (``python -m normkit bench --cases 16bit --json``) that docs/dtypes.md tabulates.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
sys.path.insert(0, str(HERE))

DATA_DIR = DOCS / "_data"
FIG_DIR = DOCS / "figures"

FULL = {
    "batch_sizes": [2, 4, 8, 16, 32, 64],
    "norms": ["batch", "group", "layer", "none"],
    "seeds": [0, 1, 2, 3],
    "epochs": 15,
    "base_lr": 0.2,
}
FAST = {
    "batch_sizes": [4, 32],
    "norms": ["batch", "group", "layer", "none"],
    "seeds": [0],
    "epochs": 1,
    "base_lr": 0.2,
}


# ============================================================ 1 + 4: digits experiment
def _worker_init():
    from threadpoolctl import threadpool_limits

    import normkit
    threadpool_limits(1)          # one BLAS thread per worker: the machine has few cores
    normkit.set_num_threads(1)


def _run_one(args):
    norm, batch_size, seed, cfg = args
    import digits_net
    data = digits_net.load_digits()
    t0 = time.perf_counter()
    res = digits_net.train(norm, batch_size, seed, data, epochs=cfg["epochs"],
                           base_lr=cfg["base_lr"])
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def run_digits(cfg, out_dir, jobs):
    """Train every (norm, batch size, seed); resumable through a partial JSON-lines file."""
    import multiprocessing as mp

    import normkit
    partial = out_dir / "digits.partial.jsonl"
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            if r["epochs"] == cfg["epochs"]:
                done[(r["norm"], r["batch_size"], r["seed"])] = r
    tasks = [(n, b, s, cfg) for s in cfg["seeds"] for b in cfg["batch_sizes"]
             for n in cfg["norms"] if (n, b, s) not in done]
    # seed-major (an interrupted run still covers every configuration), and within a
    # seed the smallest batches (most steps) first for load balance
    tasks.sort(key=lambda t: (t[2], t[1]))
    print(f"digits: {len(tasks)} runs to do, {len(done)} already done", flush=True)
    if tasks:
        with open(partial, "a") as fh:
            if jobs > 1:
                pool = mp.get_context("fork").Pool(jobs, initializer=_worker_init)
                results = pool.imap_unordered(_run_one, tasks)
            else:
                _worker_init()
                results = map(_run_one, tasks)
            for r in results:
                done[(r["norm"], r["batch_size"], r["seed"])] = r
                fh.write(json.dumps(r) + "\n")
                fh.flush()
                print(f"  {r['norm']:5s} B={r['batch_size']:2d} seed={r['seed']} "
                      f"acc={r['test_acc_eval']:.3f} gap={r['logit_gap']:.3f} "
                      f"({r['seconds']} s)", flush=True)
            if jobs > 1:
                pool.close()
                pool.join()
    import digits_net
    runs = sorted(done.values(), key=lambda r: (r["norm"], r["batch_size"], r["seed"]))
    result = {
        "description": "tiny conv net on scikit-learn digits, plain SGD, normkit norms; "
                       "see docs/tools/digits_net.py",
        "config": {k: v for k, v in cfg.items()},
        "architecture": [list(c) for c in digits_net.CONVS],
        "group_norm_groups": digits_net.GROUPS,
        "lr_rule": "lr = base_lr * batch_size / 32 (linear scaling)",
        "train_size": 1437, "test_size": 360,
        "normkit_version": normkit.__version__,
        "backend": normkit.backends.resolve().NAME,
        **_code_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, python "
                   f"{platform.python_version()}",
        "runs": runs,
    }
    (out_dir / "digits.json").write_text(json.dumps(result, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    return result


def _code_version():
    """The git commit normkit was imported from ('-dirty': with local changes), if known."""
    import subprocess

    import normkit
    root = Path(normkit.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        commit = None
    return {"normkit_commit": commit}


def summarize_digits(result):
    """(norm, batch_size) -> dict of mean/std/min/max over seeds of the run metrics."""
    import numpy as np
    groups = {}
    for r in result["runs"]:
        groups.setdefault((r["norm"], r["batch_size"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        row = {"n_seeds": len(rs)}
        for metric in ("test_acc_eval", "test_acc_train_mode", "logit_gap",
                       "eval_train_disagreement", "final_train_loss"):
            v = np.array([r[metric] for r in rs], float)
            row[metric] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1
                           else 0.0, "min": float(v.min()), "max": float(v.max())}
        out[key] = row
    return out


# ============================================================ 3: statistics noise
NOISE_BATCHES = [2, 4, 8, 16, 32, 64, 128]


def _anova_rho(feats):
    """Per-channel intra-sample correlation of (N, C, H, W) features (one-way ANOVA)."""
    import numpy as np
    n, c = feats.shape[:2]
    x = feats.reshape(n, c, -1).astype(np.float64)
    m = x.shape[2]
    mu = x.mean(axis=2)                                        # (N, C) per-sample means
    msw = ((x - mu[:, :, None]) ** 2).sum(axis=(0, 2)) / (n * (m - 1))
    msb = m * mu.var(axis=0, ddof=1)
    sb2 = np.maximum((msb - msw) / m, 0.0)
    return sb2 / np.maximum(sb2 + msw, 1e-300)


SYNTH_RHO = 0.2          # intra-sample correlation of the synthetic 56x56 channels
SYNTH_SIZE = 56


def _report_var_rel_se(report_fn, batches):
    """Median over batches of normkit's per-channel var_rel_se, then channel quartiles."""
    import numpy as np
    est = np.array([np.asarray(report_fn(b, axis=1, kind="batch").var_rel_se, float)
                    for b in batches])
    per_channel = np.nanmedian(est, axis=0)
    return {"normkit_median": float(np.nanmedian(per_channel)),
            "normkit_q25": float(np.nanquantile(per_channel, 0.25)),
            "normkit_q75": float(np.nanquantile(per_channel, 0.75))}


def _noise_rows(batch_var, m, rho, report_fn, report_batches, batch_sizes):
    """One row per batch size: naive, Kish and measured relative SE of the variance.

    ``batch_var(nb, draws)`` returns (draws, C) per-channel biased batch variances of
    random batches of ``nb`` samples; ``report_batches(nb)`` yields a few real batches
    for normkit's own estimate.
    """
    import numpy as np
    rows = []
    for nb in batch_sizes:
        n = nb * m
        var = batch_var(nb)
        measured = var.std(axis=0, ddof=1) / var.mean(axis=0)
        n_eff = n / (1 + (m - 1) * rho)
        kish = np.sqrt(2.0 / np.maximum(n_eff - 1, 1e-12))
        row = {
            "batch_size": nb, "n": n,
            "naive": float(np.sqrt(2.0 / (n - 1))),
            "n_eff_median": float(np.median(n_eff)),
            "kish_median": float(np.median(kish)),
            "measured_median": float(np.median(measured)),
            "measured_q25": float(np.quantile(measured, 0.25)),
            "measured_q75": float(np.quantile(measured, 0.75)),
        }
        if report_fn is not None:
            row.update(_report_var_rel_se(report_fn, report_batches(nb)))
        rows.append(row)
    return rows


def run_noise(fast, out_dir):
    """Relative standard error of BatchNorm's batch variance, on real and model data.

    Panel "digits": the input of the third BatchNorm (32 channels, 4x4 maps, m = 16
    values per sample and channel) of the tiny conv net after 5 epochs at batch 32
    (seed 0), over all 1797 digits. Panel "synthetic": channels of 56x56 maps drawn
    from the random-effects model x_ij = a_i + e_ij with intra-sample correlation
    ``SYNTH_RHO`` (Gaussian), the situation of a ResNet's early layers.

    For each batch size N: the naive normal-theory value sqrt(2 / (n - 1)) with
    n = N*m; the same with Kish's effective sample size n_eff = n / (1 + (m - 1) rho)
    (rho estimated by one-way ANOVA over all samples); normkit's own estimate
    (``normkit.diagnostics.batch_stats_report``) when it exists; and the value
    measured over many random batches: std / mean of each channel's batch variance.
    """
    import numpy as np

    import normkit
    report_fn = getattr(getattr(normkit, "diagnostics", None), "batch_stats_report", None)
    threshold, threshold_source = _noise_threshold(normkit)
    draws = 40 if fast else 2000
    report_draws = 2 if fast else 40
    sizes = [2, 8, 32] if fast else NOISE_BATCHES
    rng = np.random.default_rng(1)
    # the digits panel draws from rng first, then the synthetic one (reproducible order)
    digits = _noise_digits_panel(fast, rng, draws, report_draws, sizes, report_fn)
    synthetic = _noise_synthetic_panel(rng, draws, report_draws, sizes, report_fn)
    result = {
        "description": "relative standard error of the per-channel batch variance vs "
                       "batch size; see run_noise in docs/tools/make_figures.py",
        "draws_per_batch_size": draws, "report_batches_per_size": report_draws,
        "threshold": threshold, "threshold_source": threshold_source,
        "normkit_estimate": report_fn is not None,
        **_code_version(),
        "panels": {"digits": digits, "synthetic": synthetic},
    }
    (out_dir / "noise.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _noise_threshold(normkit):
    get_config = getattr(getattr(normkit, "diagnostics", None), "get_config", None)
    if get_config is None:
        return 0.4, "documented default (normkit.diagnostics.get_config absent)"
    return (float(get_config().max_var_rel_se),
            "normkit.diagnostics.get_config().max_var_rel_se")


def _noise_digits_panel(fast, rng, draws, report_draws, sizes, report_fn):
    """A trained network's third BatchNorm input."""
    import warnings

    import digits_net
    import numpy as np

    import normkit
    x_tr, x_te, y_tr, y_te = digits_net.load_digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", normkit.UnstableBatchStatisticsWarning)
        net = digits_net.train_net("batch", 32, 0, x_tr, y_tr, epochs=1 if fast else 5,
                                   base_lr=FULL["base_lr"])[0]
    feats = net.norm_input(np.concatenate([x_tr, x_te]), 2).astype(np.float64)
    n_all, c, h, w = feats.shape
    m = h * w
    rho = _anova_rho(feats)

    def digits_var(nb):
        return np.array([feats[rng.choice(n_all, nb, replace=False)].var(axis=(0, 2, 3))
                         for _ in range(draws)])

    def digits_batches(nb):
        return [feats[rng.choice(n_all, nb, replace=False)] for _ in range(report_draws)]

    return {
        "title": f"digits: input of the 3rd BatchNorm ({c} channels, {h}x{w} maps)",
        "values_per_sample": m, "channels": c, "samples": n_all,
        "rho_median": float(np.median(rho)), "rho_q25": float(np.quantile(rho, 0.25)),
        "rho_q75": float(np.quantile(rho, 0.75)),
        "rows": _noise_rows(digits_var, m, rho, report_fn, digits_batches, sizes),
    }


def _noise_synthetic_panel(rng, draws, report_draws, sizes, report_fn):
    """Channels of SYNTH_SIZE^2 maps from the random-effects model."""
    import numpy as np
    ms = SYNTH_SIZE * SYNTH_SIZE
    cs = 8
    sb2, sw2 = SYNTH_RHO, 1.0 - SYNTH_RHO

    def synth_var(nb):
        # exact simulation through sufficient statistics: per-sample mean and M2
        a = rng.normal(0, np.sqrt(sb2), (draws, nb, cs))
        mean_i = a + rng.normal(0, np.sqrt(sw2 / ms), (draws, nb, cs))
        m2_i = sw2 * rng.chisquare(ms - 1, (draws, nb, cs))
        grand = mean_i.mean(axis=1, keepdims=True)
        return (m2_i.sum(axis=1) + ms * ((mean_i - grand) ** 2).sum(axis=1)) / (nb * ms)

    def synth_batches(nb):
        for _ in range(report_draws):
            a = rng.normal(0, np.sqrt(sb2), (nb, 4, 1, 1))
            yield (a + rng.normal(0, np.sqrt(sw2), (nb, 4, SYNTH_SIZE, SYNTH_SIZE))
                   ).astype(np.float32)

    return {
        "title": f"synthetic: {SYNTH_SIZE}x{SYNTH_SIZE} maps, Gaussian, rho = {SYNTH_RHO}",
        "values_per_sample": ms, "channels": cs, "samples": None,
        "rho_median": SYNTH_RHO, "rho_q25": SYNTH_RHO, "rho_q75": SYNTH_RHO,
        "rows": _noise_rows(synth_var, ms, np.full(cs, SYNTH_RHO), report_fn,
                            synth_batches, sizes),
    }


# ============================================================ 2: speed
def run_speed(fast, out_dir, threads=None):
    """``python -m normkit bench --json``: the benchmark suite's own cases and timing.

    ``threads`` is passed on as ``--threads`` (normkit, torch and ONNX Runtime alike).
    On a machine shared with other work, one thread gives the steadier comparison:
    a multi-threaded call waits for its slowest, possibly descheduled, thread.
    """
    import subprocess
    target = out_dir / "bench.json"
    cmd = [sys.executable, "-m", "normkit", "bench", "--json", str(target), "--no-progress"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if fast:
        cmd += ["--cases", "tiny", "--min-time", "0.01", "--peers", "torch"]
    print("speed:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(target.read_text())


def run_dtypes(fast, out_dir, threads=None):
    """``python -m normkit bench --cases 16bit --json``: the 16-bit rows of docs/dtypes.md."""
    import subprocess
    target = out_dir / "bench16.json"
    cases = "tiny_*16" if fast else "16bit"
    cmd = [sys.executable, "-m", "normkit", "bench", "--cases", cases, "--json",
           str(target), "--no-progress"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if fast:
        cmd += ["--min-time", "0.01", "--peers", "torch"]
    print("dtypes:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(target.read_text())


COLD_START_SNIPPET = r"""
import time, json, sys
t0 = time.perf_counter()
import numpy as np
import normkit
t1 = time.perf_counter()
x = np.ones((4, 16, 8, 8), np.float32)
out = {"import_s": t1 - t0}
backend = sys.argv[1]
try:
    normkit.set_backend(backend)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"})); sys.exit(0)
t2 = time.perf_counter()
normkit.layer_norm(x, (8, 8))
t3 = time.perf_counter()
normkit.layer_norm(x, (8, 8))
t4 = time.perf_counter()
bn = normkit.BatchNorm(16)
bn.backward(bn(x))
t5 = time.perf_counter()
out.update(load_s=t2 - t1, first_call_s=t3 - t2, second_call_s=t4 - t3,
           first_bn_train_fb_s=t5 - t4)
print(json.dumps(out))
"""


def run_cold_start(fast, out_dir):
    """Import time and first-call latency per backend, in fresh processes.

    numba runs twice with an empty cache directory (compiles, then finds its cache)
    -- ``NUMBA_CACHE_DIR`` points at a temporary directory so the user's cache is
    neither used nor touched.
    """
    import subprocess
    import tempfile

    import normkit
    repeats = 1 if fast else 3
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        plan = [("numpy", "numpy"), ("numba (empty cache)", "numba"),
                ("numba (cached)", "numba"), ("cython", "cython")]
        if fast:                  # compiling the numba kernels alone takes many seconds
            plan = plan[:1]
        for label, backend in plan:
            if backend not in normkit.available_backends():
                continue
            rows = []
            for i in range(1 if "empty" in label else repeats):
                res = subprocess.run([sys.executable, "-c", COLD_START_SNIPPET, backend],
                                     env=env, capture_output=True, text=True, check=True)
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            runs[label] = {k: min(r[k] for r in rows) for k in rows[0]
                           if isinstance(rows[0][k], float)}
    result = {"description": "fresh-process import time and first-call latency "
                             "(min over repeats); see run_cold_start in "
                             "docs/tools/make_figures.py",
              "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "runs": runs}
    (out_dir / "coldstart.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ============================================================ plotting
COLORS = {"batch": "#1f77b4", "group": "#2ca02c", "layer": "#ff7f0e", "none": "#7f7f7f"}
LABELS = {"batch": "BatchNorm", "group": "GroupNorm (4 groups)",
          "layer": "LayerNorm (C, H, W)", "none": "no normalization"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "font.size": 10,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def plot_accuracy(result, path):
    plt = _plt()
    summary = summarize_digits(result)
    sizes = sorted({b for (_, b) in summary})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for norm in result["config"]["norms"]:
        xs = [b for b in sizes if (norm, b) in summary]
        acc = [summary[(norm, b)]["test_acc_eval"] for b in xs]
        mean = [100 * a["mean"] for a in acc]
        ax.fill_between(xs, [100 * a["min"] for a in acc], [100 * a["max"] for a in acc],
                        color=COLORS[norm], alpha=0.15, lw=0)
        ax.errorbar(xs, mean, yerr=[100 * a["std"] for a in acc], marker="o", ms=4,
                    capsize=3, color=COLORS[norm], label=LABELS[norm])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size (training)")
    ax.set_ylabel("test accuracy, eval mode (%)")
    cfg = result["config"]
    ax.set_title(f"Digits, tiny conv net, plain SGD, {cfg['epochs']} epochs, "
                 f"{len(cfg['seeds'])} seeds\n(line: mean, bar: std, band: min-max)",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gap(result, path):
    plt = _plt()
    summary = summarize_digits(result)
    sizes = sorted({b for (n, b) in summary if n == "batch"})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    gap = [summary[("batch", b)]["logit_gap"] for b in sizes]
    ax1.errorbar(sizes, [g["mean"] for g in gap], yerr=[g["std"] for g in gap], marker="o",
                 capsize=3, color=COLORS["batch"], label="BatchNorm")
    for norm in ("group", "layer"):
        if any((norm, b) in summary for b in sizes):
            ax1.plot(sizes, [summary[(norm, b)]["logit_gap"]["mean"] for b in sizes],
                     marker=".", color=COLORS[norm], label=LABELS[norm])
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(sizes, [str(b) for b in sizes])
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("||logits(train) - logits(eval)|| / ||logits(eval)||")
    ax1.set_title("relative distance of the outputs", fontsize=10)
    ax1.legend(fontsize=8)
    tr = [summary[("batch", b)]["test_acc_train_mode"] for b in sizes]
    ev = [summary[("batch", b)]["test_acc_eval"] for b in sizes]
    dis = [summary[("batch", b)]["eval_train_disagreement"] for b in sizes]
    ax2.errorbar(sizes, [100 * a["mean"] for a in ev], yerr=[100 * a["std"] for a in ev],
                 marker="o", capsize=3, label="eval mode (running statistics)")
    ax2.errorbar(sizes, [100 * a["mean"] for a in tr], yerr=[100 * a["std"] for a in tr],
                 marker="s", capsize=3, label="training mode (batch statistics)")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(sizes, [str(b) for b in sizes])
    ax2.set_xlabel("batch size (training, and test batches in training mode)")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("BatchNorm: test accuracy in each mode", fontsize=10)
    ax3 = ax2.twinx()
    ax3.plot(sizes, [100 * d["mean"] for d in dis], marker="^", ls="--", color="gray",
             label="predictions that differ (right axis)")
    ax3.set_ylabel("test images classified differently (%)", color="gray")
    ax3.set_ylim(0, max(1.0, 1.6 * max(100 * d["mean"] for d in dis)))
    ax3.grid(False)
    h2, l2 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax2.legend(h2 + h3, l2 + l3, fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_noise(result, path):
    plt = _plt()
    panels = result["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4.4), sharey=True)
    for ax, panel in zip(axes, panels.values()):
        rows = panel["rows"]
        b = [r["batch_size"] for r in rows]
        ax.plot(b, [r["naive"] for r in rows], ls=":", marker=".", color="gray",
                label=f"naive: sqrt(2/(n-1)), n = N x {panel['values_per_sample']}")
        ax.plot(b, [r["kish_median"] for r in rows], ls="--", marker=".", color="#ff7f0e",
                label=f"Kish: sqrt(2/(n_eff-1)), rho = {panel['rho_median']:.2f}")
        if result.get("normkit_estimate"):
            ax.plot(b, [r["normkit_median"] for r in rows], marker="s", ms=4,
                    color="#2ca02c", label="normkit batch_stats_report (median)")
        ax.plot(b, [r["measured_median"] for r in rows], marker="o", color="#1f77b4",
                label=f"measured, {result['draws_per_batch_size']} random batches")
        ax.fill_between(b, [r["measured_q25"] for r in rows],
                        [r["measured_q75"] for r in rows], color="#1f77b4", alpha=0.15,
                        lw=0, label="measured, channel quartiles")
        ax.axhline(result["threshold"], color="#d62728", lw=1.5,
                   label=f"warning threshold {result['threshold']:g}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(b, [str(v) for v in b])
        ax.set_xlabel("batch size N")
        ax.set_title(panel["title"], fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("relative standard error of the batch variance")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# implementations in the speed figure: label, marker, color
SPEED_IMPLS = [("cython", "o", "#1f77b4"), ("numba", "D", "#2ca02c"),
               ("numpy", "x", "#9467bd"), ("torch", "s", "#d62728"),
               ("onnxruntime", "^", "#ff7f0e"), ("copy", "|", "black")]


def plot_speed(bench, path):
    plt = _plt()
    records = bench["records"]
    fig, ax = plt.subplots(figsize=(8, 0.26 * len(records) + 1.6))
    ys = range(len(records))[::-1]
    for impl, marker, color in SPEED_IMPLS:
        pts = [(r["results"][impl]["gbps"], y) for r, y in zip(records, ys)
               if r["results"].get(impl, {}).get("status") == "ok"
               and isinstance(r["results"][impl].get("gbps"), (int, float))]
        if pts:
            label = "copy (memory floor)" if impl == "copy" else impl
            ax.scatter(*zip(*pts), marker=marker, color=color, s=28 if impl != "copy" else 90,
                       label=label, zorder=3)
    ax.set_yticks(list(ys), [r["case"] for r in records], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("GB/s (bytes that must move / median time; higher is faster)")
    meta = bench["meta"]
    threads = meta.get("threads")
    fig.suptitle(f"normkit bench ({meta.get('tier')}), {threads} "
                 f"thread{'' if threads == 1 else 's'}, {meta.get('cpu')} "
                 f"({meta.get('cpus')} CPUs), load avg {meta.get('load_avg_1min')}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=6,
              frameon=False, handletextpad=0.2, columnspacing=1.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ============================================================ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true",
                   help="reduced variant (1 seed, 1 epoch, 2 batch sizes, tiny benchmark): "
                        "seconds, proves the script works; numbers are not meaningful")
    p.add_argument("--out", type=Path,
                   help="directory for data and figures (default: docs/_data and "
                        "docs/figures; required with --fast so the committed data stay)")
    p.add_argument("--only", default="digits,noise,speed,dtypes",
                   help="comma-separated parts to (re)run: digits, noise, speed, dtypes")
    p.add_argument("--plot-only", action="store_true",
                   help="do not run anything; re-plot from the existing data")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for the digits runs")
    p.add_argument("--threads", type=int,
                   help="threads for the benchmark (default: the suite's, all CPUs); the "
                        "committed run used 1 on a shared 2-core machine")
    args = p.parse_args(argv)
    if args.fast and args.out is None:
        p.error("--fast needs --out DIR (it must not overwrite the committed data)")
    data_dir = args.out or DATA_DIR
    fig_dir = args.out or FIG_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = set(_split(args.only))
    unknown = parts - {"digits", "noise", "speed", "dtypes"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}")

    t0 = time.perf_counter()
    if "digits" in parts:
        if args.plot_only:
            digits = json.loads((data_dir / "digits.json").read_text())
        else:
            digits = run_digits(FAST if args.fast else FULL, data_dir, args.jobs)
        plot_accuracy(digits, fig_dir / "accuracy_vs_batch.png")
        plot_gap(digits, fig_dir / "train_eval_gap.png")
    if "noise" in parts:
        noise = (json.loads((data_dir / "noise.json").read_text()) if args.plot_only
                 else run_noise(args.fast, data_dir))
        plot_noise(noise, fig_dir / "stat_noise.png")
    if "speed" in parts:
        bench = (json.loads((data_dir / "bench.json").read_text()) if args.plot_only
                 else run_speed(args.fast, data_dir, args.threads))
        plot_speed(bench, fig_dir / "speed.png")
        if not args.plot_only:
            run_cold_start(args.fast, data_dir)
    if "dtypes" in parts and not args.plot_only:
        run_dtypes(args.fast, data_dir, args.threads)
    print(f"done in {time.perf_counter() - t0:.1f} s: data in {data_dir}, figures in "
          f"{fig_dir}", flush=True)
    return 0


def _split(s):
    return [x.strip() for x in s.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
