"""Cell diagrams: a DARTS genotype's normal and reduction cells as PNG and PDF, each edge labelled with its op and
the op's estimated energy (mJ per image) in the network train.py builds from the genotype; and the drawing helpers
NAS-Bench-201's diagram shares (nb201/pricing.py). Graphviz's `dot` when installed, matplotlib otherwise."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Dict, List, Optional, Tuple

from plumbing.cliargs import CLIError

KINDS = ("normal", "reduce")


def _node(j: int) -> str:
    return "c_{k-2}" if j == 0 else "c_{k-1}" if j == 1 else str(j - 2)


def to_dot(pairs: List[Tuple[str, int]], concat: List[int], energies: List[float], title: str) -> str:
    """DOT text of one cell (DARTS's layout, energies on the edges)."""
    lines = ["digraph cell {", "  rankdir=LR; labelloc=t; fontname=Helvetica;",
             f'  label="{title}";',
             "  node [style=filled, shape=rect, align=center, fontsize=16, height=0.5, width=0.5, penwidth=2, "
             "fontname=Helvetica];", "  edge [fontsize=13, fontname=Helvetica];",
             '  "c_{k-2}" [fillcolor=darkseagreen2]; "c_{k-1}" [fillcolor=darkseagreen2];']
    steps = len(pairs) // 2
    for i in range(steps):
        lines.append(f'  "{i}" [fillcolor=lightblue];')
    for k, ((op, j), e) in enumerate(zip(pairs, energies)):
        lines.append(f'  "{_node(j)}" -> "{k // 2}" [label="{op}\\n{e:.4f} mJ", fillcolor=gray];')
    lines.append('  "c_{k}" [fillcolor=palegoldenrod];')
    for i in concat:
        if i >= 2:
            lines.append(f'  "{i - 2}" -> "c_{{k}}" [fillcolor=gray];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_graphviz(dot_text: str, out_base: str) -> List[str]:
    paths = []
    for fmt in ("png", "pdf"):
        path = f"{out_base}.{fmt}"
        subprocess.run(["dot", f"-T{fmt}", "-o", path], input=dot_text, text=True, check=True,
                       capture_output=True, timeout=60)
        paths.append(path)
    return paths


def arc(ax, src: Tuple[float, float], dst: Tuple[float, float], rad: float = 0.0, label: Optional[str] = None,
        lw: float = 1.4, color: str = "#555555") -> None:
    """An arrow from `src` to `dst` bent by `rad` (matplotlib's arc3), its label on the arc near the head."""
    ax.annotate("", xy=dst, xytext=src, arrowprops=dict(arrowstyle="-|>", lw=lw, color=color, shrinkA=22,
                                                        shrinkB=22, connectionstyle=f"arc3,rad={rad}"))
    if label is None:
        return
    # label on the arc near its head: each node has two incoming arcs bending opposite ways, so labels
    # close to the head separate (matplotlib's arc3 control point: chord midpoint + rad * (dy, -dx))
    dx, dy = dst[0] - src[0], dst[1] - src[1]
    cx, cy = (src[0] + dst[0]) / 2 + rad * dy, (src[1] + dst[1]) / 2 - rad * dx
    t = 0.62
    mx = (1 - t) ** 2 * src[0] + 2 * (1 - t) * t * cx + t ** 2 * dst[0]
    my = (1 - t) ** 2 * src[1] + 2 * (1 - t) * t * cy + t ** 2 * dst[1]
    ax.text(mx, my, label, ha="center", va="center", fontsize=8.5,
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="#bbbbbb", alpha=0.9))


def node_boxes(ax, pos: Dict[str, Tuple[float, float]], colors: Dict[str, str]) -> None:
    """Each node's name in a box at its position (light blue unless `colors` says otherwise)."""
    for name, (x, y) in pos.items():
        ax.text(x, y, name, ha="center", va="center", fontsize=13, fontweight="bold",
                bbox=dict(boxstyle="round,pad=0.5", fc=colors.get(name, "#add8e6"), ec="black", lw=1.5))


def save_figure(fig, out_base: str) -> List[str]:
    """`out_base`.png and .pdf; closes the figure."""
    import matplotlib.pyplot as plt
    paths = []
    for fmt in ("png", "pdf"):
        path = f"{out_base}.{fmt}"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def draw_matplotlib(pairs: List[Tuple[str, int]], concat: List[int], energies: List[float], title: str,
                    out_base: str) -> List[str]:
    """The same diagram without graphviz: inputs left, nodes in a row, output right, labelled arcs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = len(pairs) // 2
    pos = {"c_{k-2}": (0.0, 1.2), "c_{k-1}": (0.0, -1.2), "c_{k}": (steps + 1.6, 0.0)}
    for i in range(steps):
        pos[str(i)] = (i + 1.2, 0.9 if i % 2 == 0 else -0.9)
    fig, ax = plt.subplots(figsize=(3.2 * steps + 3, 6.2))
    colors = {"c_{k-2}": "#b4eeb4", "c_{k-1}": "#b4eeb4", "c_{k}": "#eee8aa"}
    for k, ((op, j), e) in enumerate(zip(pairs, energies)):
        arc(ax, pos[_node(j)], pos[str(k // 2)], 0.25 if k % 2 else -0.25, f"{op}\n{e:.4f} mJ")
    for i in concat:
        if i >= 2:
            arc(ax, pos[str(i - 2)], pos["c_{k}"], lw=1.0, color="#999999")
    node_boxes(ax, pos, colors)
    ax.set_xlim(-0.8, steps + 2.4)
    ax.set_ylim(-2.0, 2.0)
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    return save_figure(fig, out_base)


def pick_backend(backend: str) -> str:
    """`auto` is graphviz where its `dot` program is installed, matplotlib otherwise."""
    if backend == "auto":
        return "graphviz" if shutil.which("dot") else "matplotlib"
    if backend == "graphviz" and not shutil.which("dot"):
        raise CLIError("--backend graphviz needs the `dot` program (apt-get install graphviz)")
    return backend


def render(genotype, energies: Dict[str, List[float]], out_dir: str, channels: int, layers: int,
           backend: str = "auto", name: str = "") -> List[str]:
    """Write normal.{png,pdf} and reduce.{png,pdf} into out_dir (`energies`: mJ per op of each kind, as
    `model.op_energies` prices them); returns the paths."""
    backend = pick_backend(backend)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for kind in KINDS:
        pairs, concat = getattr(genotype, kind), list(getattr(genotype, f"{kind}_concat"))
        total = sum(energies[kind])
        title = (f"{name} {kind} cell: ops of the first {kind} cell of the {channels}-channel, {layers}-cell network, "
                 f"{total:.4f} mJ per image in all").strip()
        base = os.path.join(out_dir, kind)
        if backend == "graphviz":
            paths += draw_graphviz(to_dot(pairs, concat, energies[kind], title), base)
        else:
            paths += draw_matplotlib(pairs, concat, energies[kind], title, base)
    return paths


