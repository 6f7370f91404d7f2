"""Per-layer features (MACs, bytes moved, kernel calls) of torch.nn leaf layers and of functional tensor ops.

All numbers are for the whole traced batch; the estimator divides by the batch size.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .defaults import FAMILIES


@dataclass
class LayerFeatures:
    """What one executed layer (or functional op) costs, for the whole batch."""
    family: str
    macs: float = 0.0
    bytes: float = 0.0
    calls: float = 1.0
    name: str = ""
    op: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown layer family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        for k in ("macs", "bytes", "calls"):
            v = float(getattr(self, k))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"feature {k} must be finite and >= 0, got {v}")
            setattr(self, k, v)


FeaturesFn = Callable[[nn.Module, tuple, Any], "LayerFeatures | dict"]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in ``obj`` (a tensor, or nested tuples/lists of them)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """All tensors in ``obj`` (nested tuples/lists/dict values)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o)]
    return []


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def state_bytes(m: nn.Module) -> int:
    """Bytes of a module's own parameters and floating buffers (weights, running stats)."""
    n = sum(nbytes(p) for p in m.parameters(recurse=False))
    return n + sum(nbytes(b) for b in m.buffers(recurse=False) if b.is_floating_point())


def _io(inputs: tuple, output: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    x, y = first_tensor(inputs), first_tensor(output)
    return x, y, nbytes(x) + nbytes(y)


def _prod(v: Any) -> int:
    return math.prod(v) if isinstance(v, (tuple, list)) else int(v)


def conv_family(groups: int, kernel_numel: int, dilation: Any = 1) -> str:
    if groups > 1:
        return "conv_dw_dilated" if _prod(dilation) > 1 else "conv_dw"
    return "conv_pw" if kernel_numel == 1 else "conv"


def conv_features(m: nn.Module, inputs: tuple, output: Any) -> LayerFeatures:
    x, y, io = _io(inputs, output)
    k = _prod(m.kernel_size)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        macs = x.numel() * (m.out_channels // m.groups) * k
    else:
        macs = y.numel() * (m.in_channels // m.groups) * k
    if m.bias is not None:
        macs += y.numel()
    return LayerFeatures(conv_family(m.groups, k, m.dilation), macs, io + state_bytes(m))


def norm_features(m: nn.Module, inputs: tuple, output: Any) -> LayerFeatures:
    x, y, io = _io(inputs, output)
    per = 1 if isinstance(m, nn.modules.batchnorm._BatchNorm) else 2  # LN/GN/IN compute statistics too
    return LayerFeatures("bn", per * y.numel(), io + state_bytes(m))


def activation_features(m: nn.Module, inputs: tuple, output: Any) -> LayerFeatures:
    x, y, io = _io(inputs, output)
    return LayerFeatures("relu", y.numel(), io + state_bytes(m))


def pool_features(m: nn.Module, inputs: tuple, output: Any) -> LayerFeatures:
    x, y, io = _io(inputs, output)
    if hasattr(m, "kernel_size"):
        k = m.kernel_size
        nd = x.dim() - 2 if x.dim() > 2 else 1
        kn = _prod(k) if isinstance(k, (tuple, list)) else int(k) ** nd
        macs = y.numel() * kn
    else:  # adaptive pooling: every input element enters (at least) one window
        macs = max(x.numel(), y.numel())
    return LayerFeatures("pool_max" if "Max" in type(m).__name__ else "pool", macs, io)


def linear_features(m: nn.Module, inputs: tuple, output: Any) -> LayerFeatures:
    x, y, io = _io(inputs, output)
    macs = y.numel() * m.in_features + (y.numel() if m.bias is not None else 0)
    return LayerFeatures("linear", macs, io + state_bytes(m))


def identity_features(m: nn.Module, inputs: tuple, output: Any) -> LayerFeatures:
    return LayerFeatures("identity", 0, nbytes(first_tensor(inputs)), 0)


def view_features(m: nn.Module, inputs: tuple, output: Any) -> LayerFeatures:
    return LayerFeatures("view", 0, 0, 0)


def other_features(m: nn.Module, inputs: tuple, output: Any) -> LayerFeatures:
    """Unknown leaf: its memory traffic (all input/output tensors, own weights) plus one call."""
    b = sum(nbytes(t) for t in tensors_in(inputs)) + sum(nbytes(t) for t in tensors_in(output))
    return LayerFeatures("other", 0, b + state_bytes(m))


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.PReLU, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.SELU)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_VIEWS = (nn.Flatten, nn.Unflatten, nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: Built-in leaf types, most specific first (isinstance order matters for subclasses).
BUILTIN: list[tuple[type, FeaturesFn]] = [
    (nn.modules.conv._ConvNd, conv_features),
    (_NORMS, norm_features),
    (_ACTIVATIONS, activation_features),
    (_POOLS, pool_features),
    (nn.Linear, linear_features),
    (_IDENTITIES, identity_features),
    (_VIEWS, view_features),
]

_warned: set[type] = set()


def warn_unknown(t: type) -> None:
    """One warning per unknown leaf type per process."""
    if t not in _warned:
        _warned.add(t)
        warnings.warn(f"dl_energy_estimator: unknown leaf layer type {t.__module__}.{t.__qualname__}; estimated "
                      f"from its memory traffic (family 'other'). Use EnergyEstimator.register() to describe it.",
                      stacklevel=3)


# ----------------------------------------------------------------------------------------------- functional ops
_ELEMENTWISE = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
    "__itruediv__", "true_divide", "addcmul", "addcdiv", "where", "masked_fill", "masked_fill_", "clamp",
    "clamp_", "neg", "abs", "sqrt", "rsqrt", "exp", "log", "pow", "__pow__", "maximum", "minimum", "lerp",
    "square", "fill_", "zero_", "copy_", "clone", "pad", "softmax", "log_softmax",
}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "std", "var", "norm", "logsumexp", "prod"}
_CONCAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_ACT_FUNCS = {"relu", "relu_", "relu6", "sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "silu", "hardswish",
              "hardsigmoid", "leaky_relu", "leaky_relu_", "elu", "mish", "hardtanh", "hardtanh_", "threshold"}
_POOL_FUNCS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "max_pool2d_with_indices", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
               "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"}
_CONV_FUNCS = {"conv1d", "conv2d", "conv3d"}
_NORM_FUNCS = {"batch_norm", "layer_norm", "group_norm", "instance_norm"}

#: Names of every functional op the tracer prices; everything else (views, indexing, metadata) is free.
PRICED_FUNCS = _ELEMENTWISE | _REDUCTIONS | _CONCAT | _ACT_FUNCS | _POOL_FUNCS | _CONV_FUNCS | _NORM_FUNCS | {
    "linear"}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def functional_features(name: str, args: tuple, kwargs: dict, out: Any) -> LayerFeatures | None:
    """Features of a functional tensor op called outside any known leaf module (None: free)."""
    y = first_tensor(out)
    if y is None or name not in PRICED_FUNCS:
        return None
    ins = tensors_in(args) + tensors_in(kwargs)
    b_in = sum(nbytes(t) for t in ins)
    io = b_in + nbytes(y)
    if name in _CONCAT:
        return LayerFeatures("concat", 0, io, op=name)
    if name in _ACT_FUNCS:
        return LayerFeatures("relu", y.numel(), io, op=name)
    if name in _REDUCTIONS:
        return LayerFeatures("elementwise", sum(t.numel() for t in ins), io, op=name)
    if name in _POOL_FUNCS:
        x = ins[0] if ins else y
        k = _arg(args, kwargs, 1, "kernel_size")
        if name.startswith("adaptive") or k is None:
            macs = max(x.numel(), y.numel())
        else:
            macs = y.numel() * (_prod(k) if isinstance(k, (tuple, list)) else int(k) ** max(1, x.dim() - 2))
        return LayerFeatures("pool_max" if "max" in name else "pool", macs, io, op=name)
    if name in _CONV_FUNCS:
        w = _arg(args, kwargs, 1, "weight")
        groups = int(_arg(args, kwargs, 6, "groups", 1))
        k = math.prod(w.shape[2:])
        dilation = _arg(args, kwargs, 5, "dilation", 1)
        return LayerFeatures(conv_family(groups, k, dilation), y.numel() * w.shape[1] * k, io, op=name)
    if name == "linear":
        w = _arg(args, kwargs, 1, "weight")
        return LayerFeatures("linear", y.numel() * w.shape[-1], io, op=name)
    if name in _NORM_FUNCS:
        return LayerFeatures("bn", y.numel(), io, op=name)
    # element-wise: n tensor operands -> n-1 ops per output element (at least one)
    macs = 0 if name in {"fill_", "zero_", "copy_", "clone", "pad"} else y.numel() * max(1, len(ins) - 1)
    return LayerFeatures("elementwise", macs, io, op=name)
