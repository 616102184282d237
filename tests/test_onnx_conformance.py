"""ONNX conformance: the official single-node ONNX test cases, run through normkit.

Every single-node BatchNormalization, LayerNormalization, GroupNormalization,
InstanceNormalization and RMSNormalization case that
``onnx.backend.test.case.node.collect_testcases()`` produces is mapped onto the normkit
functional API and compared with the expected outputs stored in the case. The
count of cases is asserted per operator, so a case silently dropped (or a new one
added by a newer onnx) fails loudly instead of passing unnoticed.

Mapping decisions (ONNX semantics -> normkit's torch semantics):

* BatchNormalization (opset 15), inputs ``X, scale, B, input_mean, input_var``:
  - inference (``training_mode=0``): ``batch_norm(x, mean, var, scale, B,
    training=False, eps=epsilon)``.
  - ``training_mode=1``: ONNX updates
    ``running = momentum * running + (1 - momentum) * batch`` (default momentum 0.9),
    torch/normkit update ``running = (1 - m) * running + m * batch``, so normkit gets
    ``m = 1 - onnx_momentum``. Y and running_mean then map directly.
    running_var does NOT map directly: ONNX's reference (and spec) blends the
    *biased* batch variance (``x.var()``), while torch/normkit blend the *unbiased*
    one (``n / (n - 1)`` times larger), as API.md requires. The test therefore:
    (1) checks normkit's own in-place update against the torch rule using the
    unbiased batch variance, and (2) computes the ONNX output explicitly from
    normkit's unbiased batch variance, ``var_b = unbiased * (n - 1) / n``,
    ``onnx_var = momentum * var0 + (1 - momentum) * var_b``, and compares that with
    the ONNX expected output. The biased variance normkit actually normalized with is
    also checked (``1 / rstd**2 - eps == var_b``).
* LayerNormalization (opset 17): ``axis`` -> ``normalized_shape = x.shape[axis:]``
  (negative axis + rank). Outputs Mean / InvStdDev have ONNX's keepdims shape
  ``x.shape[:axis] + (1,) * (rank - axis)``; normkit's ``return_stats`` gives
  ``x.shape[:axis]``, which the test reshapes (and checks the element count of) before
  comparing. ``stash_type=1`` (the only value in the cases) means float32 statistics;
  normkit accumulates statistics in float64 for float32 input, which is at least as
  accurate, so it is compared at float32 tolerance.
* GroupNormalization: opset 21 has per-channel ``scale``/``bias`` (shape (C,)), passed
  straight to ``group_norm``; opset 18 (deprecated) had one value per *group*, which
  the mapping repeats ``C // num_groups`` times to get per-channel parameters. onnx
  1.23 ships only opset-21 cases, so an extra test builds an opset-18 model and
  checks the mapping against ``onnx.reference.ReferenceEvaluator``.
* InstanceNormalization (opset 22): ``instance_norm(x, weight=scale, bias=B,
  use_input_stats=True, eps=epsilon)``.
* RMSNormalization (opset 23): ``axis`` as for LayerNormalization; ONNX's default
  ``epsilon`` is 1e-5 (normkit's ``eps=None`` would mean finfo eps), so epsilon is
  always passed explicitly, defaulting to 1e-5.
* dtypes: float32/float64 expected outputs are compared at their precision; float16
  at float16 tolerance; bfloat16 (and any other dtype normkit does not take) is
  skipped with a reason naming the dtype. onnx 1.23 ships float32 cases only.
"""
from collections import Counter

import _bounds_extra as BX
import _cases as K
import numpy as np
import pytest

import normkit

onnx = pytest.importorskip("onnx")
from onnx import helper  # noqa: E402
from onnx.backend.test.case.node import collect_testcases  # noqa: E402

OPS = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
       "InstanceNormalization", "RMSNormalization")

# What onnx 1.23 produces; a different onnx version may legitimately differ, but then
# this table must be updated consciously (a silent drop must not pass).
EXPECTED_COUNTS = {
    "BatchNormalization": 4,       # example, epsilon, and both in training_mode
    "LayerNormalization": 19,      # 4-D x 8 axes, default axis, 2-D x 4, 3-D epsilon x 6
    "GroupNormalization": 2,       # example, epsilon (opset 21)
    "InstanceNormalization": 2,    # example, epsilon
    "RMSNormalization": 19,        # 4-D x 8 axes, default axis, 2-D x 4, 3-D epsilon x 6
}
EXPECTED_TOTAL = 46


def _collect():
    import warnings
    with warnings.catch_warnings():        # the collection of *other* ops warns (casts)
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    selected = {}
    for case in cases:
        nodes = case.model.graph.node
        if len(nodes) == 1 and nodes[0].op_type in OPS and nodes[0].domain in ("", "ai.onnx"):
            assert case.name not in selected, f"duplicate case name {case.name}"
            selected[case.name] = case
    return selected


CASES = _collect()
CASE_NAMES = sorted(CASES)


def _opset(model):
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    raise AssertionError("model has no default-domain opset_import")


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _norm_tol(dtype, x, axes, mean, rstd, y_ref, w=None, b=None):
    """``assert_allclose`` kwargs for a normalized output: ONNX's expected values come
    from its NumPy reference evaluated in the data dtype (float32 accumulation for
    float32/float16 data), normkit's from float64 statistics: K.tol_normalized for two
    implementations in ``dtype``, n = values per statistic, conditioning from the
    statistics, scale = max(1, |w|, |b|, |y|)."""
    n = max(1, int(np.prod([x.shape[a] for a in axes])))
    scale = max([1.0] + [float(np.abs(np.asarray(a, np.float64)).max(initial=0.0))
                         for a in (w, b, y_ref) if a is not None])
    return K.tol_normalized(dtype, n, K.conditioning(mean, rstd), scale)


def _check_dtypes(arrays):
    for a in arrays:
        dt = np.asarray(a).dtype
        if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
            pytest.skip(f"ONNX case uses dtype {dt} (e.g. bfloat16), which normkit does "
                        "not accept as input")


def _close(actual, expected, what, tol):
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                               err_msg=what, **tol)


def _inputs(node, values):
    """name -> array for the node's inputs ('' = omitted optional input)."""
    names = list(node.input)
    assert len(values) == sum(1 for n in names if n), "inputs do not match the node"
    it = iter(values)
    return [next(it) if n else None for n in names]


# ---------------------------------------------------------------------------- mappings
def _run_batch_norm(node, attrs, opset, ins, outs, backend):
    x, scale, b, mean0, var0 = _inputs(node, ins)
    eps = attrs.get("epsilon", 1e-5)
    onnx_momentum = attrs.get("momentum", 0.9)
    training = bool(attrs.get("training_mode", 0))
    x_before = x.copy()
    if not training:
        assert len(outs) == 1
        y = normkit.batch_norm(x, mean0, var0, scale, b, training=False, eps=eps,
                               backend=backend)
        assert y.dtype == x.dtype
        rstd0 = 1 / np.sqrt(var0.astype(np.float64) + eps)    # no reduction: n = 1
        _close(y, outs[0], "Y", _norm_tol(x.dtype, x, (), mean0, rstd0, outs[0], scale, b))
        np.testing.assert_array_equal(x, x_before)
        return

    torch_momentum = 1.0 - onnx_momentum
    run_mean, run_var = mean0.copy(), var0.copy()
    y, bmean, rstd = normkit.batch_norm(x, run_mean, run_var, scale, b, training=True,
                                        momentum=torch_momentum, eps=eps, backend=backend,
                                        return_stats=True)
    np.testing.assert_array_equal(x, x_before)
    axes = (0,) + tuple(range(2, x.ndim))
    _close(y, outs[0], "Y", _norm_tol(x.dtype, x, axes, bmean, rstd, outs[0], scale, b))
    assert len(outs) == 3, "training-mode cases check running_mean and running_var"
    # running_mean: same rule after the momentum conversion. The peer's batch mean is an
    # n-term sum in the data dtype (gamma(n, u_d) mean|x|, both sides), the blend and the
    # store into running_mean's dtype a few roundings of |result|
    n = x.size // x.shape[1]
    u_d = K.unit_roundoff(x.dtype)
    abs_mean = np.abs(x.astype(np.float64)).mean(axis=axes)
    _close(run_mean, outs[1], "running_mean", dict(rtol=8 * K.unit_roundoff(run_mean.dtype),
           atol=float(np.max(2 * K.gamma(n, u_d) * (1 - onnx_momentum) * abs_mean))))

    # running_var: torch (normkit) blends the unbiased batch variance; ONNX the biased
    # one. Obtain normkit's unbiased batch variance with momentum 1 (running <- batch).
    n = x.size // x.shape[1]
    unbiased = np.zeros(x.shape[1], np.float64)
    normkit.batch_norm(x, np.zeros(x.shape[1]), unbiased, training=True, momentum=1.0,
                       eps=eps, backend=backend)
    # (1) normkit's in-place update followed the torch rule
    expected_torch = (1 - torch_momentum) * var0.astype(np.float64) + torch_momentum * unbiased
    # (same float64 inputs: a blend of two terms, stored in running_var's dtype: a few
    # roundings of the terms' magnitudes)
    K.assert_within(run_var, expected_torch, K.bound_elementwise(
        run_var.dtype, (1 - torch_momentum) * var0, torch_momentum * unbiased), "running_var")
    # (2) the variance normkit normalized with is the biased one: two float64 reductions of
    # the same data (K.bound_m2 / n each side) and 1/rstd^2 - eps a few roundings of var+eps,
    # plus rstd's own rounding to its dtype (relative u_r, doubled by the square)
    biased = unbiased * (n - 1) / n
    rows = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
    u_r = K.unit_roundoff(rstd.dtype)
    var_bound = BX.bound_merged_var(rows, 1) + (8 * K.U64 + 4 * u_r) * (biased + eps)
    K.assert_within(1.0 / rstd.astype(np.float64) ** 2 - eps, biased, var_bound, "biased var")
    # (3) ONNX's running_var, computed explicitly from normkit's statistics
    onnx_var = onnx_momentum * var0.astype(np.float64) + (1 - onnx_momentum) * biased
    # the peer's batch variance is centered, in the data dtype (BX.bound_merged_var with
    # u_d), weighted by 1 - momentum; plus the final rounding to outs[2]'s dtype
    peer_var = BX.bound_merged_var(rows, 1, u_d) * (1 - onnx_momentum)
    K.assert_within(onnx_var, outs[2], peer_var + 8 * K.unit_roundoff(outs[2].dtype)
                    * np.abs(onnx_var), "running_var (ONNX, biased batch variance)")
    # and the direct torch-style value is measurably different, documenting why (3)
    # is needed: the n/(n-1) factor is 120/119 here
    # (by far more than the bound the ONNX value was matched to above)
    assert np.abs(run_var - outs[2]).max() > 100 * np.max(
        peer_var + 8 * K.unit_roundoff(outs[2].dtype) * np.abs(onnx_var))


def _ln_axis(attrs, x):
    axis = attrs.get("axis", -1)
    return axis + x.ndim if axis < 0 else axis


def _run_layer_norm(node, attrs, opset, ins, outs, backend):
    x, scale, b = (_inputs(node, ins) + [None])[:3]
    axis = _ln_axis(attrs, x)
    eps = attrs.get("epsilon", 1e-5)
    assert attrs.get("stash_type", 1) == 1, "only stash_type=1 (float32 stats) is mapped"
    ns = x.shape[axis:]
    keep = x.shape[:axis] + (1,) * (x.ndim - axis)
    x_before = x.copy()
    y, mean, rstd = normkit.layer_norm(x, ns, scale, b, eps, backend=backend,
                                       return_stats=True)
    np.testing.assert_array_equal(x, x_before)
    assert y.dtype == x.dtype
    axes = tuple(range(axis, x.ndim))
    _close(y, outs[0], "Y", _norm_tol(x.dtype, x, axes, mean, rstd, outs[0], scale, b))
    # the statistics: the peer reduces in the data dtype (stash_type=1: float32), so
    # mean within 2 gamma(n, u_d) mean|x| (+ its float32 store), InvStdDev within
    # rstd (var_err / 2 (var + eps) + 8 u_d), var_err the centered-variance bound with u_d
    rows = x.astype(np.float64).reshape(int(np.prod(x.shape[:axis])), -1)
    u_d = K.unit_roundoff(x.dtype)
    m_bound = BX.bound_merged_mean(np.abs(rows).mean(axis=1), rows.shape[1], u_d) + \
        2 * u_d * np.abs(rows.mean(axis=1))
    var = rows.var(axis=1)
    r_bound = (1 / np.sqrt(var + eps)) * (
        0.5 * BX.bound_merged_var(rows, 1, u_d) / (var + eps) + 8 * u_d)
    names = [o for o in node.output]
    for name, stat, i, bound in (("Mean", mean, 1, m_bound), ("InvStdDev", rstd, 2, r_bound)):
        if len(names) > i and names[i]:
            assert stat.shape == x.shape[:axis]
            assert outs[i].shape == keep, (outs[i].shape, keep)
            K.assert_within(stat.reshape(keep), outs[i], bound.reshape(keep), name)


def _run_rms_norm(node, attrs, opset, ins, outs, backend):
    x, scale = _inputs(node, ins)
    axis = _ln_axis(attrs, x)
    eps = attrs.get("epsilon", 1e-5)     # ONNX default, not normkit's finfo eps
    assert attrs.get("stash_type", 1) == 1
    x_before = x.copy()
    y, _, rstd = normkit.rms_norm(x, x.shape[axis:], scale, eps, backend=backend,
                                  return_stats=True)
    np.testing.assert_array_equal(x, x_before)
    assert y.dtype == x.dtype
    _close(y, outs[0], "Y", _norm_tol(x.dtype, x, tuple(range(axis, x.ndim)), None, rstd,
                                      outs[0], scale))


def _group_params(opset, scale, bias, c, groups):
    """ONNX GroupNormalization scale/bias -> normkit's per-channel weight/bias."""
    if opset < 21:   # opset 18: one value per group
        assert scale.shape == (groups,) and bias.shape == (groups,)
        return np.repeat(scale, c // groups), np.repeat(bias, c // groups)
    assert scale.shape == (c,) and bias.shape == (c,)
    return scale, bias


def _run_group_norm(node, attrs, opset, ins, outs, backend):
    x, scale, b = _inputs(node, ins)
    groups = attrs["num_groups"]
    eps = attrs.get("epsilon", 1e-5)
    assert attrs.get("stash_type", 1) == 1
    w, bb = _group_params(opset, scale, b, x.shape[1], groups)
    x_before = x.copy()
    y, mean, rstd = normkit.group_norm(x, groups, w, bb, eps, backend=backend,
                                       return_stats=True)
    np.testing.assert_array_equal(x, x_before)
    assert y.dtype == x.dtype
    # values per statistic: a group of channels x spatial (axes 1.. of one sample / groups)
    tol = _norm_tol(x.dtype, x[:1].reshape(groups, -1), (1,), mean, rstd, outs[0], w, bb)
    _close(y, outs[0], "Y", tol)


def _run_instance_norm(node, attrs, opset, ins, outs, backend):
    x, scale, b = _inputs(node, ins)
    eps = attrs.get("epsilon", 1e-5)
    x_before = x.copy()
    y, mean, rstd = normkit.instance_norm(x, weight=scale, bias=b, use_input_stats=True,
                                          eps=eps, backend=backend, return_stats=True)
    np.testing.assert_array_equal(x, x_before)
    assert y.dtype == x.dtype
    _close(y, outs[0], "Y", _norm_tol(x.dtype, x, tuple(range(2, x.ndim)), mean, rstd,
                                      outs[0], scale, b))


RUNNERS = {
    "BatchNormalization": _run_batch_norm,
    "LayerNormalization": _run_layer_norm,
    "GroupNormalization": _run_group_norm,
    "InstanceNormalization": _run_instance_norm,
    "RMSNormalization": _run_rms_norm,
}


# ---------------------------------------------------------------------------- tests
def test_case_count():
    counts = Counter(case.model.graph.node[0].op_type for case in CASES.values())
    assert dict(counts) == EXPECTED_COUNTS, (
        f"onnx {onnx.__version__} produced {dict(counts)}; expected {EXPECTED_COUNTS}")
    assert len(CASES) == EXPECTED_TOTAL
    # the cases that exercise the tricky parts of the mapping are really there
    for name in ("test_batchnorm_example_training_mode",
                 "test_batchnorm_epsilon_training_mode",
                 "test_layer_normalization_4d_axis0", "test_layer_normalization_default_axis",
                 "test_group_normalization_example", "test_rms_normalization_default_axis",
                 "test_instancenorm_example"):
        assert name in CASES


@pytest.mark.parametrize("name", CASE_NAMES)
def test_onnx_case(name, backend):
    case = CASES[name]
    node = case.model.graph.node[0]
    attrs = _attrs(node)
    opset = _opset(case.model)
    assert case.data_sets, f"{name} has no data"
    for ins, outs in case.data_sets:
        _check_dtypes(list(ins) + list(outs))
        RUNNERS[node.op_type](node, attrs, opset, list(ins), list(outs), backend)


def _reference_model(opset, node, inputs):
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in node.output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [18, 21])
def test_group_norm_opset18_vs_21_mapping(opset, backend, rng):
    """Not a collected case: onnx 1.23 ships only opset-21 GroupNormalization cases, so
    the per-group (opset 18) parameter mapping is checked against ONNX's reference
    evaluator on a model built here."""
    from onnx.reference import ReferenceEvaluator

    c, groups = 6, 3
    x = rng.standard_normal((2, c, 3, 2)).astype(np.float32)
    pshape = (groups,) if opset == 18 else (c,)
    scale = rng.standard_normal(pshape).astype(np.float32)
    bias = rng.standard_normal(pshape).astype(np.float32)
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"],
                            num_groups=groups, epsilon=1e-3)
    model = _reference_model(opset, node, ["x", "scale", "bias"])
    (expected,) = ReferenceEvaluator(model).run(None, {"x": x, "scale": scale, "bias": bias})
    _run_group_norm(node, _attrs(node), opset, [x, scale, bias], [expected], backend)
    if opset == 18:   # per-group parameters really differ from treating them per channel
        with pytest.raises(AssertionError):
            _group_params(21, scale, bias, c, groups)
