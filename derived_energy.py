"""Estimated energy of the network `train.py` builds from a genotype, whole and split per op of the cells.

The split is additive: with every cell's inputs, sums and concatenation fixed by the layout, the energy of a derived
network is `base + sum over the genotype's (op, input) pairs of cost(kind, op, input)`, where a pair's cost sums that
op over every cell of its kind (normal or reduction; in a reduction cell inputs 0 and 1 are strided). `CellCosts`
measures that table once from the estimator, so the energy budget can weigh op swaps without rebuilding networks.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

import genotypes as G
from datasets import DataInfo
from model import build_network

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
