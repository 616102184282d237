"""What ``python -m normkit bench`` prints: progress on stderr, the table, legend and summary.

Split from :mod:`normkit._bench` (which measures); this module only formats records.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shutil
import sys
import time

import numpy as np

_DISTURBED = 0.25     # CPUs used by other processes above which a row is "disturbed"
#: column label of the plain-NumPy peer; distinct from normkit's own ``numpy`` backend
PLAIN_NUMPY = "plain-numpy"

# ====================================================================== progress
class Progress:
    """A one-line progress bar on stderr, or plain lines when stderr is not a terminal."""

    def __init__(self, total, stream=None, enabled=True):
        self.total, self.stream = total, stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done = 0
        self.case = ""

    @staticmethod
    def _clock(seconds):
        s = int(seconds)
        return f"{s // 60}:{s % 60:02d}"

    def _elapsed(self):
        el = time.perf_counter() - self.t0
        text = self._clock(el)
        if 0 < self.done < self.total:
            text += f" eta {self._clock(el / self.done * (self.total - self.done))}"
        return text

    def step(self, case, what=""):
        self.case = case
        if self.tty:
            width = shutil.get_terminal_size((80, 20)).columns
            bar_w = 20
            filled = int(bar_w * self.done / max(1, self.total))
            bar = "#" * filled + "-" * (bar_w - filled)
            line = f"[{bar}] {self.done}/{self.total} {self._elapsed()} {case} {what}"
            self.stream.write("\r" + line[:width - 1].ljust(width - 1))
            self.stream.flush()

    def finish_case(self, case, seconds, flag=""):
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            self.step(case, "done")
        else:
            self.stream.write(f"[{self.done}/{self.total}] {case} ({seconds:.1f} s){flag}\n")
            self.stream.flush()

    def close(self):
        if self.tty:
            width = shutil.get_terminal_size((80, 20)).columns
            self.stream.write("\r" + " " * (width - 1) + "\r")
            self.stream.flush()

    def message(self, text):
        if self.tty:
            self.close()
        self.stream.write(text + "\n")
        self.stream.flush()


def _disturbed(rec):
    v = rec.get("others_cpu")
    return v is not None and v >= _DISTURBED


def best_backend(rec, impls):
    """(id, median) of the fastest normkit backend in this record, or (None, None)."""
    best = (None, None)
    for impl in impls:
        if impl.kind != "backend":
            continue
        r = rec["results"].get(impl.id, {})
        if r.get("status") == "ok" and "median_s" in r \
                and (best[1] is None or r["median_s"] < best[1]):
            best = (impl.id, r["median_s"])
    return best


# ====================================================================== reporting
def fmt_time(s):
    if s is None or not math.isfinite(s):
        return "-"
    unit, scale = next(((u, k) for u, k in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
                        if s >= k), ("ns", 1e-9))
    v = s / scale
    return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"


def fmt_gbps(g):
    if g is None or not math.isfinite(g):
        return "-"
    return f"{g:.2f}" if g < 10 else f"{g:.1f}"


def _cell(r):
    """Text of a time cell (n/a, error, with a ! when the result did not match)."""
    st = r.get("status")
    if st == "n/a":
        return "n/a"
    if st == "error":
        return "error"
    if st == "unsupported":
        return "unsupported"
    if "median_s" not in r:
        return "-"
    bad = "!" if r.get("correct") is False else ""
    return fmt_time(r["median_s"]) + bad


def table_rows(records, impls):
    header = ["case", "MB", "others"]
    for impl in impls:
        if impl.kind == "peer":
            header += [impl.label, "ratio"]
        else:
            header += [impl.label, "GB/s"]
    rows = []
    for rec in records:
        _, best = best_backend(rec, impls)
        oc = rec.get("others_cpu")
        row = [rec["case"], f"{rec['bytes'] / 1e6:.3g}",
               "-" if oc is None else f"{oc:.2f}" + ("~" if _disturbed(rec) else "")]
        for impl in impls:
            r = rec["results"].get(impl.id, {})
            row.append(_cell(r))
            if impl.kind == "peer":
                if best and r.get("status") == "ok" and "median_s" in r:
                    row.append(f"{r['median_s'] / best:.2f}")
                else:
                    row.append("")
            else:
                row.append(fmt_gbps(r.get("gbps")) if r.get("status") == "ok" else "")
        rows.append(row)
    return header, rows


def format_text(header, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                     enumerate(zip(header, widths, strict=True)))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


def format_markdown(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for r in rows:
        out.append("| " + " | ".join([f"`{r[0]}`"] + [c or " " for c in r[1:]]) + " |")
    return "\n".join(out)


def _abbrev(names, k=4):
    return ", ".join(names[:k]) + (f", ... ({len(names)} cases)" if len(names) > k else "")


def summary_lines(records, impls):
    """Where normkit is ahead / behind each peer, n/a reasons, errors, mismatches."""
    lines = []
    disturbed = [r["case"] for r in records if _disturbed(r)]
    n_disturbed = len(disturbed)
    if disturbed:
        lines.append(f"disturbed by other processes (others >= {_DISTURBED} CPU) in "
                     f"{_abbrev(disturbed)}: rerun when the machine is quiet, or raise --retry")
    for impl in impls:
        if impl.kind != "peer":
            continue
        ratios = []
        for rec in records:
            if _disturbed(rec):
                continue
            _, best = best_backend(rec, impls)
            r = rec["results"].get(impl.id, {})
            if best and r.get("status") == "ok" and "median_s" in r:
                ratios.append((r["median_s"] / best, rec["case"]))
        if not ratios:
            continue
        ahead = sorted((x for x in ratios if x[0] > 1.0), reverse=True)
        behind = sorted(x for x in ratios if x[0] <= 1.0)
        geo = math.exp(sum(math.log(x) for x, _ in ratios) / len(ratios))
        line = (f"vs {impl.label}: normkit faster in {len(ahead)} of {len(ratios)} cases, "
                f"geometric-mean ratio {geo:.2f}")
        if n_disturbed:
            line += f" ({n_disturbed} disturbed rows left out)"
        if ahead:
            line += "; largest leads: " + ", ".join(f"{n} {x:.2f}" for x, n in ahead[:3])
        if behind:
            line += "; behind in: " + ", ".join(f"{n} {x:.2f}" for x, n in behind[:6])
            if len(behind) > 6:
                line += f" (+{len(behind) - 6} more)"
        lines.append(line)
    # n/a, errors and mismatches, grouped by reason
    groups = {}
    for rec in records:
        for impl in impls:
            r = rec["results"].get(impl.id, {})
            if r.get("status") in ("n/a", "error", "unsupported"):
                groups.setdefault((impl.label, r["status"], r.get("note", "")), []).append(
                    rec["case"])
            elif r.get("correct") is False:
                why = f"max relative error {r['max_rel_error']:.2g} > tolerance"
                groups.setdefault((impl.label, "MISMATCH", why), []).append(rec["case"])
    for (label, st, note), names in groups.items():
        lines.append(f"{label} {st} in {_abbrev(names)}: {note}")
    return lines


def machine_info(impls, threads):
    import normkit
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load = None
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg_1min": load,
        "normkit": normkit.__version__, "python": platform.python_version(),
        "numpy": np.__version__, "platform": platform.platform(), "cpu": cpu,
        "cpus": os.cpu_count(), "threads": threads,
        "backends": [i.id for i in impls if i.kind == "backend"],
        "peers": {i.label: i.version for i in impls if i.kind == "peer"},
    }


def legend(meta, header=()):
    """The lines explaining the table: only the columns ``header`` shows."""
    shown = set(header)
    cols = [("time: median per call; GB/s: bytes that must move / median (2x|x| for "
             "inference, 3x BN train fwd, 8x BN train fwd+bwd, 5x other fwd+bwd)")]
    backends = [b for b in meta.get("backends", []) if b in shown]
    if backends:
        cols.append(f"{', '.join(backends)}: normkit's backends (numpy: its float64 "
                    "reference; run on float64 copies of the inputs it gives the float64 "
                    "truth every column is checked against)")
    if "copy" in shown:
        cols.append("copy: np.copyto of the same bytes, one thread (the memory-bound "
                    "reference)")
    if PLAIN_NUMPY in shown:
        cols.append(f"{PLAIN_NUMPY}: a vectorized NumPy version written outside normkit "
                    "(not normkit's numpy backend)")
    if "ratio" in shown:
        cols.append("ratio: peer median / fastest normkit backend (> 1: normkit faster)")
    cols.append("'!': result differs from the float64 truth beyond the case tolerance")
    if "others" in shown or not shown:
        cols.append(f"others: CPUs used by other processes while the row was measured "
                    f"('~': >= {_DISTURBED}, the multi-threaded columns of that row are "
                    "unreliable)")
    malloc = (f"allocator: {meta['malloc']} (freed outputs are reused, not page-faulted "
              "in again)" if meta.get("malloc") else "allocator: default settings")
    return [cols[0] + ";", "; ".join(cols[1:]) + ".", malloc + "."]


def header_line(meta):
    peers = ", ".join(f"{k} {v}" for k, v in meta["peers"].items()) or "none"
    load = meta.get("load_avg_1min")
    return (f"normkit {meta['normkit']} bench, {meta['date']}: {meta['threads']} threads; "
            f"backends: {', '.join(meta['backends'])}; peers: {peers}; "
            f"{meta['cpu']} ({meta['cpus']} CPUs), Python {meta['python']}, "
            f"NumPy {meta['numpy']}" + (f"; load average at start {load}" if load is not None
                                        else ""))


# ====================================================================== 16-bit table
HALF_HEADER = ["16-bit case", "backend", "time", "GB/s", "copy GB/s", "torch ratio",
               "ORT ratio", "x f32", "err", "torch err", "ORT err"]


def _ratio(rec, impl_id, best):
    r = rec["results"].get(impl_id, {})
    if best and r.get("status") == "ok" and "median_s" in r:
        return f"{r['median_s'] / best:.2f}"
    return {"n/a": "n/a", "error": "error"}.get(r.get("status"), "")


def _err(r):
    e = r.get("max_rel_error")
    if r.get("status") != "ok" or e is None:
        return ""
    return "inf" if not math.isfinite(e) else f"{e:.1e}" + ("!" if not r.get("correct") else "")


def half_rows(records, impls):
    """The 16-bit rows: the fastest normkit backend against torch and ORT in the same
    dtype, GB/s against the copy floor, its time over the same backend's on the float32
    twin (same values, same rounds), and the errors against the float64 truth."""
    rows = []
    for rec in records:
        if rec.get("dtype") not in ("float16", "bfloat16"):
            continue
        res = rec["results"]
        name, best = best_backend(rec, impls)
        if name is None:          # no backend ran it: say why, still show the peers' errors
            why = next((r["status"] for i in impls if i.kind == "backend"
                        for r in [res.get(i.id, {})] if r.get("status")), "-")
            rows.append([rec["case"], why, "", "", fmt_gbps(res.get("copy", {}).get("gbps")),
                         "", "", "", "", _err(res.get("torch", {})),
                         _err(res.get("onnxruntime", {}))])
            continue
        mine, twin = res[name], res.get(f"{name}@float32", {})
        x32 = (f"{best / twin['median_s']:.2f}" if twin.get("status") == "ok"
               and twin.get("median_s") else "")
        rows.append([rec["case"], name, fmt_time(best), fmt_gbps(mine.get("gbps")),
                     fmt_gbps(res.get("copy", {}).get("gbps")),
                     _ratio(rec, "torch", best), _ratio(rec, "onnxruntime", best), x32,
                     _err(mine), _err(res.get("torch", {})),
                     _err(res.get("onnxruntime", {}))])
    return rows


HALF_LEGEND = (
    "16-bit rows: backend = the fastest normkit backend; torch/ORT ratio: their median / "
    "normkit's in the same dtype (> 1: normkit faster); copy GB/s: np.copyto of the same "
    "bytes; x f32: normkit's 16-bit time / the same backend's time on the float32 twin "
    "(same values, same rounds; target <= 0.6 for large memory-bound cases); err: max "
    "|y - truth| / max(1, max |truth|) against the float64 truth on the same 16-bit "
    "inputs ('!': above the case tolerance).")
