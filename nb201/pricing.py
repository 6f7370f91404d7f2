"""What a derived NAS-Bench-201 cell costs, through the project's energy estimator: the whole network's energy, each
edge's share, the additive cost table an energy budget prices archs with, the exact projection of an arch onto a
budget, and the cell diagram labelled with those energies.

Additivity: the network train.py builds spends `base + sum over edges of cost(edge, op)` (mJ per image), each cost
summed over all 3N cells, plus one element-wise add per cell for every node with no live input (`CellCosts.total`
adds that term). A live op pays for the add that joins it to its node; `none` costs nothing: it is left out.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nb201 import space as nb201
from plumbing.datasets import DataInfo
from model import module_energies
from operations import is_parametric


def priced_network(arch: nb201.ArchLike, info: DataInfo, channels: int = 16, layers: int = 5) -> torch.nn.Module:
    """The network train.py builds, in eval mode, its weights drawn from a forked RNG stream (pricing an arch
    mid-search never changes what the search draws next)."""
    with torch.random.fork_rng(devices=[]):
        return nb201.NB201Network(arch, channels, layers, info.num_classes, info.in_channels).eval()


def _shape(info: DataInfo, estimator) -> Tuple[int, int, int, int]:
    return (estimator.batch_size, info.in_channels, info.image_size, info.image_size)


def network_energy_mj(arch: nb201.ArchLike, info: DataInfo, estimator, channels: int = 16, layers: int = 5) -> float:
    """mJ per image of the network train.py builds: `1e3 * estimator.model_energy(net, deployment shape)`."""
    return 1e3 * float(estimator.model_energy(priced_network(arch, info, channels, layers), _shape(info, estimator)))


def search_cells(net: torch.nn.Module) -> List[int]:
    """Indices in `net.cells` of the searched cells (not the residual blocks)."""
    return [c for c, cell in enumerate(net.cells) if not cell.reduction]


def edge_energies(arch: nb201.ArchLike, info: DataInfo, estimator, channels: int = 16, layers: int = 5,
                  all_cells: bool = False) -> Tuple[List[float], float]:
    """mJ per image of each edge's op (0 for `none`) in the first cell, or summed over all cells (`all_cells`);
    also the whole network's energy."""
    net = priced_network(arch, info, channels, layers)
    cells = search_cells(net) if all_cells else search_cells(net)[:1]
    return edge_totals(net, cells, info, estimator), network_energy_mj(arch, info, estimator, channels, layers)


def edge_totals(net: torch.nn.Module, cells: Sequence[int], info: DataInfo, estimator) -> List[float]:
    """mJ per image of each edge's op summed over `cells` (indices in `net.cells`)."""
    mods = [net.cells[c].edges[e] for c in cells for e in range(len(nb201.EDGES))]
    per = module_energies(net, _shape(info, estimator), mods, estimator)
    n = len(nb201.EDGES)
    return [sum(per[i * n + e] for i in range(len(cells))) for e in range(n)]


def dead_nodes(arch: nb201.ArchLike) -> int:
    """Nodes 1..3 with no live (non-`none`) input edge."""
    ops = nb201.as_arch(arch)
    return sum(all(ops[e] == "none" for e in nb201.in_edges(i)) for i in range(1, nb201.NODES))


class CellCosts:
    """The additive energy model of derived NB201 networks (module docstring), measured with one probe network per
    op (that op on every edge): `cost(edge, op)` in mJ per image over all cells, `base`, `add_mj` (one node add in
    every cell), `total(arch)` equal to `network_energy_mj` for every arch."""

    def __init__(self, primitives: Sequence[str], info: DataInfo, estimator, channels: int = 16,
                 layers: int = 5) -> None:
        self.table: Dict[Tuple[int, str], float] = {}
        self.base = self.add_mj = 0.0
        for op in nb201.check_primitives(primitives):
            if op == "none":
                continue
            probe = (op,) * len(nb201.EDGES)
            net = priced_network(probe, info, channels, layers)
            cells = search_cells(net)
            ops = edge_totals(net, cells, info, estimator)
            adds = sum(module_energies(net, _shape(info, estimator), [net.cells[c] for c in cells], estimator)) \
                - sum(ops)
            self.add_mj = adds / (len(probe) - (nb201.NODES - 1))  # every node live: one add per edge beyond the first
            for e, energy in enumerate(ops):
                self.table[(e, op)] = energy + self.add_mj
            total = 1e3 * estimator.model_energy(net, _shape(info, estimator))
            self.base = total - sum(self.table[(e, op)] for e in range(len(probe)))

    def cost(self, edge: int, op: str) -> float:
        """mJ per image of `op` on `edge` in every cell together (0 for `none`)."""
        return 0.0 if op == "none" else self.table[(edge, op)]

    def total(self, arch: nb201.ArchLike) -> float:
        """mJ per image of the network train.py builds for `arch`."""
        ops = nb201.as_arch(arch)
        return self.base + sum(self.cost(e, op) for e, op in enumerate(ops)) + self.add_mj * dead_nodes(ops)


def project_to_budget(arch: nb201.ArchLike, weights: Sequence[Sequence[float]], primitives: Sequence[str],
                      costs: CellCosts, budget_mj: float, max_skip: Optional[int] = None, min_parametric: int = 0,
                      actions: Optional[List[str]] = None, tolerance: float = 0.05) -> nb201.Arch:
    """The arch a budgeted search writes, found exactly (an NB201 cell has at most 5^6 = 15,625 archs): among the
    archs over `primitives` that reach their output, waste no op (`nb201.useful_edges`) and pass the guards, the
    one of highest score (sum of log
    softmax weights, `weights`: edges x ops) whose energy lies in [(1 - tolerance) budget, budget]; if none does,
    the dearest under the budget (the budget is there to be spent); if none is under it, the cheapest. `arch` comes
    back as it is when it already lies in the band or no arch passes the guards."""
    current = nb201.as_arch(arch)
    k = {p: n for n, p in enumerate(primitives)}

    def score(ops: nb201.Arch) -> float:
        return sum(math.log(max(weights[e][k[op]], 1e-30)) for e, op in enumerate(ops))

    def ok(ops: nb201.Arch) -> bool:
        skips, convs = ops.count("skip_connect"), sum(op != "none" and is_parametric(op) for op in ops)
        useful = nb201.useful_edges(ops)
        return ((max_skip is None or skips <= max_skip) and convs >= min_parametric and any(useful)
                and all(u or op == "none" for op, u in zip(ops, useful)))

    lo = (1.0 - tolerance) * budget_mj
    if lo <= costs.total(current) <= budget_mj:
        return current
    options = [(costs.total(ops), score(ops), ops) for ops in itertools.product(primitives, repeat=len(current))
               if ok(ops)]
    if not options:
        return current
    band = [o for o in options if lo <= o[0] <= budget_mj]
    under = [o for o in options if o[0] <= budget_mj]
    energy, _, best = (max(band, key=lambda o: o[1]) if band else max(under, key=lambda o: (o[0], o[1])) if under
                       else min(options, key=lambda o: (o[0], -o[1])))
    if actions is not None and best != current:
        actions.append(f"energy budget: {nb201.format_arch(current)} ({costs.total(current):.4f} mJ) -> "
                       f"{nb201.format_arch(best)} ({energy:.4f} mJ, budget {budget_mj:.4f})")
    return best


# ----------------------------------------------------------------------------------------------- cell diagram
_POS = {str(n): (1.6 * n, 0.0) for n in range(nb201.NODES)}  # nodes in a row; longer edges arc around them
_BEND = {1: 0.0, 2: -0.35, 3: 0.3}  # by how many nodes an edge skips: straight, above, below
_COLORS = {"0": "#b4eeb4", "3": "#eee8aa"}


def to_dot(arch: nb201.ArchLike, energies: Sequence[float], title: str) -> str:
    """DOT text of an NB201 cell: nodes 0 (input) to 3 (output), each edge labelled with its op and mJ."""
    lines = ["digraph cell {", "  rankdir=LR; labelloc=t; fontname=Helvetica;", f'  label="{title}";',
             "  node [style=filled, shape=rect, fontsize=16, penwidth=2, fontname=Helvetica, fillcolor=lightblue];",
             "  edge [fontsize=13, fontname=Helvetica];",
             '  "0" [fillcolor=darkseagreen2]; "3" [fillcolor=palegoldenrod];']
    for (i, j), op, e in zip(nb201.EDGES, nb201.as_arch(arch), energies):
        style = ", style=dashed, color=gray" if op == "none" else ""
        lines.append(f'  "{j}" -> "{i}" [label="{op}\\n{e:.4f} mJ"{style}];')
    return "\n".join(lines + ["}"]) + "\n"


def draw_matplotlib(arch: nb201.ArchLike, energies: Sequence[float], title: str, out_base: str) -> List[str]:
    """The cell with matplotlib: input left, output right, labelled arcs (`none` edges faint)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plumbing.cell_diagrams import arc, node_boxes, save_figure
    fig, ax = plt.subplots(figsize=(11.0, 4.6))
    for (i, j), op, e in zip(nb201.EDGES, nb201.as_arch(arch), energies):
        arc(ax, _POS[str(j)], _POS[str(i)], _BEND[i - j], f"{op}\n{e:.4f} mJ",
            color="#cccccc" if op == "none" else "#555555")
    node_boxes(ax, _POS, _COLORS)
    ax.set_xlim(-0.5, 5.3)
    ax.set_ylim(-1.2, 1.2)
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    return save_figure(fig, out_base)


def render(arch: nb201.ArchLike, out_dir: str, info: DataInfo, estimator, channels: int = 16, layers: int = 5,
           backend: str = "auto", name: str = "") -> List[str]:
    """Write cell.png and cell.pdf into `out_dir` (edges priced in the first cell of the network train.py builds,
    the title giving the whole network); returns the paths."""
    from plumbing.cell_diagrams import draw_graphviz, pick_backend
    backend = pick_backend(backend)
    os.makedirs(out_dir, exist_ok=True)
    energies, total = edge_energies(arch, info, estimator, channels, layers)
    title = (f"{name} NB201 cell, ops of the first of {3 * layers} cells ({channels} channels): "
             f"{sum(energies):.4f} mJ; network {total:.4f} mJ per image").strip()
    base = os.path.join(out_dir, "cell")
    if backend == "graphviz":
        return draw_graphviz(to_dot(arch, energies, title), base)
    return draw_matplotlib(arch, energies, title, base)
