"""Memory layout of the networks: channels_last (NHWC) or PyTorch's default (NCHW).

On CPUs every layer of the search space runs faster in channels_last (bench/README.md has the measurements) -- as
long as the *whole* network stays in one layout: mixing layouts makes every elementwise op and ReLU backward a
strided gather. On CUDA channels_last pays with bf16 (tensor cores), so `auto` turns it on there only with `--amp`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("auto", "on", "off")


def want_channels_last(mode: str, device: torch.device, amp: bool = False) -> bool:
    """Resolve `--channels_last auto|on|off` for a device."""
    if mode not in MODES:
        raise ValueError(f"channels_last mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return device.type == "cpu" or (device.type == "cuda" and amp)


class LayoutMixin:
    """For networks: `set_channels_last(on)` moves the weights to that layout and makes `forward` move its input
    there (`self.to_layout(x)` first thing), so every layer runs in one layout."""

    channels_last: bool = False

    def set_channels_last(self, on: bool) -> nn.Module:
        self.channels_last = bool(on)
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-d tensor laid out NHWC (and not also NCHW-contiguous, as 1x1 maps are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`y` made contiguous in `x`'s layout: slices and shuffles of channels_last tensors are neither layout, and
    BN and elementwise kernels fall to slow strided paths on them."""
    return y.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that runs narrow channels_last inputs (under 8 channels, as partial channels make them) in NCHW:
    NHWC batch norm vectorizes over channels, which narrow tensors do not have: NCHW with both layout copies is
    several times faster there (bench/README.md). Same numbers either way.

    With a momentum (DARTS's 0.1) it does not count batches: `num_batches_tracked` is read only by the cumulative
    average (`momentum=None`), and its `add_(1)` is one more kernel per BatchNorm per forward (1,856 of the 28,000
    operators of a search step). The buffer stays (state dicts keep their keys), at 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < 8 and is_channels_last(x):
            return self._normalize(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return self._normalize(x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.momentum is not None):
            return super().forward(x)
        self._check_input_dim(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum,
                            self.eps)
