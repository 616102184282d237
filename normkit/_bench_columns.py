"""The columns of ``python -m normkit bench``: normkit's backends, the copy floor, the peers.

Each column is an :class:`Impl` whose ``prepare(case, units)`` returns ``(fn, fetch)``
(``fn`` runs the case once; ``fetch`` turns its result into NumPy arrays in the user's
layout) or raises :class:`~normkit._bench_op_base.NotApplicable` with the reason.

PyTorch and ONNX Runtime are imported here, lazily, and only when installed.
"""
from __future__ import annotations

import importlib.util
import re

import numpy as np

from . import _bench_data as D
from ._bench_op_base import NotApplicable, is_16bit, np_dtype
from ._bench_report import PLAIN_NUMPY

__all__ = ["Impl", "backend_impl", "copy_impl", "plain_impl", "torch_impl", "ort_impl",
           "onnx_model", "discover", "short", "unsupported_dtype"]


class Impl:
    """One column: ``prepare(case, units)`` returns ``(fn, fetch)`` or raises NotApplicable."""

    def __init__(self, id, kind, label, prepare, version=""):
        self.id, self.kind, self.label, self.prepare, self.version = (
            id, kind, label, prepare, version)


def short(exc, limit=160):
    """An exception's message on one line, cut to ``limit`` characters."""
    msg = " ".join(str(exc).split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def backend_impl(name):
    def prepare(case, units):
        return D.normkit_runner(case, units, name), D.to_arrays
    return Impl(name, "backend", name, prepare)


def copy_impl():
    def prepare(case, units):
        return D.copy_runner(case, units), None
    return Impl("copy", "floor", "copy", prepare)


def plain_impl():
    def prepare(case, units):
        return D.plain_runner(case, units), D.to_arrays
    return Impl(PLAIN_NUMPY, "peer", PLAIN_NUMPY, prepare, np.__version__)


def torch_impl(threads):
    import torch
    torch.set_num_threads(threads)

    def prepare(case, units):
        try:
            return D.torch_runner(case, units, torch)
        except (RuntimeError, TypeError, KeyError) as exc:
            raise NotApplicable(f"torch cannot run it: {short(exc)}") from exc
    return Impl("torch", "peer", "torch", prepare, torch.__version__)


# ====================================================================== ONNX Runtime
class _Graph:
    """Builds one ONNX graph from the units' nodes (inputs shared by array identity)."""

    def __init__(self, elem):
        self.elem = elem
        self.input_names, self.feed, self.value_infos, self.inits = {}, {}, [], []
        self.nodes, self.outputs = [], []

    def input(self, i, role, arr, is_input):
        from onnx import helper, numpy_helper
        if not is_input:
            name = f"u{i}_{role}"
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        if id(arr) not in self.input_names:  # units that share an array share the input
            name = f"X{len(self.input_names)}"
            self.input_names[id(arr)] = name
            self.feed[name] = arr
            self.value_infos.append(helper.make_tensor_value_info(name, self.elem, arr.shape))
        return self.input_names[id(arr)]

    def add_unit(self, i, node, shape):
        """The unit's node, then its epilogue nodes; the last one writes ``Y{i}``."""
        from onnx import helper
        steps = [(node.op_type, node.inputs, node.domain, node.attrs, node.n_outputs)]
        steps += [(op_type, extra, "", {}, 1) for op_type, extra in node.epilogue]
        y: str | None = None
        for k, (op_type, inputs, domain, attrs, n_out) in enumerate(steps):
            names = ([] if y is None else [y]) + [self.input(i, *inp) for inp in inputs]
            y = f"Y{i}" if k == len(steps) - 1 else f"u{i}_y{k}"
            outs = [y] + [f"u{i}_s{k}_extra{j}" for j in range(1, n_out)]
            self.nodes.append(helper.make_node(op_type, names, outs, domain=domain, **attrs))
        assert y is not None                     # steps is never empty
        self.outputs.append(helper.make_tensor_value_info(y, self.elem, shape))


def onnx_model(case, units):
    """One ONNX graph holding every unit of the case; returns (model, first node, feed,
    output names)."""
    from onnx import helper
    nodes = D.onnx_units(case, units)
    g = _Graph(helper.np_dtype_to_tensor_dtype(units[0]["x"].dtype))
    for i, (node, u) in enumerate(zip(nodes, units, strict=True)):
        g.add_unit(i, node, u["x"].shape)
    opsets = [helper.make_opsetid("", max(n.opset for n in nodes))]
    graph = helper.make_graph(g.nodes, case.name, g.value_infos, g.outputs, g.inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    return model, nodes[0], g.feed, [o.name for o in g.outputs]


def _ort_session(ort, model, first, dtype, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # ORT's workers keep spinning after run() returns (by default), on the cores the
    # next column needs: that made the normkit columns of the BERT case 2.3x slower.
    # Stop spinning at the end of each run; spinning within a run stays on, and ORT's
    # own times did not get worse (measured: 0.31-0.35 ms vs 0.41 ms on ln_8x128x768).
    so.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - e.g. no kernel for this op/dtype
        raise NotApplicable(f"ORT cannot load {first.op_type} "
                            f"(opset {first.opset}, {dtype}): {short(exc)}") from exc


def _bound_run(ort, sess, feed, out_names, units):
    """A run with inputs and outputs bound to NumPy buffers allocated once (IOBinding).

    Used for real-model cases (one session.run for every layer, whose outputs, like the
    eager columns that drop each output as the next layer runs, are not held 53 times)
    and for bfloat16, which ORT's Python layer cannot take as a NumPy array: it is bound
    as an OrtValue of ONNX type BFLOAT16 over a uint16 view of the same bytes."""
    from onnx import TensorProto
    dtype = units[0]["x"].dtype
    bf16 = dtype.name == "bfloat16"
    binding = sess.io_binding()

    def ortvalue(a):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(np.uint16),
                                                               TensorProto.BFLOAT16)
    for name, arr in feed.items():
        if bf16:
            binding.bind_ortvalue_input(name, ortvalue(arr))
        else:
            binding.bind_cpu_input(name, arr)
    buffers = [np.empty(u["x"].shape, dtype) for u in units]
    for name, buf in zip(out_names, buffers, strict=True):
        if bf16:
            binding.bind_ortvalue_output(name, ortvalue(buf))
        else:
            binding.bind_output(name, "cpu", 0, dtype.type, buf.shape, buf.ctypes.data)

    def run_bound():
        sess.run_with_iobinding(binding)
        return buffers
    return run_bound


def ort_impl(threads):
    import onnxruntime as ort

    def prepare(case, units):
        model, first, feed, out_names = onnx_model(case, units)
        dtype = units[0]["x"].dtype
        sess = _ort_session(ort, model, first, dtype, threads)
        if len(units) == 1 and dtype.name != "bfloat16":
            return (lambda: sess.run(out_names, feed)), list
        return _bound_run(ort, sess, feed, out_names, units), list

    return Impl("onnxruntime", "peer", "onnxruntime", prepare, ort.__version__)


# ====================================================================== choosing columns
def _peer_impl(p, threads, notes):
    """The column of peer ``p``, or None with a note saying why it is missing."""
    if p == PLAIN_NUMPY:
        return plain_impl()
    if p == "torch":
        if importlib.util.find_spec("torch") is None:
            notes.append("PyTorch is not installed: no torch column "
                         "(pip install torch --index-url https://download.pytorch.org/whl/cpu)")
            return None
        try:
            return torch_impl(threads)
        except Exception as exc:  # noqa: BLE001 - a broken peer is a note, not a crash
            notes.append(f"PyTorch is installed but failed to import: {short(exc)}")
            return None
    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        notes.append(f"{' and '.join(missing)} not installed: no onnxruntime column "
                     f"(pip install {' '.join(missing)})")
        return None
    try:
        return ort_impl(threads)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"ONNX Runtime is installed but failed to import: {short(exc)}")
        return None


def discover(backends=None, peers=("torch", "onnxruntime"), threads=None):
    """The columns to measure, plus notes on what was asked for but is missing."""
    import normkit
    from normkit.backends import KNOWN_BACKENDS, backend_status

    notes = []
    status = backend_status()
    available = [b for b in KNOWN_BACKENDS if status[b] == "available"]
    if backends is None:
        chosen = available
    else:
        unknown = [b for b in backends if b not in KNOWN_BACKENDS]
        if unknown:
            raise SystemExit(f"normkit bench: unknown backend(s) {unknown}; known: "
                             f"{list(KNOWN_BACKENDS)}, available here: {available}")
        chosen = []
        for b in backends:
            if status[b] == "available":
                chosen.append(b)
            else:
                notes.append(f"backend {b!r} skipped: {status[b]}")
        if not chosen:
            raise SystemExit("normkit bench: none of the requested backends is available "
                             "here:\n  " + "\n  ".join(notes))
    threads = threads or normkit.get_num_threads()
    impls = [backend_impl(b) for b in chosen] + [copy_impl()]
    for p in peers:
        impl = _peer_impl(p, threads, notes)
        if impl is not None:
            impls.append(impl)
    return impls, notes


def unsupported_dtype(impl, case, exc):
    """The reason (the exception's message), if ``exc`` says a normkit backend does not
    take the case's 16-bit dtype (a TypeError naming the dtype), else None."""
    if impl.kind == "backend" and is_16bit(np_dtype(case.dtype)) and \
            isinstance(exc, TypeError) and re.search(rf"\b{case.dtype}\b", str(exc)):
        return short(exc)
    return None
