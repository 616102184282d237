"""from_torch / from_onnx / fold_onnx_batch_norms / onnx_constants.

torch, onnx and onnxruntime are optional peers: each group of tests skips on its own
when its package is missing; the rest of the file still runs.

The model-zoo tests (every BatchNormalization node of four ONNX models, and folding them
into the convolutions) are in tests/test_interop_onnx_fold.py.
"""
import os
import sys

import _bounds_extra as BX
import numpy as np
import pytest

import normkit

try:
    import torch
    nn = torch.nn
except ImportError:
    torch = nn = None
try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:
    onnx = None
try:
    import onnxruntime as ort
except ImportError:
    ort = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
needs_onnx = pytest.mark.skipif(onnx is None, reason="needs onnx")
needs_ort = pytest.mark.skipif(onnx is None or ort is None, reason="needs onnx and onnxruntime")
# tiny batches on purpose: the small-batch diagnostics have nothing to say here
pytestmark = pytest.mark.filterwarnings("ignore::normkit.UnstableBatchStatisticsWarning")


# ====================================================================== torch
def _randomize(module, gen):
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers()
                                              if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)


def _torch_cases():
    return {
        "bn1d_2d_input": (lambda: nn.BatchNorm1d(5), (8, 5)),
        "bn1d": (lambda: nn.BatchNorm1d(5, momentum=0.3), (4, 5, 7)),
        "bn2d": (lambda: nn.BatchNorm2d(5, eps=1e-3), (4, 5, 3, 6)),
        "bn3d": (lambda: nn.BatchNorm3d(5), (2, 5, 3, 2, 4)),
        "bn2d_cumulative": (lambda: nn.BatchNorm2d(5, momentum=None), (4, 5, 3, 3)),
        "bn2d_no_affine": (lambda: nn.BatchNorm2d(5, affine=False), (4, 5, 3, 3)),
        "bn2d_no_stats": (lambda: nn.BatchNorm2d(5, track_running_stats=False), (4, 5, 3, 3)),
        "in1d": (lambda: nn.InstanceNorm1d(5), (3, 5, 9)),
        "in2d_affine_stats": (lambda: nn.InstanceNorm2d(5, affine=True,
                                                        track_running_stats=True),
                              (3, 5, 4, 4)),
        "in3d": (lambda: nn.InstanceNorm3d(5, affine=True), (2, 5, 3, 3, 3)),
        "ln": (lambda: nn.LayerNorm((4, 6)), (3, 5, 4, 6)),
        "ln_no_bias": (lambda: nn.LayerNorm(6, bias=False), (3, 6)),
        "ln_no_affine": (lambda: nn.LayerNorm(6, elementwise_affine=False), (3, 6)),
        "gn": (lambda: nn.GroupNorm(3, 6, eps=1e-4), (2, 6, 5, 5)),
        "rms": (lambda: nn.RMSNorm(6), (4, 6)),
        "rms_eps": (lambda: nn.RMSNorm((3, 6), eps=1e-3), (2, 3, 6)),
    }


@needs_torch
@pytest.mark.parametrize("case", sorted(_torch_cases()) if torch is not None else [])
def test_from_torch_matches_torch(case):
    make, shape = _torch_cases()[case]
    gen = torch.Generator().manual_seed(0)
    module = make()
    _randomize(module, gen)
    layer = normkit.from_torch(module)
    assert type(layer).__name__ in ("BatchNorm", "InstanceNorm", "LayerNorm", "GroupNorm",
                                    "RMSNorm")
    assert layer.training is module.training
    for attr in ("eps", "momentum", "affine", "track_running_stats"):
        if hasattr(module, attr):
            assert getattr(layer, attr) == getattr(module, attr), attr
    torch_state = {k: v.numpy() for k, v in module.state_dict().items()}
    assert set(layer.state_dict()) == set(torch_state)
    for k, v in torch_state.items():
        np.testing.assert_array_equal(layer.state_dict()[k], v, err_msg=k)

    x = torch.randn(shape, generator=gen) * 2 + 1
    state_tol, steps = dict(rtol=0.0, atol=0.0), 0
    for mode in ("train", "eval", "train"):       # twice training: running stats move
        getattr(module, mode)()
        getattr(layer, mode)()
        with torch.no_grad():
            expected = module(x).numpy()
        got = layer(x.numpy())
        np.testing.assert_allclose(got, expected, err_msg=mode, **BX.tol_layer_vs_float32_peer(layer, expected))
        if mode == "train":
            steps += 1
            state_tol = BX.tol_running_state_float32_peer(x.numpy(), steps)
        for k, v in module.state_dict().items():
            np.testing.assert_allclose(layer.state_dict()[k], v.numpy(),
                                       err_msg=f"{mode}: {k}", **state_tol)


@needs_torch
def test_from_torch_copies_not_shares():
    module = nn.BatchNorm2d(3)
    layer = normkit.from_torch(module)
    with torch.no_grad():
        module.weight.fill_(7.0)
        module.running_mean.fill_(3.0)
    assert np.all(layer.weight == 1.0) and np.all(layer.running_mean == 0.0)
    layer.bias[:] = 5
    assert torch.all(module.bias == 0)


@needs_torch
def test_from_torch_container():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4, momentum=None)
            self.inner = nn.Sequential(nn.ReLU(), nn.GroupNorm(2, 4))

    model = nn.Sequential(Block(), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 2))
    model[0].bn.eval()
    layers = normkit.from_torch(model)
    assert list(layers) == ["0.bn", "0.inner.1", "2"]
    assert isinstance(layers["0.bn"], normkit.BatchNorm)
    assert layers["0.bn"].momentum is None and not layers["0.bn"].training
    assert isinstance(layers["0.inner.1"], normkit.GroupNorm)
    assert isinstance(layers["2"], normkit.LayerNorm) and layers["2"].training
    assert layers["0.inner.1"].name == "0.inner.1"
    assert normkit.from_torch(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == {}


@needs_torch
def test_from_torch_dtypes_and_errors():
    assert normkit.from_torch(nn.BatchNorm1d(3).double()).dtype == np.float64
    assert normkit.from_torch(nn.LayerNorm(3).half()).dtype == np.float16
    bf = normkit.from_torch(nn.LayerNorm(3).to(torch.bfloat16))
    assert bf.dtype.name == "bfloat16"          # kept 16-bit (ml_dtypes.bfloat16)
    assert normkit.from_torch(nn.BatchNorm1d(3), dtype=np.float64).dtype == np.float64
    assert normkit.from_torch(nn.BatchNorm1d(3), backend="numpy").backend == "numpy"
    sync = normkit.from_torch(nn.SyncBatchNorm(4))
    assert isinstance(sync, normkit.BatchNorm) and sync.num_features == 4
    with pytest.raises(TypeError, match="not a normalization module"):
        normkit.from_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        normkit.from_torch(np.zeros(3))
    with pytest.raises(ValueError, match="lazy module"):
        normkit.from_torch(nn.LazyBatchNorm2d())


# ====================================================================== ONNX: small models
def _bn_model(momentum=None, name="bn", training=False, opset=15):
    c = 3
    rng = np.random.default_rng(0)
    attrs = {"epsilon": 1e-3}
    if momentum is not None:
        attrs["momentum"] = momentum
    if training:
        attrs["training_mode"] = 1
    # training mode needs the running statistics as outputs (ONNX Runtime and the
    # checker refuse the node without them)
    outputs = ["y", "rm", "rv"] if training else ["y"]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], outputs,
                            name=name, **attrs)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("s", rng.random(c) + 0.5), ("b", rng.standard_normal(c)),
              ("m", rng.standard_normal(c)), ("v", rng.random(c) + 0.5))]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@needs_onnx
def test_from_onnx_batch_norm_conventions(tmp_path):
    model = _bn_model(momentum=0.8)
    layers = normkit.from_onnx(model)
    bn = layers["bn"]
    assert isinstance(bn, normkit.BatchNorm) and not bn.training
    # ONNX 0.8 weights the old value: 1 - 0.8 with 0.8 read from a float32 attribute
    # (relative u32 each, 4x larger relative to 0.2); eps read from a float32 attribute
    assert bn.momentum == pytest.approx(0.2, rel=4 * 2 * BX.U32, abs=0)
    assert bn.eps == pytest.approx(1e-3, rel=BX.U32, abs=0)
    np.testing.assert_array_equal(bn.running_var, numpy_helper.to_array(model.graph.initializer[3]))
    # default 0.9 (exactly representable? no: 1 - 0.9 in float64/float32, relative 10 u32)
    assert normkit.from_onnx(_bn_model())["bn"].momentum == pytest.approx(0.1, rel=10 * 2 * BX.U32,
                                                                          abs=0)
    assert normkit.from_onnx(_bn_model(training=True))["bn"].training
    # path and bytes work too
    path = tmp_path / "bn.onnx"
    onnx.save(model, path)
    for source in (path, str(path), model.SerializeToString()):
        assert list(normkit.from_onnx(source)) == ["bn"]
    with pytest.raises(TypeError, match="ModelProto"):
        normkit.from_onnx(123)


@needs_onnx
def test_from_onnx_names_and_constants():
    model = _bn_model(name="")
    node = model.graph.node[0]
    # duplicate the node (unnamed both times) on the output: names get op_type_index
    node2 = helper.make_node("BatchNormalization", ["y", "s", "b", "m", "v"], ["z"])
    model.graph.node.append(node2)
    model.graph.output[0].name = "z"
    assert list(normkit.from_onnx(model)) == ["BatchNormalization_0", "BatchNormalization_1"]
    for n in model.graph.node:
        n.name = "same"
    assert list(normkit.from_onnx(model)) == ["same", "same_1"]
    # a parameter coming from a Constant node / an Identity of an initializer
    model = _bn_model()
    s = numpy_helper.to_array(model.graph.initializer[0])
    del model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Identity", ["s0"], ["s"]))
    model.graph.node.insert(0, helper.make_node(
        "Constant", [], ["s0"], value=numpy_helper.from_array(s, "s0")))
    np.testing.assert_array_equal(normkit.from_onnx(model)["bn"].weight, s)
    consts = normkit.interop.onnx_constants(model)
    np.testing.assert_array_equal(consts["s"], s)
    assert "x" not in consts and "y" not in consts
    # a parameter that depends on the graph input is refused
    model.graph.node.insert(0, helper.make_node("ReduceMean", ["x"], ["xm"], axes=[0, 2],
                                                keepdims=0))
    model.graph.node[-1].input[3] = "xm"
    with pytest.raises(ValueError, match="not a constant"):
        normkit.from_onnx(model)


def _single_node_cases():
    """ONNX's own node test cases of the five normalization ops (46 with onnx 1.23).

    Importing just the five case modules (0.6 s) instead of ``collect_testcases()``
    (20 s, every operator) fills onnx's case list with these ops only.
    """
    if onnx is None:
        return {}
    import importlib
    import warnings

    import onnx.backend.test.case.node as node_cases
    ops = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
           "InstanceNormalization", "RMSNormalization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for mod in ("batch_normalization", "layernormalization", "groupnormalization",
                        "instance_normalization", "rmsnormalization"):
                importlib.import_module(f"onnx.backend.test.case.node.{mod}")
            cases = list(node_cases._NodeTestCases)
        except (ImportError, AttributeError):     # another onnx layout: the slow way
            cases = node_cases.collect_testcases()
    return {c.name: c for c in cases
            if len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type in ops}


SINGLE_NODE = _single_node_cases()


@needs_onnx
def test_single_node_cases_found():
    assert len(SINGLE_NODE) >= 46, sorted(SINGLE_NODE)


@needs_onnx
@pytest.mark.parametrize("name", sorted(SINGLE_NODE))
def test_from_onnx_single_node_cases(name):
    """The official ONNX node test cases, with the parameters turned into initializers."""
    case = SINGLE_NODE[name]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    (inputs, outputs), = case.data_sets[:1]
    graph_inputs = [i.name for i in model.graph.input]
    for n, value in zip(graph_inputs[1:], inputs[1:]):
        model.graph.initializer.append(numpy_helper.from_array(value, n))
    layers = normkit.from_onnx(model)
    (layer,) = layers.values()
    x = inputs[0]
    if layer.training:                               # BN training_mode=1 cases
        assert isinstance(layer, normkit.BatchNorm)
    y = layer(x)
    # ONNX's NumPy reference in the data dtype vs normkit (float64 statistics): the
    # float32 two-implementation bound with normkit's own statistics (BX.tol_layer_vs_float32_peer)
    np.testing.assert_allclose(y, outputs[0], **BX.tol_layer_vs_float32_peer(layer, outputs[0]))


def _group_norm_model(opset, channels=6, groups=3, static=True):
    rng = np.random.default_rng(3)
    n_param = groups if opset < 21 else channels
    scale = (rng.random(n_param) + 0.5).astype(np.float32)
    bias = rng.standard_normal(n_param).astype(np.float32)
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], name="gn",
                            num_groups=groups, epsilon=1e-4)
    shape = [2, channels, 5] if static else ["N", "C", "L"]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@needs_onnx
@pytest.mark.parametrize("opset", [18, 21])
def test_from_onnx_group_norm_opsets(opset):
    """Opset 18: scale/bias per group (repeated over the group's channels); 21: per channel."""
    import warnings

    from onnx.reference import ReferenceEvaluator
    model = _group_norm_model(opset)
    layer = normkit.from_onnx(model)["gn"]
    assert isinstance(layer, normkit.GroupNorm)
    # eps 1e-4 came through a float32 attribute: within u32 relative
    assert (layer.num_groups, layer.num_channels) == (3, 6)
    assert layer.eps == pytest.approx(1e-4, rel=BX.U32, abs=0)
    x = np.random.default_rng(4).standard_normal((2, 6, 5)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # opset 18 is deprecated
        expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(layer(x), expected, **BX.tol_layer_vs_float32_peer(layer, expected))
    if opset == 18:
        np.testing.assert_array_equal(layer.weight[:2], layer.weight[0])
        with pytest.raises(ValueError, match="channel count"):
            normkit.from_onnx(_group_norm_model(18, static=False))
    else:
        assert isinstance(normkit.from_onnx(_group_norm_model(21, static=False))["gn"],
                          normkit.GroupNorm)


@needs_onnx
def test_from_onnx_layer_norm_positive_axis_uses_shapes():
    node = helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="ln", axis=1)
    scale = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layer = normkit.from_onnx(model)["ln"]
    assert layer.normalized_shape == (3, 4) and layer.bias is None
    np.testing.assert_array_equal(layer.weight, scale)


@needs_onnx
def test_from_onnx_without_onnx(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="pip install onnx"):
        normkit.from_onnx("model.onnx")


def test_import_normkit_does_not_import_peers():
    import subprocess
    code = ("import sys, normkit; bad = [m for m in ('torch', 'onnx', 'onnxruntime') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ====================================================================== docs
@needs_ort
@needs_torch
def test_docs_inference_page_runs(capsys):
    """Every Python block of docs/inference.md runs, in order, and prints what it says."""
    import re
    page = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "inference.md")
    if not os.path.exists(page):
        pytest.skip("docs/inference.md not found (installed without the docs)")
    with open(page, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 6
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"inference.md[block {i}]", "exec"), namespace)
        printed = capsys.readouterr().out.split("\n")
        documented = [line[2:] for line in block.split("\n") if line.startswith("# ")]
        # the first printed line of each block is shown in its comments (numbers may
        # differ in the last digits with other ORT/BLAS builds: compare the start)
        if printed[0]:
            assert any(printed[0][:12] == d[:12] for d in documented), \
                (i, printed[0], documented)


# ====================================================================== ONNX: hostile models
# Tiny malformed or malicious models built in memory / tmp_path. Each must be refused
# with a ValueError whose message says what was wrong, by from_onnx and (for
# BatchNormalization) by fold_onnx_batch_norms, as onnx.checker and ONNX Runtime do.
def _bad_bn(inputs=("x", "s", "b", "m", "v"), c=3, x_shape=None, **params):
    arrays = {"s": np.ones(c, np.float32), "b": np.zeros(c, np.float32),
              "m": np.zeros(c, np.float32), "v": np.ones(c, np.float32)}
    arrays.update(params)
    inits = [numpy_helper.from_array(np.asarray(a), k) for k, a in arrays.items()
             if k in inputs]
    shape = x_shape or [1, c, 2]
    node = helper.make_node("BatchNormalization", list(inputs), ["y"], name="bn")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _with_conv(model):
    """The BN model with a Conv in front of it (something fold_onnx_batch_norms folds)."""
    g = model.graph
    g.node.insert(0, helper.make_node("Conv", ["x0", "w"], ["x"], name="conv"))
    g.initializer.append(numpy_helper.from_array(np.ones((3, 3, 1), np.float32), "w"))
    g.input[0].name = "x0"
    return model


BAD_BN = {
    "mean (1,) for C=3": (dict(m=np.zeros(1, np.float32)), r"mean|shape|Inference"),
    "mean (4,) for C=3": (dict(m=np.zeros(4, np.float32)), r"mean|shape|Inference"),
    "2 of 5 inputs": (dict(inputs=("x", "s")), r"input size 2|expected input"),
    "0 inputs": (dict(inputs=()), r"input size 0|expected input"),
    "integer scale": (dict(s=np.ones(3, np.int64)), r"scale|type"),
    "0-d scale": (dict(s=np.array(1.0, np.float32)), r"scale|shape|Inference"),
    "(3, 1) scale": (dict(s=np.ones((3, 1), np.float32)), r"scale|shape|Inference"),
    "negative dim": (dict(x_shape=[1, -3, 2]), r"negative|non-negative|Inference"),
}


@needs_onnx
@pytest.mark.parametrize("case", sorted(BAD_BN))
def test_from_onnx_refuses_malformed_batch_norm(case):
    kwargs, pattern = BAD_BN[case]
    model = _bad_bn(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        normkit.from_onnx(model)
    with pytest.raises(ValueError, match=pattern):
        normkit.fold_onnx_batch_norms(model)
    if case != "negative dim":         # the Conv's output carries no declared dims
        with pytest.raises(ValueError, match=pattern):
            normkit.fold_onnx_batch_norms(_with_conv(_bad_bn(**kwargs)))


@needs_onnx
def test_own_checks_behind_the_checker():
    """normkit's per-node checks, for what shape inference cannot see (unknown C)."""
    model = _bad_bn(m=np.zeros(4, np.float32), x_shape=["N", "C", "L"])
    with pytest.raises(ValueError, match=r"mean|Inference"):
        normkit.from_onnx(model)
    # the converter's own checks, called directly (bypassing onnx.checker)
    direct = {
        "2 inputs": (dict(inputs=("x", "s")), r"expected input 2 \(B\), got a node with 2"),
        "0 inputs": (dict(inputs=()), r"expected input 1 \(scale\), got a node with 0"),
        "mean (4,)": (dict(m=np.zeros(4, np.float32)),
                      r"mean: expected shape \(3,\) \(from the channel count of input 'x'"),
        "mean (1,), C unknown": (dict(m=np.zeros(1, np.float32), x_shape=["N", "C", "L"]),
                                 r"mean: expected shape \(3,\) \(from scale\), got shape "
                                 r"\(1,\)"),
        "int scale": (dict(s=np.ones(3, np.int64)), r"scale: expected a float tensor, got "
                                                    r"dtype int64"),
        "0-d scale": (dict(s=np.array(1.0, np.float32)), r"scale: expected shape \(3,\)"),
        "0-d scale, C unknown": (dict(s=np.array(1.0, np.float32), x_shape=["N", "C"]),
                                 r"scale: expected a 1-D tensor \(one value per channel\), "
                                 r"got shape \(\)"),
        "(3, 1) scale": (dict(s=np.ones((3, 1), np.float32)),
                         r"scale: expected shape \(3,\).*got shape \(3, 1\)"),
    }
    for kwargs, pattern in direct.values():
        model = _bad_bn(**kwargs)
        ctx = normkit.interop._OnnxNodeContext(model, None, None)
        with pytest.raises(ValueError, match=pattern):
            normkit.interop._onnx_batch_norm(model.graph.node[0], ctx)


@needs_onnx
def test_from_onnx_empty_and_garbage(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        normkit.from_onnx(empty)
    with pytest.raises(ValueError, match="empty"):
        normkit.from_onnx(b"")
    with pytest.raises(ValueError, match="not an ONNX model"):
        normkit.from_onnx(b"\xff\xff\xff\xff garbage")
    with pytest.raises(ValueError, match="no graph"):
        normkit.from_onnx(onnx.ModelProto())


def _constant_of_shape_model(n):
    """BN whose scale is Slice(ConstantOfShape([n]))[:3]: tiny file, n-element constant."""
    model = _bad_bn(inputs=("x", "s", "b", "m", "v"))
    g = model.graph
    del g.initializer[0]                             # "s" is computed instead
    for name, value in (("shape", [n]), ("st", [0]), ("en", [3])):
        g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    g.node.insert(0, helper.make_node("Slice", ["big", "st", "en"], ["s"]))
    g.node.insert(0, helper.make_node("ConstantOfShape", ["shape"], ["big"],
                                      value=numpy_helper.from_array(
                                          np.array([1.0], np.float32))))
    return model


@needs_onnx
def test_constant_folding_is_capped():
    model = _constant_of_shape_model(2 ** 29)
    assert model.ByteSize() < 1000
    with pytest.raises(ValueError, match=r"536870912 elements.*max_constant_elements"):
        normkit.from_onnx(model)
    with pytest.raises(ValueError, match="max_constant_elements"):
        normkit.fold_onnx_batch_norms(_with_conv(_constant_of_shape_model(2 ** 29)))
    with pytest.raises(ValueError, match="max_constant_elements"):
        normkit.interop.onnx_constants(model)
    # under the cap (or with a larger one) it is computed
    np.testing.assert_array_equal(
        normkit.from_onnx(_constant_of_shape_model(1000))["bn"].weight, 1)
    layer = normkit.from_onnx(_constant_of_shape_model(5000), max_constant_elements=5000)
    np.testing.assert_array_equal(layer["bn"].weight, 1)
    with pytest.raises(ValueError, match="limit of 4999"):
        normkit.from_onnx(_constant_of_shape_model(5000), max_constant_elements=4999)


def _external_model(location):
    """BN whose scale lives in external data at ``location``."""
    model = _bad_bn()
    t = model.graph.initializer[0]
    t.ClearField("float_data")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    return model


@needs_onnx
def test_external_data_stays_in_the_model_folder(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    scale = np.array([2.0, 3.0, 4.0], np.float32)
    scale.tofile(folder / "scale.bin")
    (scale * 10).tofile(tmp_path / "outside.bin")
    os.symlink(tmp_path / "outside.bin", folder / "link.bin")
    # next to the model: read
    onnx.save(_external_model("scale.bin"), folder / "ok.onnx")
    np.testing.assert_array_equal(normkit.from_onnx(folder / "ok.onnx")["bn"].weight, scale)
    # outside the folder, absolute, or a symlink out: refused by onnx's own checks
    for i, location in enumerate(["../outside.bin", str(tmp_path / "outside.bin"),
                                  "link.bin", "sub/../../outside.bin"]):
        path = folder / f"bad{i}.onnx"
        onnx.save(_external_model(location), path)
        with pytest.raises(ValueError, match="external data"):
            normkit.from_onnx(path)
        with pytest.raises(ValueError, match="external data"):
            normkit.fold_onnx_batch_norms(path)
    # bytes / ModelProto: never read relative to the current directory
    monkeypatch.chdir(tmp_path)
    (scale * 10).tofile(tmp_path / "scale.bin")
    model = _external_model("scale.bin")
    for source in (model, model.SerializeToString()):
        with pytest.raises(ValueError, match="base_dir="):
            normkit.from_onnx(source)
        layer = normkit.from_onnx(source, base_dir=folder)["bn"]
        np.testing.assert_array_equal(layer.weight, scale)
    assert model.graph.initializer[0].data_location == TensorProto.EXTERNAL  # not mutated
    with pytest.raises(ValueError, match="base_dir"):
        normkit.from_onnx(model, base_dir=tmp_path / "missing")


@needs_onnx
def test_malformed_other_norms():
    def model(op, inputs, params, opset, **attrs):
        inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
        node = helper.make_node(op, inputs, ["y"], name="n", **attrs)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    f = np.float32
    bad = [
        model("InstanceNormalization", ["x", "s", "b"],
              {"s": np.ones(3, f), "b": np.zeros(4, f)}, 22),
        model("InstanceNormalization", ["x"], {}, 22),
        model("LayerNormalization", ["x"], {}, 17),
        model("LayerNormalization", ["x", "s"], {"s": np.ones(4, f)}, 17),
        model("GroupNormalization", ["x", "s", "b"],
              {"s": np.ones(3, f), "b": np.ones(4, f)}, 21, num_groups=2),
        model("LayerNormalization", ["x", "s"], {"s": np.ones(3, np.int32)}, 17),
    ]
    for m in bad:
        with pytest.raises(ValueError):
            normkit.from_onnx(m)
    with pytest.raises(ValueError, match=r"node 'n': num_groups: expected a divisor of the "
                                         r"4 channels, got 3"):
        normkit.from_onnx(model("GroupNormalization", ["x", "s", "b"],
                                {"s": np.ones(4, f), "b": np.ones(4, f)}, 21, num_groups=3))
    params = {k: np.ones(4, f) for k in "sbmv"}
    with pytest.raises(ValueError, match=r"node 'n': epsilon: expected a number >= 0"):
        normkit.from_onnx(model("BatchNormalization", ["x", "s", "b", "m", "v"], params, 15,
                                epsilon=-1.0))
    with pytest.raises(ValueError, match=r"node 'n': Scale: expected a shape that broadcasts "
                                         r"to the normalized shape \(3,\), got shape \(4,\)"):
        normkit.from_onnx(model("LayerNormalization", ["x", "s"], {"s": np.ones(4, f)}, 17))
    with pytest.raises(ValueError, match=r"InstanceNormalization node 'n': scale: expected "
                                         r"shape \(4,\) \(from the channel count"):
        normkit.from_onnx(model("InstanceNormalization", ["x", "s", "b"],
                                {"s": np.ones(3, f), "b": np.zeros(4, f)}, 22))
