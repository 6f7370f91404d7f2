"""Derivation: from the supernet's architecture weights to the cells a search writes, in one place.

A cell is a `CellPairs` list of `(op, input)` pairs, two per intermediate node (inputs 0 and 1 are the cell's
inputs, 2.. the earlier nodes). Its weights are the supernet's (edges x ops) softmaxed alphas of that cell kind.
`derivable(primitives)` names the ops derivation may choose (never `none`). Here:
- `derive`: DARTS's rule (per node the 2 strongest incoming edges, on each the strongest derivable op);
- `guard_derivation`: P-DARTS-style guards on the normal cell (--max_skip, --min_parametric);
- `project_to_budget`: op swaps that bring the derived network within an energy budget (--energy_budget);
- `cell_stats` and `ranking`: what the search logs each epoch and what early stopping watches.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from genotypes import Genotype
from operations import is_parametric, is_pool
from plumbing.cliargs import CLIError

Pair = Tuple[str, int]
CellPairs = List[Pair]
Weights = Sequence[Sequence[float]]  # one cell kind's (edges x ops) softmaxed alphas


def derivable(primitives: Sequence[str], none: bool = False) -> List[int]:
    """Indices of the ops derivation may choose: every primitive but `none` (DARTS); all of them where `none` is a
    member of the space (NAS-Bench-201, `none=True`)."""
    return [k for k, p in enumerate(primitives) if none or p != "none"]


def edge_rows(pairs: Sequence[Sequence[Any]]) -> List[int]:
    """For a cell's (op, input) pairs, two per node, the row of each pair's edge in the supernet's (edges x ops)
    alphas: node i's incoming edges start at row 2 + 3 + ... + (i + 1)."""
    return [sum(2 + n for n in range(p // 2)) + j for p, (_, j) in enumerate(pairs)]


def derive(weights: Weights, primitives: Sequence[str], steps: int) -> CellPairs:
    """DARTS derivation on one cell's weights: `none` is never chosen nor counts for strength."""
    usable = derivable(primitives)
    gene, start = [], 0
    for i in range(steps):
        W = weights[start:start + 2 + i]
        edges = sorted(range(i + 2), key=lambda j: -max(W[j][k] for k in usable))[:2]
        for j in edges:  # strongest first, as DARTS writes them
            best = max(usable, key=lambda k: W[j][k])
            gene.append((primitives[best], j))
        start += 2 + i
    return gene


def guard_derivation(weights: Weights, primitives: Sequence[str], gene: Sequence[Pair],
                     max_skip: Optional[int] = None, min_parametric: int = 0,
                     actions: Optional[List[str]] = None, rows: Optional[Sequence[int]] = None,
                     edge_names: Optional[Sequence[str]] = None) -> CellPairs:
    """P-DARTS-style guards on a derived cell `gene` (from `derive(weights, ...)`): while it holds more than
    `max_skip` skip_connects, the weakest one (by its own softmax weight) becomes its edge's best parametric op;
    then, while it holds fewer than `min_parametric` parametric ops, the weakest parameter-free choice does. Each
    node keeps its inputs (only the op on a kept edge changes). `actions` receives one line per rewrite; nodes are
    numbered as genotype inputs are (2 = the first intermediate node). Other cell layouts (NAS-Bench-201) give the
    weight row of each gene entry (`rows`, default DARTS's) and the edges' names for `actions`."""
    parametric = [k for k in derivable(primitives) if is_parametric(primitives[k])]
    gene = list(gene)
    if (max_skip is None and min_parametric <= 0) or not parametric:
        return gene
    index = {p: k for k, p in enumerate(primitives)}
    rows = list(rows) if rows is not None else edge_rows(gene)

    def rewrite(pos: int, why: str) -> None:
        op, j = gene[pos]
        W = weights[rows[pos]]
        best = max(parametric, key=lambda k: W[k])
        gene[pos] = (primitives[best], j)
        if actions is not None:
            where = edge_names[pos] if edge_names is not None else f"(node {pos // 2 + 2}, input {j})"
            actions.append(f"{why} replaced {op} on edge {where} by {primitives[best]}")

    def weakest(pred) -> Optional[int]:
        cands = [p for p, (op, _) in enumerate(gene) if pred(op)]
        return min(cands, key=lambda p: weights[rows[p]][index[gene[p][0]]]) if cands else None

    while max_skip is not None and sum(op == "skip_connect" for op, _ in gene) > max_skip:
        rewrite(weakest(lambda op: op == "skip_connect"), "max_skip")
    while sum(is_parametric(op) for op, _ in gene) < min(min_parametric, len(gene)):
        rewrite(weakest(lambda op: not is_parametric(op)), "min_parametric")
    return gene


class Swap(NamedTuple):
    """One candidate change of `project_to_budget`: `kind` cell, pair `pos` to op `new`."""
    kind: str
    pos: int
    new: str
    score_gain: float  # change of the cell's log-weight score (negative: a worse cell)
    energy_delta: float  # change of the network's energy, mJ


def project_to_budget(cells: Dict[str, CellPairs], weights: Dict[str, Weights], primitives: Sequence[str],
                      cost: Callable[[str, str, int], float], base: float, budget_mj: float,
                      max_skip: Optional[int] = None, min_parametric: int = 0,
                      actions: Optional[List[str]] = None, tolerance: float = 0.05) -> Dict[str, CellPairs]:
    """The derived cells (`{"normal": pairs, "reduce": pairs}`) with ops swapped until the network's energy
    `base + sum cost(kind, op, input)` (mJ) lies in [(1 - tolerance) budget, budget], keeping each node's inputs.

    The score of a cell is the sum of log softmax weights of its ops (`weights[kind]`). Over budget, the swap that
    loses the least score per mJ saved is taken, again and again (a greedy multiple-choice knapsack); then swaps
    that raise the score and still fit are taken, best first, so a coarse last step does not leave budget unused;
    still under the band, the swap that loses the least score per mJ spent. The normal cell's guards hold
    throughout (never more than `max_skip` skip_connects, never fewer than `min_parametric` parametric ops than it
    already has). Out of reach, the result is the cheapest (or dearest) cell reachable. `actions` receives one line
    per swap."""
    usable = derivable(primitives)
    index = {p: k for k, p in enumerate(primitives)}
    cells = {kind: list(pairs) for kind, pairs in cells.items()}
    rows = {kind: edge_rows(pairs) for kind, pairs in cells.items()}
    floor = min(min_parametric, sum(is_parametric(op) for op, _ in cells.get("normal", [])))

    def score(kind: str, p: int, k: int) -> float:
        return math.log(max(weights[kind][rows[kind][p]][k], 1e-30))

    def energy() -> float:
        return base + sum(cost(kind, op, j) for kind, pairs in cells.items() for op, j in pairs)

    def allowed(kind: str, p: int, new: str) -> bool:
        if kind != "normal":
            return True
        ops = [op for op, _ in cells[kind]]
        ops[p] = new
        return ((max_skip is None or ops.count("skip_connect") <= max_skip)
                and sum(is_parametric(op) for op in ops) >= floor)

    def swaps() -> List[Swap]:
        return [Swap(kind, p, primitives[k], score(kind, p, k) - score(kind, p, index[op]),
                     cost(kind, primitives[k], j) - cost(kind, op, j))
                for kind, pairs in cells.items() for p, (op, j) in enumerate(pairs)
                for k in usable if primitives[k] != op and allowed(kind, p, primitives[k])]

    def apply(s: Swap, why: str) -> None:
        op, j = cells[s.kind][s.pos]
        cells[s.kind][s.pos] = (s.new, j)
        if actions is not None:
            actions.append(f"energy budget ({why}): {s.kind} cell, edge (node {s.pos // 2 + 2}, input {j}): {op} -> "
                           f"{s.new}, network {energy():.4f} mJ (budget {budget_mj:.4f})")

    while energy() > budget_mj:  # cheaper: least score lost per mJ saved
        cheaper = [s for s in swaps() if s.energy_delta < 0]
        if not cheaper:
            break
        apply(min(cheaper, key=lambda s: s.score_gain / s.energy_delta), "over")
    while True:  # better and still within the budget: most score gained
        room = budget_mj - energy()
        better = [s for s in swaps() if s.score_gain > 1e-12 and s.energy_delta <= room + 1e-12]
        if not better or room < -1e-12:
            break
        apply(max(better, key=lambda s: s.score_gain), "fill")
    while energy() < (1.0 - tolerance) * budget_mj:  # under the band: least score lost per mJ spent
        room = budget_mj - energy()
        dearer = [s for s in swaps() if 0 < s.energy_delta <= room + 1e-12]
        if not dearer:
            break
        apply(min(dearer, key=lambda s: -s.score_gain / s.energy_delta), "under")
    return cells


def cell_stats(normal: Sequence[Pair], alphas: Dict[str, Any]) -> Dict[str, float]:
    """Counts of parametric / skip / pool ops in a derived normal cell (NB201: its one cell), and the mean entropy
    of the softmaxed alphas (every row of every cell kind)."""
    ops = [op for op, _ in normal]
    entropy = float(np.mean([-(np.asarray(row) * np.log(np.clip(row, 1e-12, None))).sum()
                             for kind in ("normal", "reduce", "cell") if kind in alphas for row in alphas[kind]]))
    return {"normal_parametric": sum(is_parametric(op) for op in ops),
            "normal_skip": ops.count("skip_connect"),
            "normal_pool": sum(is_pool(op) for op in ops),
            "alpha_entropy": entropy}


def ranking(weights: Dict[str, Weights], primitives: Sequence[str]) -> Tuple[Tuple[int, ...], ...]:
    """The strongest derivable op of every edge of every cell kind: what --patience watches."""
    usable = derivable(primitives)
    return tuple(tuple(max(usable, key=lambda k: row[k]) for row in weights[kind]) for kind in sorted(weights))


def derive_genotype(weights: Dict[str, Weights], primitives: Sequence[str], steps: int, concat: Sequence[int],
                    max_skip: Optional[int] = None, min_parametric: int = 0,
                    actions: Optional[List[str]] = None) -> Genotype:
    """Both cells by DARTS's rule, the normal one guarded (`guard_derivation`; the defaults are plain DARTS)."""
    normal = derive(weights["normal"], primitives, steps)
    normal = guard_derivation(weights["normal"], primitives, normal, max_skip, min_parametric, actions)
    return Genotype(normal, list(concat), derive(weights["reduce"], primitives, steps), list(concat))


def project_genotype(genotype: Genotype, weights: Dict[str, Weights], primitives: Sequence[str], costs,
                     budget_mj: float, max_skip: Optional[int] = None, min_parametric: int = 0,
                     actions: Optional[List[str]] = None) -> Genotype:
    """`genotype` projected onto `budget_mj` with the additive prices of `costs` (model.CellCosts)."""
    cells = project_to_budget({"normal": genotype.normal, "reduce": genotype.reduce}, weights, primitives,
                              costs.cost, costs.base, budget_mj, max_skip, min_parametric, actions)
    return Genotype(cells["normal"], genotype.normal_concat, cells["reduce"], genotype.reduce_concat)


# ------------------------------------------------------------ guards' flags and the early stop (DARTS+)
def check_guard_args(args: argparse.Namespace, pairs: int = 2 * 4) -> None:
    """--max_skip / --min_parametric fit a normal cell of `pairs` ops; the warm-up leaves epochs to search."""
    if args.min_parametric is None:
        args.min_parametric = 2 if args.max_skip is not None else 0
    if args.min_parametric > pairs or (args.max_skip or 0) > pairs:
        raise CLIError(f"--max_skip / --min_parametric must be at most {pairs} (ops in a normal cell)")
    if args.min_parametric and not any(is_parametric(p) for p in args.primitives if p != "none"):
        raise CLIError("--min_parametric needs a parametric op among --primitives")
    if args.warmup_epochs >= args.epochs:
        raise CLIError(f"--warmup_epochs {args.warmup_epochs} leaves no epoch to search the alphas "
                       f"(--epochs {args.epochs})")


class CollapseStopper:
    """DARTS+ early stop. Feed `update()` the UNGUARDED genotype of each epoch (and optionally the ranking of ops,
    e.g. the argmax per edge; the genotype itself by default) plus the `result` that epoch would write. Stops when
    the normal cell holds more than `max_skips` skip_connects for `consecutive` epochs in a row, or when the
    ranking has not changed for `patience` epochs. `result` / `result_epoch` are then those of the last healthy
    epoch (unguarded normal cell within `max_skips`); without one, those of the least collapsed epoch (fewest
    skips, the latest of equals), and `reason` says so. The whole state is in `state_dict()` (plain values, for a
    weights_only checkpoint), so a resumed search keeps what it kept and knows that it stopped."""

    def __init__(self, max_skips: int = 2, consecutive: int = 2, patience: Optional[int] = None) -> None:
        self.max_skips, self.consecutive, self.patience = max_skips, consecutive, patience
        self.collapsed_run = 0
        self.stable_run = 0
        self.last_ranking: Optional[Hashable] = None
        self.result: Any = None
        self.result_epoch: Optional[int] = None
        self.result_skips: Optional[int] = None
        self.reason: Optional[str] = None
        self.stopped = False

    @staticmethod
    def skips(genotype) -> int:
        return sum(op == "skip_connect" for op, _ in genotype.normal)

    @property
    def healthy_kept(self) -> bool:
        return self.result_skips is not None and self.result_skips <= self.max_skips

    def update(self, epoch: int, genotype, result: Any = None, ranking: Optional[Hashable] = None) -> bool:
        """Record one epoch; True when the search should stop now."""
        result = genotype if result is None else result
        ranking = (tuple(map(tuple, genotype.normal)), tuple(map(tuple, genotype.reduce))) \
            if ranking is None else ranking
        skips = self.skips(genotype)
        if skips > self.max_skips:
            self.collapsed_run += 1
        else:
            self.collapsed_run = 0
        if skips <= self.max_skips or not self.healthy_kept and (self.result_skips is None
                                                                   or skips <= self.result_skips):
            self.result, self.result_epoch, self.result_skips = result, epoch, skips
        self.stable_run = self.stable_run + 1 if ranking == self.last_ranking else 0
        self.last_ranking = ranking
        if self.collapsed_run >= self.consecutive:
            self._stop(f"the unguarded normal cell held more than {self.max_skips} skip_connects ({skips} now) "
                       f"for {self.consecutive} epochs")
        elif self.patience is not None and self.stable_run >= self.patience:
            self._stop(f"the ranking of ops has been stable for {self.patience} epochs")
        return self.stopped

    def _stop(self, why: str) -> None:
        kept = (f"keeping the genotype of epoch {self.result_epoch}" if self.healthy_kept else
                f"no epoch was healthy: keeping the least collapsed one, epoch {self.result_epoch} "
                f"({self.result_skips} skip_connects)")
        self.stopped, self.reason = True, f"early stop: {why}; {kept}"

    def state_dict(self) -> Dict[str, Any]:
        """Everything, as plain values; `result` must itself be plain (the search keeps a genotype dict and row)."""
        return {"collapsed_run": self.collapsed_run, "stable_run": self.stable_run,
                "last_ranking": _lists(self.last_ranking), "result": self.result, "result_epoch": self.result_epoch,
                "result_skips": self.result_skips, "reason": self.reason, "stopped": self.stopped}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore `state_dict()`; ValueError (or TypeError) on a value of the wrong kind."""
        counters = [state.get(k, 0) for k in ("collapsed_run", "stable_run")]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counters):
            raise ValueError(f"counters {counters} are not non-negative integers")
        result = state.get("result")
        if result is not None and not (isinstance(result, dict) and isinstance(result.get("genotype"), dict)
                                       and isinstance(result.get("row"), dict)):
            raise ValueError("the kept result is not a genotype and its row")
        self.collapsed_run, self.stable_run = counters
        self.last_ranking = _tuples(state.get("last_ranking"))
        self.result, self.result_epoch = result, state.get("result_epoch")
        self.result_skips, self.reason = state.get("result_skips"), state.get("reason")
        self.stopped = bool(state.get("stopped", False))


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
