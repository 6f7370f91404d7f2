"""The calibration grid: the leaf layers DARTS candidate ops are made of, over channels/resolutions/strides."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
from torch import nn


class Add(nn.Module):
    """x + x (an element-wise sum, as a cell's node does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x


class Concat(nn.Module):
    """torch.cat of two tensors along channels (a cell's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=1)


@dataclass
class GridItem:
    name: str
    family: str
    module: nn.Module
    shape: tuple[int, ...]


def _items(grid: str):
    small = grid == "small"
    chans = (8, 32, 64) if small else (16, 32, 64, 128, 256)
    res = (8, 32) if small else (8, 16, 32, 64)
    for c, r, s in itertools.product(chans, res, (1, 2)):
        yield f"conv3x3_c{c}_r{r}_s{s}", "conv", nn.Conv2d(c, c, 3, s, 1, bias=False), (c, r, r)
    for c, r in itertools.product(chans + ((128,) if small else ()), (8, 16, 32) if small else res):
        yield f"conv1x1_c{c}_r{r}", "conv_pw", nn.Conv2d(c, c, 1, bias=False), (c, r, r)
    dws = ((3, 1), (5, 1), (3, 2), (5, 2))
    for (k, d), c, r in itertools.product(dws, (16, 64) if small else (16, 64, 128, 256), (16, 32) if small else res):
        p = d * (k - 1) // 2
        yield (f"dw{k}x{k}_d{d}_c{c}_r{r}", "conv_dw" if d == 1 else "conv_dw_dilated",
               nn.Conv2d(c, c, k, 1, p, d, groups=c, bias=False), (c, r, r))
    for k, c in itertools.product((3, 5), (16, 64) if small else (32, 128)):
        yield f"dw{k}x{k}_s2_c{c}_r32", "conv_dw", nn.Conv2d(c, c, k, 2, k // 2, groups=c, bias=False), (c, 32, 32)
    for c, r in itertools.product((8, 32, 128) if small else chans, (8, 16, 32) if small else res):
        yield f"bn_c{c}_r{r}", "bn", nn.BatchNorm2d(c, affine=bool((c + r) % 2)), (c, r, r)
        yield f"relu_c{c}_r{r}", "relu", nn.ReLU(inplace=False), (c, r, r)
    for kind, c, r, s in itertools.product(("max", "avg"), (16, 64) if small else (16, 64, 256), (16, 32) if small
                                           else res, (1, 2)):
        pool = nn.MaxPool2d(3, s, 1) if kind == "max" else nn.AvgPool2d(3, s, 1, count_include_pad=False)
        yield f"{kind}pool3x3_c{c}_r{r}_s{s}", "pool" if kind == "avg" else "pool_max", pool, (c, r, r)
    for fin, fout in ((64, 10), (256, 10), (256, 256), (1024, 256)) + (() if small else ((1024, 1024),)):
        yield f"linear_{fin}x{fout}", "linear", nn.Linear(fin, fout), (fin,)
    for c, r in itertools.product((16, 64) if small else (16, 64, 256), (16, 32) if small else res):
        yield f"add_c{c}_r{r}", "elementwise", Add(), (c, r, r)
        yield f"cat_c{c}_r{r}", "concat", Concat(), (c, r, r)


def build_grid(grid: str = "small", batch_size: int = 1, seed: int = 0) -> list[GridItem]:
    """Grid items with input shapes ``(batch_size, ...)``; weights initialised from ``seed``."""
    if grid not in ("small", "default"):
        raise ValueError(f"grid must be 'small' or 'default', got {grid!r}")
    torch.manual_seed(seed)
    items = [GridItem(n, f, m, (int(batch_size),) + s) for n, f, m, s in _items(grid)]
    rng = random.Random(seed)
    if grid == "default":  # ~135 items: about 3.4 s each on NVML (1 s windows x 3) -> under 10 minutes
        by_fam: dict[str, list[GridItem]] = {}
        for it in items:
            by_fam.setdefault(it.family, []).append(it)
        items = [it for group in by_fam.values() for it in rng.sample(group, max(4, round(0.55 * len(group))))]
    rng.shuffle(items)  # interleave families so drift over time does not bias one family
    return items


def split(items: list[GridItem], heldout: float = 0.25, seed: int = 0) -> tuple[list[int], list[int]]:
    """Stratified split by family: indices of (train, held-out); every family keeps >= 2 training items."""
    rng = random.Random(seed + 1)
    train, test = [], []
    fams: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        fams.setdefault(it.family, []).append(i)
    for idx in fams.values():
        idx = idx[:]
        rng.shuffle(idx)
        k = min(int(round(heldout * len(idx))), max(0, len(idx) - 2))
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)
