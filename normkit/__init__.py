"""normkit: fast, numerically careful CPU normalization layers.

Public names only; the contract is documented in ``docs/api.md``.
"""
# inference pipelines: folding, import from torch/ONNX, precise BN, conventions
from . import conventions, diagnostics
from . import functional as functional  # normkit.functional, as the API names it
from ._version import __version__
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    get_num_threads,
    set_backend,
    set_num_threads,
    use_backend,
)
from .conventions import convert_momentum, convert_running_var
from .diagnostics import UnstableBatchStatisticsWarning
from .folding import fold_batch_norm, fold_batch_norm_stats
from .functional import (
    batch_norm,
    batch_norm_backward,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from .interop import fold_onnx_batch_norms, from_onnx, from_torch
from .layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, Norm, RMSNorm
from .recalibration import recalibrate

__all__ = [
    "__version__",
    # functional
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
    "batch_norm_backward", "layer_norm_backward", "group_norm_backward",
    "instance_norm_backward", "rms_norm_backward",
    # layers
    "Norm", "BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm",
    # backends
    "BackendUnavailableError", "available_backends", "get_backend", "set_backend",
    "use_backend", "set_num_threads", "get_num_threads",
    # diagnostics
    "diagnostics", "UnstableBatchStatisticsWarning",
    # inference pipelines
    "fold_batch_norm", "fold_batch_norm_stats", "from_torch", "from_onnx",
    "fold_onnx_batch_norms", "recalibrate", "conventions", "convert_momentum",
    "convert_running_var",
]
