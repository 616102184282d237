"""from_onnx of 16-bit ONNX models (issue 13): a float16 model's norm nodes become
float16 layers that run in float16 (compared with ONNX Runtime), and bfloat16 nodes,
where the opset allows bfloat16 for the op, become bfloat16 layers (compared with the
op's definition computed in float64: ONNX Runtime has no bfloat16 kernel for them)."""
from __future__ import annotations

import numpy as np
import pytest
from _cases import np_dtype, tol_normalized

import normkit as nk

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SHAPE = (2, 6, 8)
ELEM = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def _model(op, inits, attrs, opset, dtype):
    et = ELEM[dtype]
    x = helper.make_tensor_value_info("X", et, list(SHAPE))
    y = helper.make_tensor_value_info("Y", et, list(SHAPE))
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    node = helper.make_node(op, ["X"] + list(inits), ["Y"], name="n0", **attrs)
    graph = helper.make_graph([node], "g", [x], [y], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _reference(op, x, p, attrs):
    """The op's definition in float64; returns (y, values reduced per statistic)."""
    x = x.astype(np.float64)
    p = {k: v.astype(np.float64) for k, v in p.items()}
    c = (slice(None), None)                         # per-channel vector on axis 1
    if op == "BatchNormalization":
        return (x - p["m"][c]) / np.sqrt(p["v"][c] + 1e-5) * p["s"][c] + p["b"][c], 1
    if op == "RMSNormalization":
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * p["s"], SHAPE[2]
    if op == "LayerNormalization":
        axes, w, b, n = (-1,), p["s"], p["b"], SHAPE[2]
    else:                                           # instance / group, channels on axis 1
        g = attrs.get("num_groups", SHAPE[1])
        xg = x.reshape(SHAPE[0], g, -1)
        xh = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5)
        return xh.reshape(SHAPE) * p["s"][c] + p["b"][c], xg.shape[-1]
    xh = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)
    return xh * w + b, n


def _cases(dtype, rng):
    dt = np_dtype(dtype)

    def c(n):
        return (1 + 0.5 * rng.standard_normal(n)).astype(dt)
    var = (1 + rng.random(6)).astype(dt)
    cases = [("BatchNormalization", {"s": c(6), "b": c(6), "m": c(6), "v": var}, {}, 15),
             ("GroupNormalization", {"s": c(6), "b": c(6)}, {"num_groups": 2}, 21),
             ("LayerNormalization", {"s": c(8), "b": c(8)}, {"axis": -1}, 17),
             ("RMSNormalization", {"s": c(8)}, {"axis": -1}, 23),
             # bfloat16 in InstanceNormalization's T from opset 22 on (6..21: no)
             ("InstanceNormalization", {"s": c(6), "b": c(6)}, {}, 22)]
    return cases


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_onnx_norm_nodes_run_16_bit(dtype):
    rng = np.random.default_rng(0)
    for op, inits, attrs, opset in _cases(dtype, rng):
        model = _model(op, inits, attrs, opset, dtype)
        onnx.checker.check_model(model, full_check=True)
        layer = nk.from_onnx(model)["n0"]
        assert layer.dtype == np_dtype(dtype), op          # parameters kept 16-bit
        for name, value in layer.state_dict().items():
            if value.dtype.kind != "i":
                assert value.dtype == np_dtype(dtype), (op, name)
        x = rng.standard_normal(SHAPE).astype(np_dtype(dtype))
        y = layer(x)
        assert y.dtype == np_dtype(dtype), op
        ref, n = _reference(op, x, inits, attrs)
        # tol_normalized: two implementations reducing n values (here one is exact);
        # centred data (cond ~ 1, 3 to cover the sample mean), scale max|y| >= 1
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(y.astype(np.float64), ref, err_msg=op,
                                   **tol_normalized(dtype, n, 3.0, scale))


def test_float16_onnx_model_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    rng = np.random.default_rng(1)
    for op, inits, attrs, opset in _cases("float16", rng):
        model = _model(op, inits, attrs, opset, "float16")
        layer = nk.from_onnx(model)["n0"]
        x = rng.standard_normal(SHAPE).astype(np.float16)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        want = sess.run(None, {"X": x})[0]
        got = layer(x)
        assert got.dtype == want.dtype == np.float16, op
        n = _reference(op, x, inits, attrs)[1]
        scale = max(1.0, float(np.abs(want.astype(np.float64)).max()))
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   err_msg=op, **tol_normalized("float16", n, 3.0, scale))


def test_float16_model_external_data_outside_its_folder_is_refused(tmp_path):
    """The 16-bit path keeps _onnx_safety's checks: external data must stay inside
    the model's folder."""
    rng = np.random.default_rng(2)
    op, inits, attrs, opset = _cases("float16", rng)[2]
    model = _model(op, inits, attrs, opset, "float16")
    scale = model.graph.initializer[0]
    scale.data_location = TensorProto.EXTERNAL
    scale.ClearField("raw_data")
    scale.ClearField("int32_data")
    entry = scale.external_data.add()
    entry.key, entry.value = "location", "../outside.bin"
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(ValueError, match="outside"):
        nk.from_onnx(model, base_dir=folder)


def test_bfloat16_instance_norm_before_opset_22_is_refused():
    """ONNX allows bfloat16 InstanceNormalization only from opset 22: the full check
    refuses an older one instead of running it."""
    rng = np.random.default_rng(3)
    op, inits, attrs, _ = _cases("bfloat16", rng)[-1]
    assert op == "InstanceNormalization"
    with pytest.raises(ValueError):
        nk.from_onnx(_model(op, inits, attrs, 21, "bfloat16"))
