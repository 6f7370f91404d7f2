"""The final network built from a genotype: NetworkCIFAR (any small-image data set) and NetworkImageNet,
with DARTS's auxiliary head and drop path, and its estimated energy per image."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import genotypes as G
from genotypes import Genotype
from plumbing.datasets import DataInfo
from plumbing.layout import LayoutMixin
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
    from plumbing.utils import count_params
    shape = (estimator.batch_size, info.in_channels, info.image_size, info.image_size)
    return Report(count_params(model), int(estimator.count_macs(model, shape)),
                  1e3 * float(estimator.model_energy(model, shape)), estimator.breakdown(model, shape))


# ----------------------------------------------------------------- pricing: the derived network's energy
# Estimated energy of the network `train.py` builds from a genotype, whole and split per op of the cells.
#
# The split is additive: with every cell's inputs, sums and concatenation fixed by the layout, the energy of a derived
# network is `base + sum over the genotype's (op, input) pairs of cost(kind, op, input)`, where a pair's cost sums that
# op over every cell of its kind (normal or reduction; in a reduction cell inputs 0 and 1 are strided). `CellCosts`
# measures that table once from the estimator, so the energy budget can weigh op swaps without rebuilding networks.
KINDS = ("normal", "reduce")


def priced_network(genotype: G.Genotype, info: DataInfo, channels: int, layers: int) -> torch.nn.Module:
    """The network train.py builds, made without touching torch's RNG: its initial weights are drawn from a forked
    stream, so pricing a genotype mid-search never changes what the search draws next."""
    with torch.random.fork_rng(devices=[]):
        return build_network(genotype, channels, info.num_classes, layers, False, info.in_channels, info.image_size)


def genotype_energy_mj(genotype: G.Genotype, info: DataInfo, channels: int, layers: int, estimator) -> float:
    """Estimated energy (mJ per image, at the estimator's deployment batch) of the network train.py builds."""
    net = priced_network(genotype, info, channels, layers)
    return 1e3 * estimator.model_energy(net.eval(), (estimator.batch_size, info.in_channels, info.image_size,
                                                     info.image_size))


def op_energies(genotype: G.Genotype, info: DataInfo, channels: int, layers: int, estimator,
                all_cells: bool = False) -> Tuple[Dict[str, List[float]], float]:
    """mJ per image of each (op, input) pair of both cells in the network train.py builds: in the first cell of
    each kind, or summed over all cells of that kind (`all_cells`). Also returns the whole network's energy."""
    net = priced_network(genotype, info, channels, layers).eval()
    shape = (estimator.batch_size, info.in_channels, info.image_size, info.image_size)
    out: Dict[str, List[float]] = {}
    for kind in KINDS:
        cells = [c for c in net.cells if c.reduction == (kind == "reduce")]
        cells = cells if all_cells else cells[:1]
        per_op = module_energies(net, shape, [c.ops[k] for c in cells for k in range(len(c.ops))], estimator)
        n = len(getattr(genotype, kind))
        out[kind] = [sum(per_op[i * n + k] for i in range(len(cells))) for k in range(n)]
    return out, 1e3 * estimator.model_energy(net, shape)


def module_energies(net: torch.nn.Module, shape: Sequence[int], modules: Sequence[torch.nn.Module],
                    estimator) -> List[float]:
    """mJ per image of each of `modules` (single-input parts of `net`), each priced on the input it gets in one
    forward pass of `net` at `shape` (batch first); 0 for a module the forward pass does not run."""
    seen: Dict[torch.nn.Module, Tuple[int, ...]] = {}

    def record(module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault(module, tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in set(modules)]
    try:
        with torch.no_grad():
            net(torch.zeros(shape))
    finally:
        for h in hooks:
            h.remove()
    return [1e3 * estimator.op_energy(m, seen[m]) if m in seen else 0.0 for m in modules]


def probe_genotype(op: str, steps: int = 4) -> G.Genotype:
    """Every pair `op`; node i reads inputs i and i + 1, so the reduction cell has strided and unstrided pairs."""
    pairs = [(op, j) for i in range(steps) for j in (i, i + 1)]
    concat = list(range(2, steps + 2))
    return G.Genotype(pairs, concat, pairs, concat)


class CellCosts:
    """The additive energy model of derived networks (see the module docstring), measured with one probe network
    per op: `cost(kind, op, input)` in mJ per image, `total(genotype)` equal to `genotype_energy_mj`."""

    def __init__(self, primitives: Sequence[str], info: DataInfo, channels: int, layers: int, estimator,
                 steps: int = 4) -> None:
        self.table: Dict[Tuple[str, str, bool], float] = {}
        self.base = None
        for op in primitives:
            if op == "none":
                continue
            probe = probe_genotype(op, steps)
            energies, total = op_energies(probe, info, channels, layers, estimator, all_cells=True)
            for kind in KINDS:
                for (_, j), e in zip(getattr(probe, kind), energies[kind]):
                    self.table[(kind, op, self.strided(kind, j))] = e
            if self.base is None:
                self.base = total - sum(sum(v) for v in energies.values())

    @staticmethod
    def strided(kind: str, j: int) -> bool:
        return kind == "reduce" and j < 2

    def cost(self, kind: str, op: str, j: int) -> float:
        """mJ per image of `op` on input `j` in every cell of `kind` together."""
        return self.table[(kind, op, self.strided(kind, j))]

    def total(self, genotype: G.Genotype) -> float:
        return self.base + sum(self.cost(kind, op, j) for kind in KINDS for op, j in getattr(genotype, kind))
