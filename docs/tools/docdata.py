"""Numbers and tables for the documentation prose, computed from ``docs/_data/*.json``.

``conf.py`` turns the dict returned by :func:`substitutions` into MyST substitutions,
so a page writes ``{{ acc_batch_2 }}`` or ``{{ digits_acc_table }}`` and the value comes
from the committed result files that the figures are drawn from: prose, tables and
figures cannot disagree. Regenerate the data with ``python docs/tools/make_figures.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

NORM_NAMES = {"batch": "BatchNorm", "group": "GroupNorm", "layer": "LayerNorm",
              "none": "none"}


def _load(data_dir: Path, name: str) -> dict:
    path = data_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: it is committed with the docs; regenerate it with "
            "`python docs/tools/make_figures.py` (see docs/tools/make_figures.py --help)")
    return json.loads(path.read_text())


def _table(header, rows, align=None):
    align = align or ["---"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x, digits=1):
    return f"{100 * x:.{digits}f}"


# ---------------------------------------------------------------- digits
def digits_subs(d: dict) -> dict:
    from statistics import mean, stdev
    groups: dict = {}
    for r in d["runs"]:
        groups.setdefault((r["norm"], r["batch_size"]), []).append(r)
    norms = [n for n in d["config"]["norms"] if any(k[0] == n for k in groups)]
    sizes = sorted({b for (_, b) in groups})

    def stat(norm, b, key):
        v = [r[key] for r in groups.get((norm, b), [])]
        if not v:
            return math.nan, math.nan
        return mean(v), (stdev(v) if len(v) > 1 else 0.0)

    s = {
        "digits_epochs": str(d["config"]["epochs"]),
        "digits_seeds": str(len(d["config"]["seeds"])),
        "digits_base_lr": f"{d['config']['base_lr']:g}",
        "digits_backend": f"`{d.get('backend', '?')}`",
        "digits_batch_sizes": ", ".join(map(str, sizes)),
        "digits_runs": str(len(d["runs"])),
        "digits_minutes": f"{sum(r.get('seconds', 0) for r in d['runs']) / 60:.0f}",
    }
    rows = []
    for b in sizes:
        row = [str(b)]
        for n in norms:
            m, sd = stat(n, b, "test_acc_eval")
            row.append(f"{_pct(m)} ± {_pct(sd)}")
            s[f"acc_{n}_{b}"] = _pct(m)
            s[f"accsd_{n}_{b}"] = _pct(sd)
            s[f"err_{n}_{b}"] = _pct(1 - m)
            lo = min(r["test_acc_eval"] for r in groups[(n, b)])
            s[f"accmin_{n}_{b}"] = _pct(lo)
        rows.append(row)
    for n in norms:
        s[f"accsdmax_{n}"] = _pct(max(stat(n, b, "test_acc_eval")[1] for b in sizes))
    s["digits_acc_table"] = _table(["batch size"] + [NORM_NAMES[n] for n in norms], rows)
    gap_rows = []
    for b in sizes:
        if ("batch", b) not in groups:
            continue
        ev, ev_sd = stat("batch", b, "test_acc_eval")
        tr, tr_sd = stat("batch", b, "test_acc_train_mode")
        dis, _ = stat("batch", b, "eval_train_disagreement")
        gap, gap_sd = stat("batch", b, "logit_gap")
        warns = [r.get("unstable_batch_warnings", 0) for r in groups[("batch", b)]]
        s[f"gap_{b}"] = f"{gap:.2f}"
        s[f"disagree_{b}"] = _pct(dis)
        s[f"acctrain_{b}"] = _pct(tr)
        s[f"warn_{b}"] = f"{mean(warns):.1f}"
        gap_rows.append([str(b), f"{_pct(ev)} ± {_pct(ev_sd)}", f"{_pct(tr)} ± {_pct(tr_sd)}",
                         _pct(dis), f"{gap:.3f} ± {gap_sd:.3f}", f"{mean(warns):.1f}"])
    s["digits_gap_table"] = _table(
        ["batch size", "eval-mode accuracy %", "training-mode accuracy %",
         "predictions that differ %", "relative logit distance", "warnings per run"],
        gap_rows)
    return s


# ---------------------------------------------------------------- noise
def noise_subs(d: dict) -> dict:
    s = {"noise_threshold": f"{d['threshold']:g}",
         "noise_draws": str(d["draws_per_batch_size"])}
    for key, panel in d["panels"].items():
        s[f"noise_{key}_rho"] = f"{panel['rho_median']:.2f}"
        s[f"noise_{key}_m"] = str(panel["values_per_sample"])
        rows = []
        for r in panel["rows"]:
            b = r["batch_size"]
            for col in ("naive", "kish_median", "measured_median", "normkit_median"):
                if col in r:
                    s[f"noise_{key}_{col.split('_')[0]}_{b}"] = f"{r[col]:.3f}"
            s[f"noise_{key}_neff_{b}"] = f"{r['n_eff_median']:.0f}"
            s[f"noise_{key}_ratio_{b}"] = f"{r['measured_median'] / r['naive']:.0f}"
            rows.append([str(b), str(r["n"]), f"{r['n_eff_median']:.0f}", f"{r['naive']:.3f}",
                         f"{r['kish_median']:.3f}",
                         f"{r['normkit_median']:.3f}" if "normkit_median" in r else "n/a",
                         f"{r['measured_median']:.3f}"])
        s[f"noise_{key}_table"] = _table(
            ["batch size N", "n = N·m", "n_eff (median)", "naive", "Kish",
             "normkit estimate", "measured"], rows)
    return s


# ---------------------------------------------------------------- speed
SPEED_COLUMNS = ["cython", "numba", "numpy", "torch", "onnxruntime", "copy"]


def _fmt_time(sec):
    if not isinstance(sec, (int, float)) or not math.isfinite(sec):
        return "n/a"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if sec >= scale:
            return f"{sec / scale:.3g} {unit}"
    return f"{sec:.2g} s"


def _clean_command(cmd: str) -> str:
    """The bench command as a reader would type it (without the output path)."""
    words, out, skip = cmd.split(), [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w == "--json":
            skip = True
            continue
        if w != "--no-progress":
            out.append(w)
    return " ".join(out)


def _best_backend_time(res, backends):
    return min((res[b]["median_s"] for b in backends
                if res.get(b, {}).get("status") == "ok"), default=math.nan)


def _speed_rows(records, present, backends):
    """The rows of the speed table and each peer's time / fastest normkit time."""
    rows, ratios = [], {"torch": [], "onnxruntime": []}
    for r in records:
        res = r["results"]
        row = [f"`{r['case']}`", f"{r['bytes'] / 1e6:.3g}"]
        best = _best_backend_time(res, backends)
        for c in present:
            cell = res.get(c, {})
            if cell.get("status") != "ok":
                row.append("n/a")
                continue
            text = _fmt_time(cell["median_s"])
            if c in backends and cell["median_s"] == best:
                text = f"**{text}**"
            if cell.get("correct") is False:
                text += " (!)"
            row.append(text)
            if c in ratios and math.isfinite(best):
                ratios[c].append(cell["median_s"] / best)
        rows.append(row)
    return rows, ratios


def _behind(records, backends):
    """Cases where the fastest normkit backend was > 1.25x slower than the fastest peer."""
    behind = []
    for r in records:
        res = r["results"]
        best = _best_backend_time(res, backends)
        peers = [(res[p]["median_s"], p) for p in ("torch", "onnxruntime")
                 if res.get(p, {}).get("status") == "ok"]
        if peers and math.isfinite(best):
            t, p = min(peers)
            if best > 1.25 * t:
                behind.append((best / t, f"`{r['case']}` ({best / t:.1f}x slower than {p})"))
    return behind


def speed_subs(d: dict) -> dict:
    meta = d["meta"]
    records = d["records"]
    present = [c for c in SPEED_COLUMNS
               if any(r["results"].get(c, {}).get("status") == "ok" for r in records)]
    backends = [c for c in present if c in meta.get("backends", [])]
    rows, ratios = _speed_rows(records, present, backends)
    s = {
        "bench_table": _table(["case", "MB"] + present, rows,
                              ["---"] + ["--:"] * (len(present) + 1)),
        "bench_date": meta.get("date", "?")[:10],
        "bench_threads": str(meta.get("threads")),
        "bench_threads_text": f"{meta.get('threads')} thread"
                              + ("" if meta.get("threads") == 1 else "s"),
        "bench_threads_note": (
            "It ran single-threaded (`--threads 1`, for normkit, PyTorch and ONNX Runtime "
            "alike): the machine was shared with other work, and a multi-threaded call "
            "waits for its slowest, possibly descheduled, thread, which made two-thread "
            "timings there mostly a measure of the other load. What more threads add on an "
            "idle machine is not measured here: run `python -m normkit bench` on yours."
            if meta.get("threads") == 1 else ""),
        "bench_cpu": f"{meta.get('cpu')} ({meta.get('cpus')} CPUs)",
        "bench_load": str(meta.get("load_avg_1min")),
        "bench_command": f"`{_clean_command(meta.get('command', 'python -m normkit bench'))}`",
        "bench_backends": ", ".join(meta.get("backends", [])),
        "bench_cases": str(len(records)),
        "bench_versions": ", ".join(f"{k} {v}" for k, v in meta.get("peers", {}).items()),
    }
    behind = _behind(records, backends)
    behind.sort(reverse=True)
    s["bench_behind"] = ("; ".join(text for _, text in behind) if behind
                         else "none (no case more than 1.25x slower than the fastest peer)")
    for peer, rs in ratios.items():
        if rs:
            geo = math.exp(sum(math.log(x) for x in rs) / len(rs))
            s[f"bench_{peer}_geomean"] = f"{geo:.2f}"
            s[f"bench_{peer}_faster"] = f"{sum(x > 1 for x in rs)} of {len(rs)}"
    return s


FUSED_CASE = "bn_eval_add_relu_nchw_32x64x56x56"
HALF_COMMAND = "python -m normkit bench --cases 16bit --threads 1 --json docs/_data/bench16.json"


def fused_subs(d: dict) -> dict:
    """One sentence on the fused BN + residual + ReLU case of the committed run."""
    rec = next((r for r in d["records"] if r["case"] == FUSED_CASE), None)
    if rec is None:
        return {"fused_sentence": (
            f"The committed benchmark run predates the `{FUSED_CASE}` case, so no "
            "numbers are quoted here yet.")}
    res = rec["results"]
    backends = [b for b in d["meta"].get("backends", []) if res.get(b, {}).get("status") == "ok"]
    best = min(backends, key=lambda b: res[b]["median_s"])
    parts = [f"the fused call took {_fmt_time(res[best]['median_s'])} ({best} backend)"]
    for peer, what in (("torch", "torch's in-place `bn(x).add_(r).relu_()`"),
                       ("onnxruntime", "ONNX Runtime's BatchNormalization, Add, Relu graph")):
        if res.get(peer, {}).get("status") == "ok":
            parts.append(f"{_fmt_time(res[peer]['median_s'])} for {what}")
    meta = d["meta"]
    return {"fused_sentence": (
        f"Measured on BN eval NCHW (32, 64, 56, 56), float32, in the committed benchmark "
        f"run (`{_clean_command(meta.get('command', ''))}`, {meta.get('date', '?')[:10]}, "
        f"{meta.get('cpu')}, {meta.get('threads')} thread(s)): " + "; ".join(parts)
        + f". `python -m normkit bench --cases {FUSED_CASE}` measures it on your machine.")}


def half_subs(d: dict | None) -> dict:
    """The measured 16-bit table of docs/dtypes.md, from docs/_data/bench16.json."""
    if d is None:
        return {"dtypes_run": (
            "No 16-bit run is committed with these docs yet. Regenerate the table with "
            f"`{HALF_COMMAND}` (or `python docs/tools/make_figures.py --only dtypes`), then "
            "rebuild the docs."), "dtypes_table": ""}
    from types import SimpleNamespace

    from normkit._bench_report import HALF_HEADER, half_rows
    meta = d["meta"]
    impls = [SimpleNamespace(id=b, kind="backend", label=b) for b in meta["backends"]]
    rows = half_rows(d["records"], impls)
    rows = [[f"`{r[0]}`"] + [c or " " for c in r[1:]] for r in rows]
    peers = ", ".join(f"{k} {v}" for k, v in meta.get("peers", {}).items())
    load, cpus = meta.get("load_avg_1min"), meta.get("cpus") or 1
    busy = (" The machine was shared with other work (the load average exceeded its CPU "
            "count), so the absolute times are inflated and noisy; the ratios within a "
            "row, measured in the same interleaved rounds, are what to read, and a quiet "
            "machine will give different numbers." if load is not None and load > cpus
            else "")
    return {
        "dtypes_run": (
            f"Measured with `{_clean_command(meta.get('command', ''))}` on "
            f"{meta.get('date', '?')[:10]}: {meta.get('cpu')} ({meta.get('cpus')} CPUs), "
            f"{meta.get('threads')} thread(s), backends {', '.join(meta['backends'])}, "
            f"peers {peers}; 1-minute load average {meta.get('load_avg_1min')} at the "
            f"start.{busy} Regenerate with `{HALF_COMMAND}`."),
        "dtypes_table": _table(HALF_HEADER, rows, ["---", "---"] + ["--:"] * 9),
    }


def coldstart_subs(d: dict) -> dict:
    rows = []
    s = {"cold_load": f"{d.get('load_avg_1min') or float('nan'):.1f}"}
    for label, r in d["runs"].items():
        key = label.split()[0] + ("_cold" if "empty" in label else "")
        for field in ("import_s", "load_s", "first_call_s", "second_call_s",
                      "first_bn_train_fb_s"):
            if field in r:
                s[f"cold_{key}_{field[:-2]}"] = _fmt_time(r[field])
        rows.append([label, _fmt_time(r["import_s"]), _fmt_time(r["load_s"]),
                     _fmt_time(r["first_call_s"]), _fmt_time(r["second_call_s"]),
                     _fmt_time(r["first_bn_train_fb_s"])])
    s["cold_table"] = _table(["backend", "`import normkit`", "load backend",
                              "first `layer_norm`", "second `layer_norm`",
                              "first BatchNorm fwd+bwd"], rows)
    return s


def substitutions(data_dir: Path) -> dict:
    data_dir = Path(data_dir)
    subs = {}
    subs.update(digits_subs(_load(data_dir, "digits.json")))
    subs.update(noise_subs(_load(data_dir, "noise.json")))
    bench = _load(data_dir, "bench.json")
    subs.update(speed_subs(bench))
    subs.update(fused_subs(bench))
    half = data_dir / "bench16.json"
    subs.update(half_subs(json.loads(half.read_text()) if half.is_file() else None))
    subs.update(coldstart_subs(_load(data_dir, "coldstart.json")))
    return subs
