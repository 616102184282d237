"""The main job ``python -m normkit bench`` and the case table it shares with this suite."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import normkit
from normkit import _bench
from normkit import _bench_cases as C
from normkit import _bench_data as D

TINY = "tiny_ln_1x1x768"


def _run(capsys, *argv):
    rc = _bench.main(["--no-progress", "--min-time", "0.01", "--default-malloc", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- the table
def test_case_table_is_consistent():
    names = [c.name for c in C.CASES]
    assert len(names) == len(set(names))
    for c in C.CASES:
        assert c.tier in C.TAGS and c.category in C.CATEGORIES
        assert len(c.smoke_units) == len(c.units)
        for big, small in zip(c.units, c.smoke_units):
            assert len(big) == len(small) and np.prod(small) <= np.prod(big)
        assert c.tol() > 0
    quick, default, full = (set(map(id, C.select_cases(t))) for t in C.TAGS)
    assert quick < default < full and len(full) == len(C.CASES)
    # what the issue asks for is there
    cats = {c.category for c in C.CASES}
    assert cats == set(C.CATEGORIES)
    assert {"bn_eval", "bn_train_fwd", "bn_train_fb", "ln", "rms", "gn", "in",
            "ln_train_fb"} <= {c.op.key for c in C.CASES}
    assert {c.units[0][0] for c in C.CASES if c.op.key == "bn_eval"
            and c.category == "batchnorm"} >= {1, 8, 32}


def test_real_model_shapes():
    layers = C.RESNET50_BN_LAYERS
    assert len(layers) == 53
    assert layers[0] == (64, 112) and layers[-1] == (2048, 7)
    # channel counts of torchvision's resnet50 BatchNorm layers, summed
    assert sum(c for c, _ in layers) == 26560
    resnet = C.CASE_BY_NAME["resnet50_bn_eval_b8"]
    assert len(resnet.units) == 53 and all(u[0] == 8 for u in resnet.units)
    bert = C.CASE_BY_NAME["bert_base_ln_b8x128"]
    assert bert.units == [(8, 128, 768)] * 25


def test_bytes_model():
    case = C.CASE_BY_NAME["bn_eval_nchw_1x64x56x56"]
    units = D.make_data(case, smoke=True)
    assert D.case_bytes(case, units) == 2 * units[0]["x"].nbytes
    case = C.CASE_BY_NAME["bn_train_fb_nchw_8x64x56x56"]
    units = D.make_data(case, smoke=True)
    assert D.case_bytes(case, units) == 8 * units[0]["x"].nbytes


def test_select_cases_patterns():
    assert [c.name for c in C.select_cases(patterns=[TINY])] == [TINY]
    assert {c.category for c in C.select_cases(patterns=["tiny"])} == {"tiny"}
    assert all(c.op.key == "rms" for c in C.select_cases(patterns=["rms"]))
    assert C.select_cases(patterns=["no_such_case*"]) == []


# ---------------------------------------------------------------- imports stay lazy
def test_import_normkit_does_not_import_peers_or_bench():
    code = ("import sys, normkit; bad = [m for m in ('torch', 'onnxruntime', 'onnx', "
            "'normkit._bench', 'normkit._bench_cases') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the CLI
def test_bench_table_and_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    rc, out, err = _run(capsys, "--cases", TINY, "--peers", "plain-numpy", "--json",
                        str(path))
    assert rc == 0
    assert TINY in out and "copy" in out and "plain-numpy" in out
    for b in normkit.available_backends():
        assert b in out.splitlines()[2]          # a column per available backend
    data = json.loads(path.read_text())
    (rec,) = data["records"]
    assert rec["case"] == TINY and rec["bytes"] == 2 * 768 * 4
    for b in normkit.available_backends():
        r = rec["results"][b]
        assert r["status"] == "ok" and r["correct"] and r["median_s"] > 0
    assert rec["results"]["copy"]["status"] == "ok"
    assert rec["results"]["plain-numpy"]["correct"]
    assert data["meta"]["threads"] == normkit.get_num_threads()


def test_plain_numpy_peer_and_numpy_backend_have_distinct_names(capsys, tmp_path):
    """normkit's ``numpy`` backend and the plain-NumPy peer never share a name."""
    assert "numpy" not in _bench.PEERS and "plain-numpy" in _bench.PEERS
    path = tmp_path / "bench.json"
    rc, out, _ = _run(capsys, "--cases", TINY, "--backends", "numpy", "--peers",
                      "plain-numpy", "--json", str(path))
    assert rc == 0
    header = out.splitlines()[2].split()
    assert "numpy" in header and "plain-numpy" in header
    assert "plain-numpy: a vectorized NumPy version written outside normkit" in out
    results = json.loads(path.read_text())["records"][0]["results"]
    assert {"numpy", "plain-numpy"} <= set(results)
    # the earlier spelling of the peer still works, and means the peer
    rc, out, _ = _run(capsys, "--cases", TINY, "--backends", "numpy", "--peers", "numpy")
    assert rc == 0 and "plain-numpy" in out.splitlines()[2].split()
    help_text = _bench_help()
    assert "plain-numpy" in help_text and "numpy (a plain" not in help_text


def _bench_help():
    import argparse
    p = argparse.ArgumentParser(prog="normkit bench", description=_bench.DESCRIPTION)
    _bench.add_arguments(p)
    # argparse wraps lines, also after a hyphen: undo that to search the text
    return " ".join(re.sub(r"-\n\s*", "-", p.format_help()).split())


def test_legend_explains_only_the_columns_shown(capsys):
    rc, out, _ = _run(capsys, "--cases", TINY, "--peers", "none")
    assert rc == 0
    table, legend = out.split("\n\n")[1:3]
    assert "ratio" not in table and "ratio:" not in legend
    assert "plain-numpy" not in legend
    assert "copy:" in legend and "others:" in legend
    rc, out, _ = _run(capsys, "--cases", TINY, "--peers", "plain-numpy")
    table, legend = out.split("\n\n")[1:3]
    assert "ratio" in table.splitlines()[0] and "ratio: peer median" in legend


def test_help_has_no_raw_markup():
    """``normkit --help`` / ``normkit bench --help`` print plain text, not reST."""
    for argv in (["--help"], ["bench", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "normkit", *argv], capture_output=True,
                              text=True, check=True)
        assert "``" not in proc.stdout and ":mod:" not in proc.stdout, proc.stdout
        assert "usage: normkit" in proc.stdout


def test_bench_markdown(capsys):
    rc, out, _ = _run(capsys, "--cases", TINY, "--peers", "none", "--markdown")
    assert rc == 0
    assert "| case | MB |" in out and f"| `{TINY}` |" in out


def test_quick_and_full_select_tiers(capsys):
    rc, out, _ = _run(capsys, "--quick", "--list")
    assert rc == 0
    assert len(out.strip().splitlines()) == len(C.select_cases("quick"))
    rc, out, _ = _run(capsys, "--full", "--list")
    assert len(out.strip().splitlines()) == len(C.CASES)


def test_missing_peer_is_a_note(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "onnxruntime")
                        else real(name, *a))
    rc, out, err = _run(capsys, "--cases", TINY)
    assert rc == 0
    assert "PyTorch is not installed" in out and "onnxruntime" in out
    assert "torch" not in out.splitlines()[2]           # no torch column


def test_ctrl_c_prints_partial_table(capsys, monkeypatch):
    real = _bench.measure_case
    calls = []

    def interrupted_on_second(case, *a, **k):
        calls.append(case.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(case, *a, **k)

    monkeypatch.setattr(_bench, "measure_case", interrupted_on_second)
    rc, out, _ = _run(capsys, "--cases", "tiny_*", "--peers", "none")
    assert rc == 130
    assert calls[0] in out and calls[1] not in out.split("interrupted")[0]
    assert "interrupted: 1 of" in out


def test_bad_options(capsys):
    rc, _, err = _run(capsys, "--cases", "no_such_case")
    assert rc == 2 and "no case matches" in err
    rc, _, err = _run(capsys, "--cases", TINY, "--peers", "tensorflow")
    assert rc == 2 and "unknown peer" in err
    with pytest.raises(SystemExit, match="unknown backend"):
        _run(capsys, "--cases", TINY, "--backends", "fortran")


def test_unavailable_backend_is_skipped_with_a_note(capsys, monkeypatch):
    from normkit import backends
    status = dict(backends.backend_status())
    status["numba"] = "ImportError: pretend numba is missing"
    monkeypatch.setattr(backends, "backend_status", lambda: status)
    rc, out, _ = _run(capsys, "--cases", TINY, "--peers", "none",
                      "--backends", "numpy,numba")
    assert rc == 0 and "backend 'numba' skipped" in out


def test_cli_entry_point():
    out = subprocess.run([sys.executable, "-m", "normkit", "bench", "--list", "--quick"],
                         capture_output=True, text=True, check=True).stdout
    assert TINY in out


def test_disturbed_rows_are_marked_and_measured_again(capsys, monkeypatch):
    monkeypatch.setattr(_bench.CpuMeter, "value", lambda self: 0.9)
    waited = []
    monkeypatch.setattr(_bench, "wait_for_quiet", lambda *a, **k: waited.append(1))
    rc, out, err = _run(capsys, "--cases", TINY, "--peers", "none", "--retry", "2")
    assert rc == 0 and len(waited) == 2
    assert "0.90~" in out and "disturbed by other processes" in out
    assert "measuring 1 disturbed row(s) again" in err


def test_cpu_meter_reads_proc_stat():
    m = _bench.CpuMeter()
    sum(range(200_000))
    import time
    time.sleep(0.06)
    v = m.value()
    if sys.platform.startswith("linux"):
        assert v is not None and v >= 0
