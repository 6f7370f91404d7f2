"""Matplotlib figures the scripts write into run folders: alpha heatmaps, training curves, the Pareto plot.

Everything renders with the Agg backend (no display needed); matplotlib is imported only when a plot is made.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    """Save atomically (temp name, then rename) so a reader never sees half a PNG."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def edge_labels(steps: int = 4) -> List[str]:
    """`node <- input` names of a cell's edges in the order of the alphas' rows."""
    names = []
    for i in range(steps):
        for j in range(2 + i):
            src = "c_{k-2}" if j == 0 else "c_{k-1}" if j == 1 else str(j - 2)
            names.append(f"{i} <- {src}")
    return names


CELL_KINDS = ("normal", "reduce", "cell")  # DARTS's two cells; NAS-Bench-201's one


def alpha_heatmaps(alphas: Dict[str, list], primitives: Sequence[str], path: str, title: str = "",
                   row_labels: Optional[Sequence[str]] = None) -> str:
    """Softmaxed alphas as heatmaps (edges x ops), one per cell kind in `alphas` (normal and reduce side by side,
    or NB201's `cell`); rows named by `row_labels` (default: DARTS's edges)."""
    plt = _plt()
    kinds = [k for k in CELL_KINDS if k in alphas]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 5.5), sharey=True, squeeze=False)
    rows = len(alphas[kinds[0]])
    steps = {2: 1, 5: 2, 9: 3, 14: 4, 20: 5}.get(rows, 4)
    labels = list(row_labels) if row_labels is not None else edge_labels(steps)[:rows]
    for ax, kind in zip(axes[0], kinds):
        im = ax.imshow(alphas[kind], cmap="viridis", aspect="auto")  # own range: early alphas are near-uniform
        ax.set_title(f"{kind} cell" if kind != "cell" else "cell")
        ax.set_xticks(range(len(primitives)))
        ax.set_xticklabels(primitives, rotation=45, ha="right")
        ax.set_yticks(range(rows))
        ax.set_yticklabels(labels)
        for r, row in enumerate(alphas[kind]):
            best = max(range(len(row)), key=row.__getitem__)
            ax.text(best, r, "*", ha="center", va="center", color="white", fontsize=12)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="softmax(alpha)")
    axes[0][0].set_ylabel("edge (node <- input)")
    fig.suptitle(title or "architecture weights (* = strongest op per edge)")
    return _save(fig, path)


def curves(rows: List[dict], path: str, panels: Sequence[Tuple[str, Sequence[str], str]], title: str = "") -> str:
    """One panel per (title, metric keys, y label) over the epochs of `rows` (metrics.jsonl objects)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6))
    axes = axes if len(panels) > 1 else [axes]
    epochs = [r["epoch"] for r in rows]
    for ax, (name, keys, ylabel) in zip(axes, panels):
        for key in keys:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", ms=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


SEARCH_PANELS = [("accuracy", ["train_acc", "valid_acc"], "accuracy (%)"),
                 ("loss", ["train_loss", "valid_loss"], "cross-entropy"),
                 ("energy", ["expected_energy_mj", "genotype_energy_mj"], "mJ per image")]
TRAIN_PANELS = [("accuracy", ["train_acc", "valid_acc", "test_acc"], "accuracy (%)"),
                ("loss", ["train_loss", "valid_loss", "test_loss"], "cross-entropy"),
                ("learning rate", ["lr"], "lr")]


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points not dominated in (lower energy, higher accuracy), sorted by energy.

    A point (e, a) is dominated when another has e' <= e and a' >= a with at least one strict."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def directed_front(points: Sequence[Tuple[float, float]], x_better: str = "lower",
                   y_better: str = "higher") -> List[int]:
    """`pareto_front` where each axis says which way is better ("lower" or "higher"); sorted by x."""
    for name, way in (("x", x_better), ("y", y_better)):
        if way not in ("lower", "higher"):
            raise ValueError(f"{name}_better must be 'lower' or 'higher', got {way!r}")
    sx, sy = (1.0 if x_better == "lower" else -1.0), (1.0 if y_better == "higher" else -1.0)
    front = pareto_front([(sx * x, sy * y) for x, y in points])
    return sorted(front, key=lambda i: points[i][0])


def benchmark_plot(cloud: Sequence[Tuple[float, float]], cells: Sequence[Tuple[str, float, float]], path: str,
                   x_label: str, y_label: str, x_better: str = "lower", y_better: str = "higher",
                   title: str = "") -> str:
    """A sweep's cells (label, x, y) on two measured axes over a benchmark's whole cloud of cells and that cloud's
    Pareto front (each axis better `lower` or `higher`: accuracy up, energy or latency down)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    ax.scatter([p[0] for p in cloud], [p[1] for p in cloud], s=6, color="#b0b0b0", alpha=0.5, lw=0,
               label=f"benchmark ({len(cloud):,} cells)")
    front = [cloud[i] for i in directed_front(cloud, x_better, y_better)]
    stairs = "steps-post" if x_better == "lower" else "steps-pre"  # the edge of the region the front dominates
    ax.plot([p[0] for p in front], [p[1] for p in front], "-o", ms=3, drawstyle=stairs, color="crimson", lw=1.3,
            label=f"benchmark Pareto front ({len(front)} cells)")
    for k, (label, x, y) in enumerate(cells):
        ax.scatter([x], [y], s=60, marker="*", color=plt.get_cmap("viridis")(0.85 * k / max(1, len(cells) - 1)),
                   edgecolor="black", lw=0.6, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if cells:
        ax.scatter([], [], s=60, marker="*", color="white", edgecolor="black", lw=0.6, label="this sweep's cells")
    ax.set_xlabel(f"{x_label} ({x_better} is better)")
    ax.set_ylabel(f"{y_label} ({y_better} is better)")
    ax.set_title(title or f"{y_label} vs {x_label}: the sweep over the benchmark")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def pareto_plot(rows: List[dict], path: str, acc_key: str, title: str = "") -> str:
    """Accuracy vs estimated energy: runs as dots, mean +- std per energy weight, the front of the means."""
    import numpy as np
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    weights = sorted({r["energy_weight"] for r in rows})
    cmap = plt.get_cmap("viridis")
    means = []
    for k, w in enumerate(weights):
        pts = [(r["genotype_energy_mj"], r[acc_key]) for r in rows if r["energy_weight"] == w
               and r.get(acc_key) is not None]
        if not pts:
            continue
        color = cmap(0.85 * k / max(1, len(weights) - 1))  # stop before viridis's pale yellow end
        e, a = np.array(pts).T
        ax.scatter(e, a, color=color, alpha=0.35, s=25)
        me, ma = e.mean(), a.mean()
        ax.errorbar(me, ma, xerr=e.std(), yerr=a.std(), fmt="o", ms=8, color=color, capsize=4,
                    label=f"energy weight {w:g} (n={len(pts)})")
        ax.annotate(f"w={w:g}", (me, ma), textcoords="offset points", xytext=(7, 7), fontsize=9)
        means.append((me, ma))
    if means:
        front = pareto_front(means)
        ax.plot([means[i][0] for i in front], [means[i][1] for i in front], "--D", color="crimson", lw=1.5, ms=15,
                mfc="none", mew=1.5, label="Pareto front (of the means)")  # marked even when it is one point
    ax.margins(0.12)  # room for the labels at the edges
    ax.set_xlabel("estimated energy of the derived network (mJ per image)")
    ax.set_ylabel({"valid_acc": "validation accuracy (%)", "test_acc": "test accuracy (%)"}.get(acc_key, acc_key))
    ax.set_title(title or "accuracy vs energy, mean +- std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def search_figures(run_dir: str, rows: List[dict], alphas: Dict[str, list], primitives: Sequence[str],
                   title: str = "", row_labels: Optional[Sequence[str]] = None) -> Dict[str, Optional[str]]:
    """The per-epoch figures of a search run folder (paths by name)."""
    return {"alphas": alpha_heatmaps(alphas, primitives, os.path.join(run_dir, "alphas.png"),
                                     f"{title} epoch {rows[-1]['epoch']}".strip(), row_labels),
            "curves": curves(rows, os.path.join(run_dir, "curves.png"), SEARCH_PANELS, title)}


def search_epoch_figures(run_dir: str, alphas: Dict[str, list], primitives: Sequence[str], run_name: str, space,
                         genotype, network: tuple, epoch: int) -> Dict[str, str]:
    """A search's figures after an epoch: alpha heatmaps and curves from its metrics.jsonl (`search_figures`), and
    the cells of `genotype` (a genotype of `space`, spaces.py) in cells/ with per-op energies of the network
    `(info, channels, layers, estimator)` train.py builds from it. Returns name -> PNG path."""
    from plumbing import jsonfile
    rows = jsonfile.read_lines(os.path.join(run_dir, "metrics.jsonl"), "metrics file")
    paths = search_figures(run_dir, rows, alphas, primitives, run_name, space.edge_labels())
    cells = space.render(genotype, os.path.join(run_dir, "cells"), *network, name=f"epoch {epoch}")
    paths.update({f"cell_{os.path.basename(p)[:-4]}": p for p in cells if p.endswith(".png")})
    return paths
