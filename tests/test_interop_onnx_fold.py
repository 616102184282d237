"""ONNX model zoo: every BatchNormalization node of four real graphs, and folding BNs
into the convolutions (split from tests/test_interop.py).

The model-zoo test uses the "light" ResNet-50, DenseNet-121, Inception-v2 and
ShuffleNet graphs that the onnx package ships under ``onnx/backend/test/data/light``.
They keep the real graph structure but not the real weights: most weights (and most
BatchNormalization parameters) are computed by ``ConstantOfShape`` nodes filling them
with 0.02, a few BN parameters are stored initializers. The test therefore

1. imports every BatchNormalization node with ``normkit.from_onnx`` (which evaluates
   the constant subgraphs),
2. runs the whole model once in ONNX Runtime (graph optimizations off, so Conv+BN is
   not fused) on a seeded standard-normal input of the model's input shape
   (1, 3, 224, 224), with every BN node's input and output added as graph outputs,
3. feeds each BN node's real input to its normkit layer and compares with ORT's output
   of that node, relative to the output's magnitude (ResNet-50's activations grow to
   ~1e18 with these weights; they stay finite).

All 292 BatchNormalization nodes are checked (53 + 121 + 69 + 49).
"""
import os

import _bounds_extra as BX
import _cases as K
import numpy as np
import pytest

import normkit

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:
    onnx = None
try:
    import onnxruntime as ort
except ImportError:
    ort = None

needs_ort = pytest.mark.skipif(onnx is None or ort is None, reason="needs onnx and onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::normkit.UnstableBatchStatisticsWarning")


# ====================================================================== ONNX: model zoo
LIGHT_MODELS = ["resnet50", "densenet121", "inception_v2", "shufflenet"]
EXPECTED_BN_NODES = {"resnet50": 53, "densenet121": 121, "inception_v2": 69, "shufflenet": 49}


def _light_path(name):
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                        f"light_{name}.onnx")


def _run_with_tensors(model, tensor_names, seed=0):
    """Run ``model`` in ORT (no graph optimizations) exposing ``tensor_names`` as outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for t in tensor_names:
        if t not in have:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
            have.add(t)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(seed).standard_normal(inp.shape).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {inp.name: x})))


# ------------------------------------------------ forward error bound of a float32 network
def _magnitude_model(model):
    """The network's magnitude bound M: the same graph on |x| with every weight, bias and
    constant factor replaced by its absolute value (Abs nodes on every input of Conv,
    Gemm, Mul, Add, Sum; BatchNormalization with |scale|, |bias| and mean -|mean|, so
    it computes |s| (M + |m|) / sqrt(v + eps) + |beta|). ReLU, pooling, Concat and
    reshapes keep M >= |activation| elementwise, so M bounds every activation."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    nodes, count = [], iter(range(10 ** 9))

    def absolute(name, negate=False):
        out = f"{name}__abs{next(count)}"
        nodes.append(helper.make_node("Abs", [name], [out + "p" if negate else out]))
        if negate:
            nodes.append(helper.make_node("Neg", [out + "p"], [out]))
        return out
    first = m.graph.input[0].name
    renamed = {first: absolute(first)}
    for node in m.graph.node:
        ins = [renamed.get(i, i) for i in node.input]
        if node.op_type in ("Conv", "Gemm", "Mul", "Add", "Sum"):
            ins = [absolute(i) if i else i for i in ins]
        elif node.op_type == "BatchNormalization":
            ins = [ins[0], absolute(ins[1]), absolute(ins[2]), absolute(ins[3], True), ins[4]]
        node.input[:] = ins
        nodes.append(node)
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)
    return m


def _network_error_bound(model, names):
    """Per tensor t of ``names``: (G_t, M_t) with |float32 value - exact value| <= G_t M_t,
    for the model and for it with BNs folded into their convolutions.

    Forward error analysis (Higham, ch. 3) through the graph, first order in u = 2**-24:
    a Conv/Gemm of reduction length K computes fl(W x + b) = W x + b + d with
    |d| <= gamma(K) (|W| |x| + |b|) (any summation order, FMA or not), and passes the error
    e of its input on as |W| e; ReLU, max pooling, Concat and reshapes pass it on
    unchanged (1-Lipschitz elementwise), an average over a window of K adds gamma(K),
    Add/Mul/Sum a few roundings, an eval BN (x - m) s + beta ~8 (with the folding's own
    roundings of s W and s (b - m) + beta counted there too). By induction e_t <= G_t M_t,
    with M the magnitude network (_magnitude_model) and G_t the largest sum of those
    gamma terms along a path into t. M itself is computed in float32 from non-negative
    terms (relative error <= G_t): the bound is taken x (1 + G_t)."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.value_info) + list(inferred.input)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    u, growth = BX.U32, {}
    for node in model.graph.node:
        g = max([growth.get(i, 0.0) for i in node.input] + [0.0])
        op = node.op_type
        if op in ("Conv", "Gemm"):
            w = shapes[node.input[1]]
            # Gemm: the largest dimension of A covers K whatever transA (a bigger K only
            # loosens the bound)
            k = (int(np.prod(w[1:])) if op == "Conv" else max(shapes[node.input[0]])) + (
                len(node.input) > 2)
            g += K.gamma(k, u)
        elif op in ("AveragePool", "GlobalAveragePool"):
            attr = {a.name: list(a.ints) for a in node.attribute}
            window = attr.get("kernel_shape") or shapes[node.input[0]][2:]
            g += K.gamma(int(np.prod(window)), u)
        elif op in ("BatchNormalization", "Add", "Mul", "Sum"):
            g += K.gamma(8 if op == "BatchNormalization" else len(node.input), u)
        for o in node.output:
            growth[o] = g
    magnitude = _run_with_tensors(_magnitude_model(model), names)
    return ({t: growth[t] for t in names},
            {t: magnitude[t].astype(np.float64) * (1 + growth[t]) for t in names})


@needs_ort
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_models_every_batch_norm_node_matches_ort(name):
    path = _light_path(name)
    model = onnx.load(path)
    bn_nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn_nodes) == EXPECTED_BN_NODES[name]
    layers = normkit.from_onnx(path)
    assert list(layers) == [n.name for n in bn_nodes]
    tensors = _run_with_tensors(model, [t for n in bn_nodes for t in (n.input[0], n.output[0])])
    for node in bn_nodes:
        layer = layers[node.name]
        assert isinstance(layer, normkit.BatchNorm) and not layer.training
        x, expected = tensors[node.input[0]], tensors[node.output[0]]
        assert np.isfinite(expected).all()
        y = layer(x)
        assert y.dtype == np.float32 and y.shape == expected.shape
        # eval BatchNorm, no reduction: both compute (x - m) * s + b elementwise in float32
        # (a few roundings, K.bound_elementwise of the terms; ORT may fold s and b first)
        s = layer.weight / np.sqrt(layer.running_var + layer.eps)
        view = (1, -1) + (1,) * (x.ndim - 2)
        terms = (np.abs(x * s.reshape(view)), np.abs(layer.running_mean * s).reshape(view),
                 np.abs(layer.bias).reshape(view))
        K.assert_within(y, expected, K.bound_elementwise(np.float32, *terms), node.name)


@needs_ort
@pytest.mark.parametrize("name", ["shufflenet", "densenet121"])
def test_fold_onnx_batch_norms_light_models(name):
    """Folding BN into the convolutions keeps every BN output tensor (ORT vs ORT).

    ShuffleNet has grouped convolutions and every BN follows a Conv; DenseNet-121 has
    BNs after Concat/pooling, which must stay. (ResNet-50 and Inception-v2 fold too,
    see docs/inference.md; left out here to keep the suite fast.)
    """
    path = _light_path(name)
    model = onnx.load(path)
    before = model.SerializeToString()
    folded = normkit.fold_onnx_batch_norms(model)
    assert model.SerializeToString() == before            # input untouched
    onnx.checker.check_model(folded)
    bn_nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    left = [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    # every BN fed by a Conv is folded; the others (DenseNet's BN after Concat/pooling) stay
    assert len(left) == sum(producers[n.input[0]] != "Conv" for n in bn_nodes)
    names = [n.output[0] for n in bn_nodes]
    a = _run_with_tensors(model, names)
    b = _run_with_tensors(folded, names)
    # both float32 networks within _network_error_bound of the exact one: 2x apart
    growth, magnitude = _network_error_bound(model, names)
    for t in names:
        K.assert_within(b[t], a[t], 2 * growth[t] * magnitude[t], t)


@needs_ort
def test_fold_onnx_batch_norms_conv_transpose():
    """A grouped, strided ConvTranspose + BN folds (checked in ORT; onnx.reference's
    ConvTranspose does not handle groups)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)      # in=4, out=6, groups=2
    params = [(rng.random(6) + 0.5), rng.standard_normal(6), rng.standard_normal(6),
              rng.random(6) + 0.5]
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2, strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    inits = [numpy_helper.from_array(w, "w")] + [
        numpy_helper.from_array(p.astype(np.float32), n) for n, p in zip("sbmv", params)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)],
                              ir_version=8)
    folded = normkit.fold_onnx_batch_norms(model)
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose"]
    assert {t.name for t in folded.graph.initializer} == {"w__bnfolded",
                                                          "BatchNormalization_1__bias"}
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected, got = (ort.InferenceSession(m.SerializeToString(), opts,
                                          providers=["CPUExecutionProvider"])
                     .run(None, {"x": x})[0] for m in (model, folded))
    # folded vs unfolded (BX.bound_folded, u32): each output is a dot product of at most
    # (4 / 2 groups) * 3 * 3 products; the terms' magnitudes from the same ConvTranspose
    # run on |x| and |w|
    abs_graph = helper.make_graph(
        nodes[:1], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.abs(w), "w")])
    abs_model = helper.make_model(abs_graph, opset_imports=[helper.make_opsetid("", 15)],
                                  ir_version=8)
    abs_out = ort.InferenceSession(abs_model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"]).run(
        None, {"x": np.abs(x)})[0].astype(np.float64)
    gamma, beta, mean, var = (p.astype(np.float32).astype(np.float64) for p in params)
    scale = np.abs(gamma) / np.sqrt(var + 1e-5)              # ONNX's default epsilon
    view = (1, -1, 1, 1)
    bound = BX.bound_folded(scale.reshape(view) * abs_out,
                            (scale * np.abs(mean) + np.abs(beta)).reshape(view),
                            2 * 3 * 3, np.float32)
    K.assert_within(got, expected, bound, "folded ConvTranspose")
