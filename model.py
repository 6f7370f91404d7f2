"""The final network built from a genotype: NetworkCIFAR (any small-image data set) and NetworkImageNet,
with DARTS's auxiliary head and drop path, and its estimated energy per image."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from genotypes import Genotype
from layout import LayoutMixin
from operations import OPS, FactorizedReduce, Identity, ReLUConvBN


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of a path with probability drop_prob, rescaling the rest (training only)."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class Cell(nn.Module):
    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool) -> None:
        super().__init__()
        self.preprocess0 = FactorizedReduce(C_prev_prev, C) if reduction_prev else ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self.concat)
        self.steps = len(pairs) // 2
        self.indices = [idx for _, idx in pairs]
        self._ops = nn.ModuleList(OPS[name](C, 2 if reduction and idx < 2 else 1, True) for name, idx in pairs)
        self.reduction = reduction

    @property
    def ops(self) -> nn.ModuleList:
        """The op of each (op, input) pair of the genotype, in its order."""
        return self._ops

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            hs = []
            for k in (2 * i, 2 * i + 1):
                op = self._ops[k]
                h = op(states[self.indices[k]])
                if self.training and drop_prob > 0.0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS's auxiliary classifier at 2/3 depth; pools any feature map down to 2x2 first.

    On DARTS's own sizes (8x8 for CIFAR, 7x7 for ImageNet) it uses DARTS's exact pooling; elsewhere (digits'
    2x2 maps, other image sizes) an adaptive average pool, so the head works on whatever map it gets.
    """

    def __init__(self, C: int, num_classes: int, feature_size: int, imagenet: bool = False) -> None:
        super().__init__()
        if feature_size == 8 and not imagenet:
            pool = nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
        elif feature_size == 7 and imagenet:
            pool = nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False)
        else:
            pool = nn.AdaptiveAvgPool2d(2)
        layers = [nn.ReLU(inplace=True), pool, nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128),
                  nn.ReLU(inplace=True), nn.Conv2d(128, 768, 2, bias=False)]
        if not imagenet:  # DARTS's ImageNet head has no BN here (a typo kept for fidelity with the paper)
            layers.append(nn.BatchNorm2d(768))
        layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _Network(LayoutMixin, nn.Module):
    """Cells, auxiliary head and classifier shared by both variants; subclasses build the stem."""

    def _build_cells(self, genotype: Genotype, C: int, C_prev_prev: int, C_prev: int, layers: int,
                     reduction_prev: bool, num_classes: int, auxiliary: bool, aux_size: int, imagenet: bool) -> int:
        self._layers = layers
        self.cells = nn.ModuleList()
        C_curr, C_aux = C, C_prev
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_aux = C_prev
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes, aux_size, imagenet) if auxiliary else None
        self.classifier = nn.Linear(C_prev, num_classes)
        self.drop_path_prob = 0.0
        return C_prev

    def _cells_forward(self, s0, s1) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, logits_aux


class NetworkCIFAR(_Network):
    """DARTS's CIFAR network for any small-image data set (channels, classes and size from the data)."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        C_stem = 3 * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        aux_size = image_size
        for _ in range(2):  # two reductions before the auxiliary head
            aux_size = (aux_size + 1) // 2
        self._build_cells(genotype, C, C_stem, C_stem, layers, False, num_classes, auxiliary, aux_size, False)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor):
        s = self.stem(self.to_layout(x))
        return self._cells_forward(s, s)


class NetworkImageNet(_Network):
    """DARTS's ImageNet (mobile setting) network: three stride-2 3x3 convs in the stem, 224x224 input."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 in_channels: int = 3, image_size: int = 224) -> None:
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True), nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
        self.stem1 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(C))
        aux_size = image_size
        for _ in range(5):  # three stem convs and two reductions
            aux_size = (aux_size + 1) // 2
        self._build_cells(genotype, C, C, C, layers, True, num_classes, auxiliary, aux_size, True)
        # DARTS uses AvgPool2d(7) at 224x224; adaptive pooling is the same there and works at other sizes.
        self.global_pooling = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor):
        s0 = self.stem0(self.to_layout(x))
        return self._cells_forward(s0, self.stem1(s0))


def build_network(genotype: Genotype, C: int, num_classes: int, layers: int, auxiliary: bool = False,
                  in_channels: int = 3, image_size: int = 32, imagenet: bool = False) -> _Network:
    """The network `train.py` trains for a genotype."""
    cls = NetworkImageNet if imagenet else NetworkCIFAR
    return cls(C, num_classes, layers, auxiliary, genotype, in_channels, image_size)


@dataclass
class Report:
    """Size and estimated energy of a network (what `train.py --report` prints and writes)."""
    params: int
    macs: int
    energy_mj: float
    breakdown: List[dict] = field(default_factory=list)

    def by_type(self) -> Dict[str, Dict[str, float]]:
        out: Dict[str, Dict[str, float]] = {}
        for r in self.breakdown:
            t = out.setdefault(r["type"], {"layers": 0, "macs": 0, "energy_mj": 0.0})
            t["layers"] += 1
            t["macs"] += r["macs"]
            t["energy_mj"] += r["energy_mj"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["energy_mj"]))

    def text(self) -> str:
        lines = [f"params {self.params:,}  MACs {self.macs:,}  estimated energy {self.energy_mj:.4f} mJ per image",
                 f"{'op type':<18}{'layers':>8}{'MACs':>16}{'energy mJ':>12}{'share':>8}"]
        for kind, t in self.by_type().items():
            share = 100.0 * t["energy_mj"] / self.energy_mj if self.energy_mj else 0.0
            lines.append(f"{kind:<18}{t['layers']:>8}{t['macs']:>16,}{t['energy_mj']:>12.4f}{share:>7.1f}%")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "energy_mj": self.energy_mj, "breakdown": self.breakdown}


def network_report(model: nn.Module, estimator, info) -> Report:
    """Parameters (without the auxiliary head, as DARTS counts), MACs (conv + linear multiply-adds, as papers
    count them) and energy per image: exactly `1e3 * estimator.model_energy(model, deployment shape)`."""
    from utils import count_params
    shape = (estimator.batch_size, info.in_channels, info.image_size, info.image_size)
    return Report(count_params(model), int(estimator.count_macs(model, shape)),
                  1e3 * float(estimator.model_energy(model, shape)), estimator.breakdown(model, shape))
