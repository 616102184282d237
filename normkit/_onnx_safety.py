"""Loading ONNX models that may be malformed or hostile (``from_onnx`` and friends).

What is checked, in order (the trust model, documented in ``docs/inference.md``):

1. The input is an ONNX model at all: an empty file or empty bytes, bytes that do not
   parse, or a message without a graph is a ``ValueError``.
2. External data is read only by ``onnx.external_data_helper``, only relative to the
   model's own folder (or the ``base_dir`` the caller passes for a model given as
   bytes or a ``ModelProto``), which refuses absolute paths, paths leaving the folder,
   symbolic links and offsets/lengths beyond the file. A model without a folder that
   uses external data is refused unless ``base_dir`` is given; it is never read
   relative to the process's current directory.
3. Declared dimensions are never negative.
4. ``onnx.checker.check_model(full_check=True)``: the schema of every node (input
   counts, attribute types) and strict shape inference, which catches parameters of
   the wrong shape, rank or type (what ONNX Runtime would refuse to load).
5. Constant subgraphs are evaluated only after shape inference of the node with its
   constant inputs has bounded its outputs: at most ``max_constant_elements``
   elements each (or the size of the largest initializer the model itself stores, if
   that is larger), so a tiny file cannot make normkit allocate gigabytes.

The converters then check each normalization node's parameters themselves (count,
rank, shape against the channel count, float dtype) for what the checker lets through.
"""
from __future__ import annotations

import math
import os

import numpy as np

#: Default cap on the elements of one tensor computed from a constant subgraph.
MAX_CONSTANT_ELEMENTS = 2 ** 24

# Ops whose output size depends on the *values* of their inputs or attributes: if
# shape inference cannot bound their output, they are not evaluated.
_GROWING_OPS = {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad",
                "OneHot", "RandomNormal", "RandomUniform", "RandomNormalLike",
                "RandomUniformLike", "Multinomial", "Col2Im", "CenterCropPad", "Reshape",
                "EyeLike", "MatMul", "Gemm", "Einsum", "Scan", "Loop", "If"}


def import_onnx():
    try:
        import onnx
    except ImportError as exc:   # pragma: no cover - exercised only without onnx
        raise ImportError("this function needs the optional 'onnx' package: "
                          "pip install onnx") from exc
    return onnx


# ------------------------------------------------------------------ loading
def load_model(model_or_path, base_dir=None):
    """A checked ``ModelProto`` with its external data (if any) loaded safely.

    A ``ModelProto`` passed in is never modified (a copy is made when external data
    has to be loaded into it).
    """
    onnx = import_onnx()
    if base_dir is not None:
        base_dir = os.fspath(base_dir)
        if not os.path.isdir(base_dir):
            raise ValueError(f"base_dir: expected an existing directory, got {base_dir!r}")
    path = None
    if isinstance(model_or_path, onnx.ModelProto):
        model, source = model_or_path, "the ModelProto"
    elif isinstance(model_or_path, (bytes, bytearray, memoryview)):
        model, source = _parse(bytes(model_or_path), "the model bytes"), "the model bytes"
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        source = repr(path)
        with open(path, "rb") as f:
            model = _parse(f.read(), source)
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(path))
    else:
        raise TypeError("model_or_path: expected an onnx.ModelProto, a path or serialized "
                        f"bytes, got {type(model_or_path).__name__}")
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ValueError(f"{source} is not an ONNX model: it has no graph (ir_version "
                         f"{model.ir_version}); an empty or truncated file parses this way")
    model = _load_external_data(model, base_dir, source)
    check_declared_dims(model.graph)
    _check(model, path)
    return model


def _parse(data, source):
    onnx = import_onnx()
    if not data:
        raise ValueError(f"{source} is empty (0 bytes): not an ONNX model")
    try:
        return onnx.load_model_from_string(data)
    except Exception as exc:           # protobuf's DecodeError and friends
        raise ValueError(f"{source} is not an ONNX model: it does not parse "
                         f"({type(exc).__name__}: {exc})") from None


def _tensors(graph):
    """Every TensorProto stored in ``graph`` and its subgraphs (initializers, attributes)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _load_external_data(model, base_dir, source):
    from onnx import external_data_helper as edh
    external = [t for t in _tensors(model.graph) if edh.uses_external_data(t)]
    if not external:
        return model
    if base_dir is None:
        raise ValueError(f"{source} stores tensor {external[0].name!r} in external data "
                         "but has no folder to read it from; pass base_dir= (the folder "
                         "the external data files are in). normkit never reads external "
                         "data relative to the current directory")
    copy = type(model)()
    copy.CopyFrom(model)
    try:       # onnx checks each location: relative, inside base_dir, no symlink, bounds
        edh.load_external_data_for_model(copy, base_dir)
    except Exception as exc:
        raise ValueError(f"{source}: refused to load external data from {base_dir!r}: "
                         f"{exc}") from None
    return copy


def check_declared_dims(graph):
    """No negative dimension in the graph's declared types or stored tensors."""
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")]
            if any(d < 0 for d in dims):
                raise ValueError(f"tensor {vi.name!r}: expected non-negative dimensions, "
                                 f"got declared shape {_shape_text(tt.shape)}")
    for t in _tensors(graph):
        if any(d < 0 for d in t.dims):
            raise ValueError(f"tensor {t.name!r}: expected non-negative dimensions, got "
                             f"dims {list(t.dims)}")


def _shape_text(shape):
    return "(" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else
                           (d.dim_param or "?") for d in shape.dim) + ")"


def _check(model, path):
    """onnx.checker with strict shape inference; its errors become ValueError.

    Where the checker refuses only for what ONNX Runtime accepts (``_TOLERATED``), the
    same checks run piecewise (every stored tensor, every node against its schema,
    strict shape inference) without those two.
    """
    onnx = import_onnx()
    target = model
    if model.ByteSize() >= 2 ** 31:       # protobuf's limit: check the file instead
        if path is None:
            raise ValueError("the model is larger than 2 GiB in memory; pass its path "
                             "(with its external data next to it) instead")
        target = path
    try:
        onnx.checker.check_model(target, full_check=True)
        return
    except Exception as exc:     # ValidationError, InferenceError (both plain Exceptions)
        error = exc
    if target is model and any(t in str(error) for t in _TOLERATED):
        try:
            _check_piecewise(model)
            return
        except Exception as exc:
            error = exc
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(f"invalid ONNX model (rejected by onnx.checker, as ONNX Runtime "
                     f"would reject it): {first}") from None


# What the checker refuses but ONNX Runtime accepts (and normkit handles): graph inputs
# or outputs without a declared shape, and deprecated ops (GroupNormalization-18).
_TOLERATED = ("Field 'shape' of 'type' is required", "is deprecated in domain_version")


def _check_piecewise(model):
    onnx = import_onnx()
    from onnx import shape_inference
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {imp.domain: imp.version for imp in model.opset_import}
    for tensor in model.graph.initializer:
        onnx.checker.check_tensor(tensor, ctx)
    for node in model.graph.node:
        try:
            onnx.checker.check_node(node, ctx)
        except Exception as exc:
            if _TOLERATED[1] not in str(exc):
                raise
    shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


# ------------------------------------------------------------------ constant folding
def constant_limit(model, max_constant_elements):
    """The cap on one computed constant: the caller's, or the largest stored tensor."""
    if max_constant_elements is None:
        max_constant_elements = MAX_CONSTANT_ELEMENTS
    if isinstance(max_constant_elements, bool) or not isinstance(
            max_constant_elements, (int, np.integer)) or max_constant_elements < 1:
        raise ValueError("max_constant_elements: expected a positive int, got "
                         f"{max_constant_elements!r}")
    stored = max((math.prod(t.dims) for t in model.graph.initializer), default=0)
    return max(int(max_constant_elements), stored)


def check_output_size(node, inputs, opsets, limit):
    """Refuse to evaluate ``node`` when its outputs may exceed ``limit`` elements.

    ``inputs`` maps input names to their (constant) values. The bound comes from ONNX
    shape inference of the node alone, with its small inputs given as data (so that
    value-dependent shapes, as ConstantOfShape's, are inferred without computing them).
    """
    shapes = _infer_node_shapes(node, inputs, opsets)
    for out in node.output:
        if not out:
            continue
        shape = shapes.get(out)
        if shape is None or any(d is None for d in shape):
            if node.op_type in _GROWING_OPS:
                raise ValueError(f"{node.op_type} node {node.name!r}: cannot bound the size "
                                 f"of its output {out!r} before computing it (shape "
                                 "inference gives no static shape); normkit does not "
                                 "evaluate it")
            continue
        size = math.prod(shape)
        if size > limit:
            raise ValueError(f"{node.op_type} node {node.name!r}: its constant output "
                             f"{out!r} would have shape {tuple(shape)} ({size} elements), "
                             f"more than the limit of {limit}; pass a larger "
                             "max_constant_elements= if the model is trusted")


def _infer_node_shapes(node, inputs, opsets):
    from onnx import TensorProto, helper, numpy_helper, shape_inference
    inits, graph_inputs = [], []
    for name, value in inputs.items():
        value = np.asarray(value)
        if value.size <= 4096 and value.dtype != object:    # shape-like: give the data
            inits.append(numpy_helper.from_array(value, name))
        else:                                               # big: its type and shape only
            elem = helper.np_dtype_to_tensor_dtype(value.dtype) if value.dtype != object \
                else TensorProto.UNDEFINED
            graph_inputs.append(helper.make_tensor_value_info(name, elem, value.shape))
    outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
               for o in node.output if o]
    graph = helper.make_graph([node], "bound", graph_inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in opsets.items()])
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    shapes = {}
    for vi in list(inferred.graph.output) + list(inferred.graph.value_info):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in tt.shape.dim]
    return shapes
