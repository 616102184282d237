"""The 16-bit rows of ``python -m normkit bench``: the table, the float64 truth, the
float32 twin, the peers in 16 bits, and "unsupported" rows that never crash the run."""
from __future__ import annotations

import importlib.util
import json

import ml_dtypes
import numpy as np
import pytest

import normkit
from normkit import _bench
from normkit import _bench_cases as C
from normkit import _bench_columns as cols
from normkit import _bench_data as D
from normkit._bench_op_base import to_torch, torch_to_numpy

HALF_NORMS = {"bn_eval", "bn_eval_add_relu", "bn_train_fwd", "bn_train_fb", "ln", "rms",
              "gn", "in", "ln_train_fb"}
TINY16 = "tiny_bn_eval_nchw_1x16x4x4_f16"
TINYBF = "tiny_bn_eval_nchw_1x16x4x4_bf16"
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="torch not installed")
needs_ort = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
    reason="onnx / onnxruntime not installed")


def _run(capsys, *argv):
    rc = _bench.main(["--no-progress", "--min-time", "0.01", "--default-malloc", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_norm_has_float16_and_bfloat16_rows():
    for dtype in C.HALF_DTYPES:
        cases = [c for c in C.CASES if c.dtype == dtype]
        assert HALF_NORMS <= {c.op.key for c in cases}
        assert {"tiny", "rows", "batchnorm", "groupnorm", "training"} <= {
            c.category for c in cases}
        assert any(c.data == "offset" for c in cases)           # a hard-data row
        assert any(c.tier == "quick" for c in cases)            # --quick shows them
    assert {c.dtype for c in C.select_cases(patterns=["16bit"])} == set(C.HALF_DTYPES)
    assert all(c.dtype == "bfloat16" for c in C.select_cases(patterns=["bfloat16"]))


def test_half_data_and_float64_truth():
    case = C.CASE_BY_NAME[TINYBF]
    units = D.make_data(case, smoke=True)
    assert units[0]["x"].dtype == ml_dtypes.bfloat16
    assert units[0]["w"].dtype == ml_dtypes.bfloat16            # a model stored in bf16
    wide = D.widen_units(units, np.float32)
    assert wide[0]["x"].dtype == np.float32
    assert np.array_equal(wide[0]["x"].astype(np.float64), units[0]["x"].astype(np.float64))
    (ref,) = D.truth(case, units)
    assert ref.dtype == np.float64 and ref.shape == units[0]["x"].shape


def test_numpy_backend_float16_error_is_one_rounding():
    """float16 through the reference backend: float64 math, one rounding, so the error
    against the float64 truth is at most half an ulp of the largest output (2**-11 of
    max |truth|, as max_rel_error divides by max(1, max|truth|))."""
    case = C.CASE_BY_NAME["ln_8x128x768_f16"]
    units = D.make_data(case, smoke=True)
    ref = D.truth(case, units)
    got = D.to_arrays(D.run_for_check(D.normkit_runner(case, units, "numpy")))
    assert got[0].dtype == np.float16
    assert D.max_rel_error(got, ref) <= 2.0 ** -11


def test_half_rows_table_and_float32_twin(capsys, tmp_path):
    path = tmp_path / "bench.json"
    rc, out, _ = _run(capsys, "--cases", f"{TINY16},{TINYBF}", "--json", str(path))
    assert rc == 0
    assert "16-bit case" in out and "x f32" in out and "16-bit rows:" in out
    recs = {r["case"]: r for r in json.loads(path.read_text())["records"]}
    f16, bf16 = recs[TINY16], recs[TINYBF]
    for b in normkit.available_backends():
        assert f16["results"][b]["status"] == "ok" and f16["results"][b]["correct"]
        twin = f16["results"][f"{b}@float32"]
        assert twin["status"] == "ok" and twin["correct"] and twin["median_s"] > 0
        # bfloat16: measured once the backend takes it, else "unsupported", never "error"
        assert bf16["results"][b]["status"] in ("ok", "unsupported")
    if importlib.util.find_spec("torch") is not None:
        for rec in (f16, bf16):
            t = rec["results"]["torch"]
            assert t["status"] == "ok" and t["correct"], t


def test_unsupported_dtype_is_a_row_not_a_crash(capsys, tmp_path, monkeypatch):
    real = D.normkit_runner

    def refuses_bfloat16(case, units, backend):
        if units[0]["x"].dtype.name == "bfloat16" and backend != "numpy":
            def fn():
                raise TypeError("x must be a float16, float32 or float64 array, got dtype "
                                "bfloat16")
            return fn
        return real(case, units, backend)

    monkeypatch.setattr(D, "normkit_runner", refuses_bfloat16)
    path = tmp_path / "bench.json"
    rc, out, _ = _run(capsys, "--cases", TINYBF, "--peers", "none", "--json", str(path))
    assert rc == 0
    (rec,) = json.loads(path.read_text())["records"]
    for b in normkit.available_backends():
        if b != "numpy":
            r = rec["results"][b]
            assert r["status"] == "unsupported" and "bfloat16" in r["note"]
    assert "unsupported in tiny_bn_eval_nchw_1x16x4x4_bf16: x must be" in out


def test_other_errors_stay_errors():
    impl = cols.backend_impl("numpy")
    case = C.CASE_BY_NAME[TINYBF]
    assert cols.unsupported_dtype(impl, case, TypeError("weight must be 1-D")) is None
    assert cols.unsupported_dtype(impl, case, ValueError("bfloat16")) is None
    assert cols.unsupported_dtype(impl, C.CASE_BY_NAME[TINY16],
                                  TypeError("got dtype bfloat16")) is None


@needs_torch
def test_bfloat16_shares_memory_with_torch():
    import torch
    a = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
    t = to_torch(torch, a)
    assert t.dtype == torch.bfloat16 and t.data_ptr() == a.ctypes.data
    back = torch_to_numpy(t * 2)
    assert back.dtype == ml_dtypes.bfloat16
    assert np.array_equal(back.astype(np.float32), 2 * a.astype(np.float32))


@needs_ort
def test_onnxruntime_layer_norm_in_bfloat16():
    """ORT's Python layer cannot take a bfloat16 NumPy array; the bench binds OrtValues."""
    case = C.CASE_BY_NAME["ln_8x128x768_bf16"]
    units = D.make_data(case, smoke=True)
    fn, fetch = cols.ort_impl(1).prepare(case, units)
    got = fetch(D.run_for_check(fn))
    assert got[0].dtype == ml_dtypes.bfloat16
    assert D.max_rel_error(got, D.truth(case, units)) <= case.tol()


@needs_ort
def test_fused_case_is_one_graph_of_three_nodes():
    case = C.CASE_BY_NAME["bn_eval_add_relu_nchw_8x64x56x56"]
    units = D.make_data(case, smoke=True)
    model, *_ = cols.onnx_model(case, units)
    assert [n.op_type for n in model.graph.node] == ["BatchNormalization", "Add", "Relu"]
    assert [i.name for i in model.graph.input] == ["X0", "X1"]
    assert model.graph.output[0].name == "Y0"
