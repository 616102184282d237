"""Build normkit layers from PyTorch modules and from the normalization nodes of ONNX models.

torch and onnx are optional: nothing here imports them until a function needs them
(``from_torch`` only touches the module it is given, whose classes are already loaded).

ONNX conventions handled here:

* ``BatchNormalization.momentum`` weights the running value (default 0.9); normkit's
  (torch's) weights the new batch, so the layer gets ``1 - momentum``.
* ``BatchNormalization`` in training mode (opset >= 14, ``training_mode=1``) averages the
  *biased* batch variance into the running variance, torch and normkit the unbiased
  one; the imported layer is in training mode and follows normkit's rule (see
  :mod:`normkit.conventions`).
* ``GroupNormalization``: opset 18 has one scale/bias per *group*, opset 21 one per
  *channel*. Which one applies is decided by the model's ``ai.onnx`` opset; per-group
  values are repeated over the channels of their group (the channel count comes from
  shape inference).
* Parameters may be initializers, ``Constant`` nodes or any constant subgraph (the
  "light" test models compute most weights with ``ConstantOfShape``); constant
  subgraphs are evaluated with ``onnx.reference``.
"""
from __future__ import annotations

import numpy as np

from . import _onnx_safety as _safety
from ._validate import BF16 as _BF16
from ._validate import is_float
from .layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, _torch_to_numpy

__all__ = ["from_torch", "from_onnx", "onnx_constants", "fold_onnx_batch_norms"]


# ============================================================================ torch


def _torch_norm_classes():
    import torch.nn as nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm
    classes = [(_InstanceNorm, "instance"), (_BatchNorm, "batch"),
               (nn.LayerNorm, "layer"), (nn.GroupNorm, "group")]
    if hasattr(nn, "RMSNorm"):
        classes.append((nn.RMSNorm, "rms"))
    return classes


def _torch_kind(module, classes):
    for cls, kind in classes:
        if isinstance(module, cls):
            return kind
    return None


# torch dtype names -> the layer dtypes that keep their values bit for bit
_TORCH_LAYER_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": _BF16,
                       "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def _layer_dtype(module, dtype):
    if dtype is not None:
        return dtype                  # checked by the layer's constructor
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            name = str(t.dtype).replace("torch.", "")
            # other float types (float8 ...): float32 holds their values exactly
            return _TORCH_LAYER_DTYPES.get(name, np.dtype(np.float32))
    return np.dtype(np.float32)


def _convert_torch(module, kind, name, dtype, backend):
    has_uninit = getattr(module, "has_uninitialized_params", None)
    if has_uninit is not None and has_uninit():
        raise ValueError(f"{name or type(module).__name__}: a lazy module whose shape is "
                         "not known yet; run one forward pass in torch first")
    dt = _layer_dtype(module, dtype)
    if kind in ("batch", "instance"):
        cls = BatchNorm if kind == "batch" else InstanceNorm
        layer = cls(module.num_features, module.eps, module.momentum, module.affine,
                    module.track_running_stats, axis=1, dtype=dt, backend=backend)
    elif kind == "layer":
        layer = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                          bias=module.bias is not None, dtype=dt, backend=backend)
    elif kind == "group":
        layer = GroupNorm(module.num_groups, module.num_channels, module.eps,
                          module.affine, dtype=dt, backend=backend)
    else:
        layer = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                        dtype=dt, backend=backend)
    state = {k: _torch_to_numpy(v) for k, v in module.state_dict().items()}
    layer.load_state_dict(state, strict=True)
    layer.train(module.training)
    layer.name = name or None
    return layer


def from_torch(module, *, dtype=None, backend=None):
    """normkit layers equivalent to a PyTorch normalization module, or to all of a model's.

    Parameters
    ----------
    module : torch.nn.Module
        A ``BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``), ``InstanceNorm1d/2d/3d``,
        ``LayerNorm``, ``GroupNorm`` or ``RMSNorm``; or any module containing some.
    dtype : numpy dtype, optional
        dtype of the new layers' parameters and statistics (default: the module's:
        float16 and bfloat16 modules give float16 and ``ml_dtypes.bfloat16`` layers,
        their values copied bit for bit).
    backend : str, optional
        ``backend=`` of the new layers.

    Returns
    -------
    Norm or dict
        For a normalization module, its normkit layer; for any other module, a dict
        ``qualified name -> layer`` (``model.named_modules()`` order) of every
        normalization submodule, possibly empty.

    Weights, biases, running statistics and ``num_batches_tracked`` are copied (not
    shared), together with ``eps``, ``momentum`` (``None`` stays ``None``), ``affine``,
    ``track_running_stats`` and the train/eval mode. Channels are on axis 1, as torch.
    """
    if not (hasattr(module, "named_modules") and hasattr(module, "state_dict")):
        raise TypeError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    classes = _torch_norm_classes()
    kind = _torch_kind(module, classes)
    if kind is not None:
        return _convert_torch(module, kind, "", dtype, backend)
    if next(module.children(), None) is None:
        raise TypeError(f"from_torch: {type(module).__name__} is not a normalization "
                        "module and has no submodules")
    out = {}
    for name, sub in module.named_modules():
        sub_kind = _torch_kind(sub, classes)
        if sub_kind is not None:
            out[name] = _convert_torch(sub, sub_kind, name, dtype, backend)
    return out


# ============================================================================ ONNX
# Models may come from anywhere: _onnx_safety loads and checks them (the trust model is
# in its docstring and in docs/inference.md).
_import_onnx = _safety.import_onnx
_load_model = _safety.load_model


class _NotConstant(ValueError):
    """A parameter that depends on a graph input: the node cannot become a layer."""


def _onnx_opset(model):
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


class _Constants:
    """Values of a graph's constant tensors, computed on demand and cached."""

    def __init__(self, model, max_constant_elements=None):
        from onnx import numpy_helper
        self._nh = numpy_helper
        self._model = model
        self._limit = _safety.constant_limit(model, max_constant_elements)
        graph = model.graph
        self._init = {t.name: t for t in graph.initializer}
        self._producer = {o: n for n in graph.node for o in n.output if o}
        self._values = {}
        self._busy = set()          # names being evaluated (a cycle would recurse forever)

    def __contains__(self, name):
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __getitem__(self, name):
        if name in self._values:
            return self._values[name]
        if name in self._init:
            value = self._nh.to_array(self._init[name])
        elif name in self._producer:
            if name in self._busy:
                raise ValueError(f"tensor {name!r} depends on itself: the graph has a "
                                 "cycle")
            self._busy.add(name)
            try:
                value = self._evaluate(self._producer[name], name)
            finally:
                self._busy.discard(name)
        else:
            raise KeyError(f"{name!r} is a graph input, not a constant")
        self._values[name] = value
        return value

    def _evaluate(self, node, name):
        if node.op_type == "Identity":
            return self[node.input[0]]
        if node.op_type == "Constant":
            from onnx import helper
            attr = node.attribute[0]
            value = helper.get_attribute_value(attr)
            if attr.name in ("value", "sparse_value"):
                return self._nh.to_array(value)
            return np.asarray(value)
        inputs = [self[i] if i else None for i in node.input]   # KeyError if not constant
        from onnx.reference import ReferenceEvaluator
        opsets = {imp.domain: imp.version for imp in self._model.opset_import}
        feeds = {i: v for i, v in zip(node.input, inputs, strict=True) if i}
        _safety.check_output_size(node, feeds, opsets, self._limit)
        evaluator = ReferenceEvaluator(node, opsets=opsets)
        outputs = evaluator.run(None, feeds)
        for out_name, out in zip(node.output, outputs, strict=False):
            if out_name:
                self._values[out_name] = np.asarray(out)
        return self._values[name]


def onnx_constants(model_or_path, names=None, *, base_dir=None,
                   max_constant_elements=None):
    """Values of constant tensors of an ONNX graph, as NumPy arrays.

    Parameters
    ----------
    model_or_path : onnx.ModelProto, str, os.PathLike or bytes
    names : iterable of str, optional
        Which tensors (default: every initializer and every output of a node whose
        inputs are all constant).
    base_dir, max_constant_elements : keyword-only
        As in :func:`from_onnx`.

    Returns
    -------
    dict name -> ndarray
        Tensors that depend on a graph input (other than one with an initializer)
        are left out.
    """
    model = _load_model(model_or_path, base_dir)
    consts = _Constants(model, max_constant_elements)
    if names is None:
        names = [t.name for t in model.graph.initializer]
        names += [o for n in model.graph.node for o in n.output if o]
    return {name: consts[name] for name in names if name in consts}


class _OnnxNodeContext:
    def __init__(self, model, dtype, backend, max_constant_elements=None):
        self.model = model
        self.opset = _onnx_opset(model)
        self.consts = _Constants(model, max_constant_elements)
        self.dtype = dtype
        self.backend = backend
        self._shapes = None

    def param(self, node, index, what, required=True):
        """The constant value of input ``index``: a float array, or None if optional."""
        if index >= len(node.input) or not node.input[index]:
            if required:
                raise ValueError(f"{node.op_type} node {node.name!r}: expected input "
                                 f"{index} ({what}), got a node with {len(node.input)} "
                                 f"input(s) {list(node.input)}")
            return None
        name = node.input[index]
        try:
            value = self.consts[name]
        except KeyError:
            raise _NotConstant(f"{node.op_type} node {node.name!r}: {what} ({name!r}) is "
                               "not a constant of the graph (it depends on a graph "
                               "input); normkit layers need fixed parameters") from None
        value = np.asarray(value)
        if not is_float(value.dtype):
            raise ValueError(f"{node.op_type} node {node.name!r}: {what}: expected a float "
                             f"tensor, got dtype {value.dtype}")
        return value

    def channel_params(self, node, named, expected=None):
        """Check 1-D per-channel parameters: all of one shape (C,), C = the input's.

        ``named`` is [(what, array or None)]; ``expected`` a count they must have
        instead of the channel count (GroupNormalization-18: one per group).
        """
        shape = self.input_shape(node)
        channels = shape[1] if shape and len(shape) >= 2 and shape[1] else None
        first = named[0][1]
        if expected is None:
            expected = channels or (first.shape[0] if first.ndim == 1 else None)
        if expected is None:
            raise ValueError(f"{node.op_type} node {node.name!r}: {named[0][0]}: expected a "
                             f"1-D tensor (one value per channel), got shape {first.shape}")
        for what, a in named:
            if a is not None and (a.ndim != 1 or a.shape[0] != expected):
                source = (f"the channel count of input {node.input[0]!r} of shape "
                          f"{shape}" if channels is not None else f"{named[0][0]}")
                raise ValueError(f"{node.op_type} node {node.name!r}: {what}: expected "
                                 f"shape ({expected},) (from {source}), got shape {a.shape}")
        return expected

    def input_shape(self, node):
        """Shape of the node's first input from shape inference (None dims unknown)."""
        if self._shapes is None:
            from onnx import shape_inference
            try:
                inferred = shape_inference.infer_shapes(self.model)
            except Exception:           # models beyond the checker's reach: no shapes
                inferred = self.model
            g = inferred.graph
            self._shapes = {}
            for vi in list(g.input) + list(g.value_info) + list(g.output):
                tt = vi.type.tensor_type
                if tt.HasField("shape"):
                    self._shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value")
                                                  else None for d in tt.shape.dim)
        return self._shapes.get(node.input[0])

    def layer_dtype(self, *arrays):
        if self.dtype is not None:
            return np.dtype(self.dtype)
        for a in arrays:       # float16 / bfloat16 nodes stay 16-bit (issue 13)
            if a is not None and (a.dtype == _BF16 or
                                  (a.dtype.kind == "f" and a.dtype.itemsize in (2, 4, 8))):
                return a.dtype
        return np.dtype(np.float32)


def _attrs(node):
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set(layer, **values):
    for name, value in values.items():
        if value is not None:
            target = layer._params.get(name)
            if target is None:
                target = layer._buffers[name]
            target[...] = np.broadcast_to(value, target.shape)
    return layer


def _onnx_batch_norm(node, ctx):
    a = _attrs(node)
    if a.get("spatial", 1) != 1:
        raise ValueError(f"BatchNormalization node {node.name!r}: spatial=0 (statistics "
                         "per activation, opset < 9) is not supported")
    scale, bias = ctx.param(node, 1, "scale"), ctx.param(node, 2, "B")
    mean, var = ctx.param(node, 3, "mean"), ctx.param(node, 4, "var")
    channels = ctx.channel_params(node, [("scale", scale), ("B", bias), ("mean", mean),
                                         ("var", var)])
    if float(a.get("epsilon", 1e-5)) < 0:
        raise ValueError(f"BatchNormalization node {node.name!r}: epsilon: expected a "
                         f"number >= 0, got {a['epsilon']}")
    layer = BatchNorm(channels, float(a.get("epsilon", 1e-5)),
                      1.0 - float(a.get("momentum", 0.9)), affine=True,
                      track_running_stats=True, axis=1,
                      dtype=ctx.layer_dtype(scale, mean), backend=ctx.backend)
    _set(layer, weight=scale, bias=bias, running_mean=mean, running_var=var)
    return layer.train(bool(a.get("training_mode", 0)))


def _onnx_instance_norm(node, ctx):
    a = _attrs(node)
    scale, bias = ctx.param(node, 1, "scale"), ctx.param(node, 2, "B")
    channels = ctx.channel_params(node, [("scale", scale), ("B", bias)])
    layer = InstanceNorm(channels, float(a.get("epsilon", 1e-5)), affine=True,
                         track_running_stats=False, axis=1, dtype=ctx.layer_dtype(scale),
                         backend=ctx.backend)
    return _set(layer, weight=scale, bias=bias).eval()


def _onnx_group_norm(node, ctx):
    a = _attrs(node)
    groups = a.get("num_groups")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"GroupNormalization node {node.name!r}: num_groups: expected a "
                         f"positive int attribute, got {groups!r}")
    scale, bias = ctx.param(node, 1, "scale"), ctx.param(node, 2, "bias")
    if ctx.opset >= 21:          # GroupNormalization-21: one scale per channel
        channels = ctx.channel_params(node, [("scale", scale), ("bias", bias)])
    else:                        # GroupNormalization-18: one scale per group
        ctx.channel_params(node, [("scale", scale), ("bias", bias)], expected=groups)
        shape = ctx.input_shape(node)
        channels = None if not shape or len(shape) < 2 else shape[1]
        if not channels:
            raise ValueError(f"GroupNormalization-18 node {node.name!r}: the channel count "
                             "of its input is unknown (scale/bias are per group in opset "
                             "18); give the model static input shapes or use opset 21")
        per = channels // groups
        scale = np.repeat(scale, per)
        bias = np.repeat(bias, per)
    if channels % groups:
        raise ValueError(f"GroupNormalization node {node.name!r}: num_groups: expected a "
                         f"divisor of the {channels} channels, got {groups}")
    layer = GroupNorm(groups, channels, float(a.get("epsilon", 1e-5)), affine=True, axis=1,
                      dtype=ctx.layer_dtype(scale), backend=ctx.backend)
    return _set(layer, weight=scale, bias=bias).eval()


def _normalized_shape(node, ctx, axis, scale):
    """The trailing shape LayerNormalization/RMSNormalization normalizes over.

    The input's trailing dims from shape inference when they are known (the scale
    must broadcast to them); otherwise, for ``axis=-k`` with a k-dimensional scale,
    the scale's shape.
    """
    shape = ctx.input_shape(node)
    if shape is not None and -len(shape) <= axis < len(shape) and all(shape[axis:]):
        return tuple(shape[axis:])
    if axis < 0 and scale.ndim == -axis:
        return tuple(scale.shape)
    raise ValueError(f"{node.op_type} node {node.name!r}: cannot tell the normalized "
                     f"shape (axis={axis}, scale shape {scale.shape}, input shape "
                     f"{shape}); give the model static input shapes")


def _broadcasts_to(shape, target):
    try:
        return len(shape) <= len(target) and np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _check_broadcast(node, ns, **params):
    """LayerNormalization/RMSNormalization parameters must broadcast to ``ns``."""
    for what, a in params.items():
        if a is not None and not _broadcasts_to(a.shape, ns):
            raise ValueError(f"{node.op_type} node {node.name!r}: {what}: expected a shape "
                             f"that broadcasts to the normalized shape {ns}, got shape "
                             f"{a.shape}")


def _onnx_layer_norm(node, ctx):
    a = _attrs(node)
    axis = int(a.get("axis", -1))
    scale, bias = ctx.param(node, 1, "Scale"), ctx.param(node, 2, "B", required=False)
    ns = _normalized_shape(node, ctx, axis, scale)
    _check_broadcast(node, ns, Scale=scale, B=bias)
    layer = LayerNorm(ns, float(a.get("epsilon", 1e-5)), True, bias=bias is not None,
                      dtype=ctx.layer_dtype(scale), backend=ctx.backend)
    return _set(layer, weight=scale, bias=bias).eval()


def _onnx_rms_norm(node, ctx):
    a = _attrs(node)
    axis = int(a.get("axis", -1))
    scale = ctx.param(node, 1, "scale")
    ns = _normalized_shape(node, ctx, axis, scale)
    _check_broadcast(node, ns, scale=scale)
    layer = RMSNorm(ns, float(a.get("epsilon", 1e-5)), True,
                    dtype=ctx.layer_dtype(scale), backend=ctx.backend)
    return _set(layer, weight=scale).eval()


_ONNX_CONVERTERS = {
    "BatchNormalization": _onnx_batch_norm,
    "InstanceNormalization": _onnx_instance_norm,
    "GroupNormalization": _onnx_group_norm,
    "LayerNormalization": _onnx_layer_norm,
    "RMSNormalization": _onnx_rms_norm,
}


def _node_names(graph):
    """A unique name per node: its own, or ``<op_type>_<index>`` when empty or repeated."""
    seen, names = set(), []
    for i, node in enumerate(graph.node):
        name = node.name if node.name and node.name not in seen else \
            f"{node.name or node.op_type}_{i}"
        seen.add(name)
        names.append(name)
    return names


def from_onnx(model_or_path, *, dtype=None, backend=None, base_dir=None,
              max_constant_elements=None):
    """normkit layers for the normalization nodes of an ONNX model (needs ``onnx``).

    Parameters
    ----------
    model_or_path : onnx.ModelProto, str, os.PathLike or bytes
        The model, a path to it (external data next to it is loaded) or its bytes.
    dtype : numpy dtype, optional
        dtype of the layers' parameters and statistics (default: the node's).
    backend : str, optional
        ``backend=`` of the new layers.
    base_dir : str or os.PathLike, optional
        Folder of the model's external data files. Default: the model file's folder;
        a model given as bytes or a ``ModelProto`` that uses external data needs it.
        External data is only ever read inside this folder.
    max_constant_elements : int, optional
        Cap on the elements of one tensor computed from a constant subgraph (default
        ``2**24``, or the largest initializer the model stores if that is larger).

    The model is untrusted input: it is checked with ``onnx.checker`` (full check)
    and normkit's own checks before anything is computed, and malformed models raise
    ``ValueError``. See "Trust model" in ``docs/inference.md``.

    Returns
    -------
    dict
        Node name -> layer, in graph order, for every ``BatchNormalization``,
        ``InstanceNormalization``, ``GroupNormalization``, ``LayerNormalization`` and
        ``RMSNormalization`` node of the main graph (``<op_type>_<index>`` for unnamed
        nodes). Layers are in eval mode, except BatchNormalization nodes with
        ``training_mode=1``. Channels are on axis 1, as in ONNX.
    """
    model = _load_model(model_or_path, base_dir)
    ctx = _OnnxNodeContext(model, dtype, backend, max_constant_elements)
    layers = {}
    for node, name in zip(model.graph.node, _node_names(model.graph), strict=True):
        convert = _ONNX_CONVERTERS.get(node.op_type)
        if convert is None or node.domain not in ("", "ai.onnx"):
            continue
        layer = convert(node, ctx)
        layer.name = name
        layers[name] = layer
    return layers


def fold_onnx_batch_norms(model_or_path, *, base_dir=None, max_constant_elements=None):
    """A copy of an ONNX model with every foldable BatchNormalization folded away.

    A ``BatchNormalization`` node (inference mode) is folded into the ``Conv`` or
    ``ConvTranspose`` node that feeds it when that node's output feeds nothing else, is
    not a graph output, and its weight and bias are constants. The folded weights
    (:func:`normkit.fold_batch_norm`) become new initializers named
    ``<weight>__bnfolded`` / ``<bn node>__bias``; nodes and initializers left unused are
    removed. Returns the new ``onnx.ModelProto`` (the input is not modified).

    The model is checked as by :func:`from_onnx` (same keywords): a malformed model,
    or a malformed BatchNormalization node, raises ``ValueError`` instead of being
    folded.
    """
    model = _load_model(model_or_path, base_dir)
    new = type(model)()
    new.CopyFrom(model)
    graph = new.graph
    ctx = _OnnxNodeContext(new, None, None, max_constant_elements)
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output if o}
    folded = []
    for node, name in zip(list(graph.node), _node_names(graph), strict=True):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        try:       # every BN node is checked, foldable or not: malformed raises ValueError
            bn = _onnx_batch_norm(node, ctx)
        except _NotConstant:                # parameters computed from graph inputs
            continue
        conv = producer.get(node.input[0])
        if (conv is None or conv.op_type not in ("Conv", "ConvTranspose")
                or consumers.get(node.input[0]) != 1 or node.input[0] in outputs
                or len([o for o in node.output if o]) != 1 or bn.training):
            continue
        try:
            w = ctx.consts[conv.input[1]]
            b = ctx.consts[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else None
        except KeyError:                    # a Conv weight computed from graph inputs
            continue
        _fold_into_conv(new, conv, node, name, w, b, bn)
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _remove_unused(graph)
    return new


def _fold_into_conv(model, conv, node, name, w, b, bn):
    """Give ``conv`` the folded weight and bias and the BN node's output."""
    from onnx import helper, numpy_helper

    from .folding import fold_batch_norm
    graph = model.graph
    transposed = conv.op_type == "ConvTranspose"
    groups = int(_attrs(conv).get("group", 1))
    new_w, new_b = fold_batch_norm(w, b, bn, axis=1 if transposed else 0,
                                   groups=groups if transposed else 1)
    w_name, b_name = conv.input[1] + "__bnfolded", name + "__bias"
    for array, tname in ((new_w, w_name), (new_b, b_name)):
        tensor = numpy_helper.from_array(array, tname)
        graph.initializer.append(tensor)
        if model.ir_version < 4:     # IR < 4: every initializer is a graph input too
            graph.input.append(helper.make_tensor_value_info(
                tname, tensor.data_type, array.shape))
    while len(conv.input) < 3:
        conv.input.append("")
    conv.input[1], conv.input[2] = w_name, b_name
    conv.output[0] = node.output[0]


def _names_used(graph):
    """Every tensor name read by a node of ``graph`` or of its subgraphs (If, Loop, ...)."""
    from onnx import AttributeProto
    used = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                used |= _names_used(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    used |= _names_used(g)
    return used


def _remove_unused(graph):
    """Drop nodes whose outputs nobody uses, then initializers nobody uses."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | _names_used(graph)
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = outputs | _names_used(graph)
    unused = {t.name for t in graph.initializer if t.name not in used}
    for t in [t for t in graph.initializer if t.name in unused]:
        graph.initializer.remove(t)
    for vi in [vi for vi in graph.input if vi.name in unused]:   # IR < 4 lists them too
        graph.input.remove(vi)
