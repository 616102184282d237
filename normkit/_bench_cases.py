"""The one table of benchmark cases, shared by ``python -m normkit bench`` and ``benchmarks/``.

Each :class:`Case` is a norm in one mode (an :class:`~normkit._bench_op_base.Op`, from
:mod:`normkit._bench_ops`) applied to one or more input shapes ("units": one for an
ordinary case, 53 for the ResNet-50 case), in one dtype and one data kind. The data,
the float64 truth every column is checked against and the runners are in
:mod:`normkit._bench_data`.

16-bit rows: every norm (BN eval, eval + residual + ReLU, training forward and
forward + backward, LN, RMSNorm, GN, IN) on a ResNet / transformer shape and a tiny
one, in float16 and in bfloat16, plus a hard-data row (mean 1e4, std 1) and three
memory-bound rows (beyond L3 in float32: 0.6x float32's time is their target). Each is
measured with its float32 twin (the same values widened) on the same backends in the
same rounds (see :mod:`normkit._bench`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ._bench_op_base import Op, short_dtype
from ._bench_ops import OPS

__all__ = [
    "Case", "CASES", "CASE_BY_NAME", "TAGS", "CATEGORIES", "DTYPES", "HALF_DTYPES",
    "RESNET50_BN_LAYERS", "BERT_BASE_LAYERNORMS", "select_cases",
]

DTYPES = ("float32", "float64", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")


# ====================================================================== real models
def _resnet50_bn_layers():
    """(channels, spatial) of the 53 BatchNorm layers of torchvision's ResNet-50 (v1.5,
    224x224 input, stride in the 3x3 conv), in forward order."""
    layers = [(64, 112)]                                   # stem bn1
    size = 56
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            out = size // s
            layers += [(planes, size), (planes, out), (planes * 4, out)]   # bn1, bn2, bn3
            if i == 0:
                layers.append((planes * 4, out))                           # downsample bn
            size = out
    return layers


RESNET50_BN_LAYERS = _resnet50_bn_layers()
assert len(RESNET50_BN_LAYERS) == 53
#: BERT-base: embedding LayerNorm + 2 per encoder layer x 12 layers, hidden 768
BERT_BASE_LAYERNORMS = 25


# ====================================================================== cases
TAGS = ("quick", "default", "full")
CATEGORIES = ("batchnorm", "rows", "groupnorm", "training", "tiny", "model")


@dataclass
class Case:
    """One row of the table.

    ``units``: the input shapes (in the case's layout) run back to back in one call of the
    case; ``smoke_units`` the small stand-ins the ordinary ``pytest`` run uses.
    ``tier``: ``quick`` (also in default and full), ``default`` (also in full) or ``full``.
    """
    name: str
    op: Op
    layout: str
    units: list
    dtype: str = "float32"
    tier: str = "default"
    category: str = ""
    params: dict = field(default_factory=dict)
    smoke_units: list | None = None
    description: str = ""
    #: kind of x values (``normkit._bench_data.DATA_KINDS``): normal or offset
    data: str = "normal"

    @property
    def tags(self):
        return {"quick": ("quick", "default", "full"), "default": ("default", "full"),
                "full": ("full",)}[self.tier]

    @property
    def norm(self):
        return self.op.norm

    def shapes(self, smoke=False):
        return self.smoke_units if smoke else self.units

    def tol(self):
        return self.op.tol(self.dtype)


def _smoke_shape(shape, layout):
    """A small stand-in that keeps the channel count / row length (the kernel paths)."""
    s = list(shape)
    s[0] = min(s[0], 2)
    if layout in ("nchw", "nhwc"):
        sp = range(2, len(s)) if layout == "nchw" else range(1, len(s) - 1)
        for i in sp:
            s[i] = min(s[i], 6)
    elif layout == "rows":
        for i in range(1, len(s) - 1):
            s[i] = min(s[i], 4)
    return tuple(s)


def _name_shape(shape):
    return "x".join(map(str, shape))


def _case(op_key, layout, shape, tier="default", dtype="float32", category=None, prefix="",
          name=None, data="normal", **params):
    op = OPS[op_key]
    shape = tuple(shape)
    if name is None:
        label = op_key
        if op_key.startswith("gn"):
            label = f"gn{params['groups']}" + op_key[2:]
        parts = [prefix + label]
        if layout != "rows":
            parts.append(layout)
        parts.append(_name_shape(shape))
        if dtype != "float32":
            parts.append(short_dtype(dtype))
        if data != "normal":
            parts.append(data)
        name = "_".join(parts)
    if category is None:
        category = ("training" if op.training else
                    {"batch_norm": "batchnorm", "layer_norm": "rows", "rms_norm": "rows",
                     "group_norm": "groupnorm", "instance_norm": "groupnorm"}[op.norm])
    return Case(name, op, layout, [shape], dtype, tier, category, params,
                [_smoke_shape(shape, layout)], data=data)


def _nhwc(n, c, h, w):
    return (n, h, w, c)


def _build_cases():
    cs = []
    add = cs.append
    # --- BatchNorm eval, ResNet shapes (CPU inference)
    for n, tier in ((1, "quick"), (8, "default"), (32, "default")):
        add(_case("bn_eval", "nchw", (n, 64, 56, 56), tier))
        add(_case("bn_eval", "nhwc", _nhwc(n, 64, 56, 56), tier))
    for c, hw in ((256, 56), (512, 28), (1024, 14)):
        add(_case("bn_eval", "nchw", (8, c, hw, hw), "full"))
        add(_case("bn_eval", "nhwc", _nhwc(8, c, hw, hw), "full"))
    add(_case("bn_eval", "nchw", (8, 2048, 7, 7)))
    add(_case("bn_eval", "nhwc", _nhwc(8, 2048, 7, 7)))
    add(_case("bn_eval", "nchw", (32, 256, 56, 56), "full"))
    add(_case("bn_eval", "nchw", (8, 64, 56, 56), "full", "float64"))
    # --- BatchNorm eval + residual add + ReLU (a ResNet block's epilogue), fused
    add(_case("bn_eval_add_relu", "nchw", (8, 64, 56, 56)))
    add(_case("bn_eval_add_relu", "nchw", (32, 64, 56, 56)))
    add(_case("bn_eval_add_relu", "nhwc", _nhwc(8, 64, 56, 56), "full"))
    add(_case("bn_eval", "nc", (256, 1024), "full"))                 # BatchNorm1d on (N, C)
    # --- LayerNorm / RMSNorm, transformer shapes (batch x seq x hidden)
    add(_case("ln", "rows", (1, 128, 768), "quick"))
    add(_case("ln", "rows", (8, 128, 768)))
    add(_case("ln", "rows", (8, 512, 1024)))
    add(_case("ln", "rows", (4, 128, 4096)))
    add(_case("ln", "rows", (32, 512, 1024), "full"))
    add(_case("ln", "rows", (1, 2048, 4096), "full"))
    add(_case("ln", "rows", (8, 128, 768), "full", "float64"))
    add(_case("rms", "rows", (1, 512, 4096), "quick"))
    add(_case("rms", "rows", (8, 128, 768)))
    add(_case("rms", "rows", (8, 512, 1024)))
    add(_case("rms", "rows", (4, 512, 4096), "full"))
    add(_case("rms", "rows", (1, 2048, 4096), "full"))
    # --- GroupNorm (32 groups) and InstanceNorm
    add(_case("gn", "nchw", (1, 256, 56, 56), "quick", groups=32))
    add(_case("gn", "nchw", (8, 256, 28, 28), groups=32))
    add(_case("gn", "nhwc", _nhwc(8, 256, 28, 28), groups=32))
    add(_case("gn", "nchw", (2, 320, 64, 64), groups=32))          # Stable Diffusion UNet
    add(_case("gn", "nhwc", _nhwc(2, 320, 64, 64), groups=32))
    add(_case("gn", "nchw", (8, 512, 28, 28), "full", groups=32))
    add(_case("in", "nchw", (1, 64, 256, 256)))                     # style transfer
    add(_case("in", "nchw", (8, 128, 64, 64)))
    add(_case("in", "nhwc", _nhwc(8, 128, 64, 64), "full"))
    add(_case("in", "nchw", (1, 3, 512, 512), "full"))
    # --- training: forward, and forward + backward
    add(_case("bn_train_fwd", "nchw", (8, 64, 56, 56), "quick"))
    add(_case("bn_train_fwd", "nchw", (32, 64, 56, 56)))
    add(_case("bn_train_fwd", "nhwc", _nhwc(32, 64, 56, 56)))
    add(_case("bn_train_fb", "nchw", (8, 64, 56, 56), "quick"))
    add(_case("bn_train_fb", "nchw", (32, 64, 56, 56)))
    add(_case("bn_train_fb", "nhwc", _nhwc(32, 64, 56, 56), "full"))
    add(_case("ln_train_fb", "rows", (8, 128, 768)))
    add(_case("rms_train_fb", "rows", (8, 512, 1024)))
    add(_case("gn_train_fb", "nchw", (8, 256, 28, 28), groups=32))
    add(_case("in_train_fb", "nchw", (8, 64, 56, 56), "full"))
    # --- tiny inputs: per-call overhead
    add(_case("bn_eval", "nchw", (1, 16, 4, 4), "quick", category="tiny", prefix="tiny_"))
    add(_case("ln", "rows", (1, 1, 768), "quick", category="tiny", prefix="tiny_"))
    add(_case("rms", "rows", (1, 1, 4096), "quick", category="tiny", prefix="tiny_"))
    add(_case("gn", "nchw", (1, 32, 4, 4), category="tiny", prefix="tiny_", groups=8))
    add(_case("in", "nchw", (1, 8, 8, 8), category="tiny", prefix="tiny_"))
    add(_case("ln_train_fb", "rows", (2, 4, 64), category="tiny", prefix="tiny_"))
    cs += _model_cases()
    for dtype in HALF_DTYPES:
        cs += _half_cases(dtype)
    names = [c.name for c in cs]
    assert len(names) == len(set(names)), "duplicate case names"
    return cs


def _model_cases():
    """Real models: every BN layer of ResNet-50; the LayerNorms of one BERT-base pass."""
    cs = []
    for n, tier in ((1, "quick"), (8, "default")):
        units = [(n, c, hw, hw) for c, hw in RESNET50_BN_LAYERS]
        cs.append(Case(f"resnet50_bn_eval_b{n}", OPS["bn_eval"], "nchw", units, "float32",
                       tier, "model", {}, [(1, c, min(hw, 4), min(hw, 4))
                                           for c, hw in RESNET50_BN_LAYERS],
                       f"the 53 BatchNorm layers of ResNet-50 (eval, batch {n}, 224x224)"))
    cs.append(Case("bert_base_ln_b8x128", OPS["ln"], "rows",
                   [(8, 128, 768)] * BERT_BASE_LAYERNORMS, "float32", "default", "model", {},
                   [(1, 4, 768)] * BERT_BASE_LAYERNORMS,
                   "the 25 LayerNorms of one BERT-base encoder pass (batch 8, seq 128)"))
    for dtype in HALF_DTYPES:        # the same models stored in 16 bits (full tier)
        for c in cs[1:3]:
            cs.append(Case(f"{c.name}_{short_dtype(dtype)}", c.op, c.layout, c.units, dtype,
                           "full", "model", {}, c.smoke_units, c.description))
    return cs


def _half_cases(dtype):
    """The 16-bit rows of one dtype (see the module docstring)."""
    def c(op_key, layout, shape, tier="default", **kw):
        return _case(op_key, layout, shape, tier, dtype, **kw)
    return [
        c("bn_eval", "nchw", (8, 64, 56, 56), "quick"),
        c("bn_eval", "nhwc", _nhwc(8, 64, 56, 56)),
        c("bn_eval", "nchw", (8, 2048, 7, 7), "full"),
        c("bn_eval_add_relu", "nchw", (8, 64, 56, 56)),
        c("bn_train_fwd", "nchw", (8, 64, 56, 56)),
        c("bn_train_fb", "nchw", (8, 64, 56, 56)),
        c("bn_train_fb", "nhwc", _nhwc(8, 64, 56, 56), "full"),
        c("ln", "rows", (8, 128, 768), "quick"),
        c("ln", "rows", (1, 2048, 4096), "full"),
        c("ln", "rows", (8, 128, 768), data="offset"),
        c("rms", "rows", (8, 512, 1024)),
        c("gn", "nchw", (8, 256, 28, 28), groups=32),
        c("gn", "nhwc", _nhwc(8, 256, 28, 28), "full", groups=32),
        c("in", "nchw", (8, 128, 64, 64)),
        c("ln_train_fb", "rows", (8, 128, 768)),
        c("rms_train_fb", "rows", (8, 512, 1024), "full"),
        c("gn_train_fb", "nchw", (8, 256, 28, 28), "full", groups=32),
        c("bn_train_fwd", "nchw", (8, 64, 56, 56), "full", data="offset"),
        # memory-bound: the float32 twin moves 2-3x 103 MB, past any L3 (the rows above
        # fit in a server's L3 and run at the speed of the arithmetic, not of memory)
        c("bn_eval", "nchw", (32, 64, 112, 112), "full"),
        c("bn_train_fwd", "nchw", (32, 64, 112, 112), "full"),
        c("gn", "nchw", (32, 256, 56, 56), "full", groups=32),
        c("bn_eval", "nchw", (1, 16, 4, 4), "quick", category="tiny", prefix="tiny_"),
        c("ln", "rows", (1, 1, 768), category="tiny", prefix="tiny_"),
        c("rms", "rows", (1, 1, 4096), category="tiny", prefix="tiny_"),
    ]


CASES = _build_cases()
CASE_BY_NAME = {c.name: c for c in CASES}


def select_cases(tier="default", patterns=None):
    """Cases of a tier (``quick``/``default``/``full``); ``patterns`` (fnmatch globs over
    names, or a tag / category / op key / dtype name, or ``16bit``) select from the whole
    table instead."""
    if not patterns:
        return [c for c in CASES if tier in c.tags]
    out = []
    for c in CASES:
        for p in patterns:
            if (fnmatch.fnmatchcase(c.name, p) or p == c.category or p in c.tags
                    or p == c.op.key or p == c.dtype or (p == "16bit" and c.dtype in
                                                         HALF_DTYPES)):
                out.append(c)
                break
    return out


