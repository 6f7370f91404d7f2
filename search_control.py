"""Per-epoch controllers of a search, fed the derived cell: early stop on skip collapse (DARTS+), an energy
budget's Lagrange multiplier and the projection of a derived cell onto the budget. Pure (no tensors, no files):
train_search.py feeds them, tests drive them directly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple


class CollapseStopper:
    """DARTS+ early stop. Feed `update()` the UNGUARDED genotype of each epoch (and optionally the ranking of ops,
    e.g. the argmax per edge; the genotype itself by default) plus the `result` that epoch would write. Stops when
    the normal cell holds more than `max_skips` skip_connects for `consecutive` epochs in a row, or when the
    ranking has not changed for `patience` epochs. `result` / `result_epoch` are then those of the last healthy
    epoch (the earliest epoch if none was healthy); `reason` says why it stopped."""

    def __init__(self, max_skips: int = 2, consecutive: int = 2, patience: Optional[int] = None) -> None:
        self.max_skips, self.consecutive, self.patience = max_skips, consecutive, patience
        self.collapsed_run = 0
        self.stable_run = 0
        self.last_ranking: Optional[Hashable] = None
        self.result: Any = None
        self.result_epoch: Optional[int] = None
        self.reason: Optional[str] = None

    @staticmethod
    def skips(genotype) -> int:
        return sum(op == "skip_connect" for op, _ in genotype.normal)

    def update(self, epoch: int, genotype, result: Any = None, ranking: Optional[Hashable] = None) -> bool:
        """Record one epoch; True when the search should stop now."""
        result = genotype if result is None else result
        ranking = (tuple(map(tuple, genotype.normal)), tuple(map(tuple, genotype.reduce))) \
            if ranking is None else ranking
        skips = self.skips(genotype)
        if skips > self.max_skips:
            self.collapsed_run += 1
            if self.result is None:  # no healthy epoch yet: the earliest is the best we have
                self.result, self.result_epoch = result, epoch
        else:
            self.collapsed_run = 0
            self.result, self.result_epoch = result, epoch
        self.stable_run = self.stable_run + 1 if ranking == self.last_ranking else 0
        self.last_ranking = ranking
        if self.collapsed_run >= self.consecutive:
            self.reason = (f"early stop: the unguarded normal cell held more than {self.max_skips} skip_connects "
                           f"({skips} now) for {self.consecutive} epochs; keeping the genotype of epoch "
                           f"{self.result_epoch}")
            return True
        if self.patience is not None and self.stable_run >= self.patience:
            self.reason = (f"early stop: the ranking of ops has been stable for {self.patience} epochs; keeping the "
                           f"genotype of epoch {self.result_epoch}")
            return True
        return False

    def state_dict(self) -> Dict[str, Any]:
        """Counters only (plain values, for a weights_only checkpoint); the kept genotype is in genotype.json."""
        return {"collapsed_run": self.collapsed_run, "stable_run": self.stable_run}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.collapsed_run = int(state.get("collapsed_run", 0))
        self.stable_run = int(state.get("stable_run", 0))


class BudgetController:
    """Energy budget as a constraint, E_derived <= budget, with a Lagrange multiplier: after each measurement of
    the derived network's energy, lambda <- clip(lambda + rate * (E / budget - 1), 0, max_lambda). lambda
    multiplies the normalized expected energy in the alphas' objective, so it rises while the derived cell is
    over budget and decays to 0 (no energy pressure at all) while it is under: only excess energy is penalized.
    The derived energy is measured directly (not mapped from the supernet's expected energy, whose widths and
    depth differ from the network train.py builds)."""

    def __init__(self, budget_mj: float, rate: float = 0.02, lam: float = 0.0, max_lambda: float = 10.0) -> None:
        if budget_mj <= 0:
            raise ValueError("the energy budget must be positive")
        self.budget_mj, self.rate, self.lam, self.max_lambda = budget_mj, rate, lam, max_lambda

    def update(self, energy_mj: float) -> float:
        """One multiplier step from a measured derived energy (mJ per image); returns the new lambda."""
        self.lam = min(self.max_lambda, max(0.0, self.lam + self.rate * (energy_mj / self.budget_mj - 1.0)))
        return self.lam

    def within(self, energy_mj: float, tolerance: float = 0.1) -> bool:
        return abs(energy_mj / self.budget_mj - 1.0) <= tolerance


Pair = Tuple[str, int]


def project_to_budget(cells: Dict[str, List[Pair]], weights: Dict[str, Sequence[Sequence[float]]],
                      primitives: Sequence[str], cost: Callable[[str, str, int], float], base: float,
                      budget_mj: float, max_skip: Optional[int] = None, min_parametric: int = 0,
                      actions: Optional[List[str]] = None, tolerance: float = 0.05) -> Dict[str, List[Pair]]:
    """The derived cells (`{"normal": pairs, "reduce": pairs}`) with ops swapped until the network's energy
    `base + sum cost(kind, op, input)` (mJ) lies in [(1 - tolerance) budget, budget], keeping each node's inputs.

    The score of a cell is the sum of log softmax weights of its ops (`weights[kind]`: edges x ops, as `derive`
    reads them). Over budget, the swap that loses the least score per mJ saved is taken, again and again (a greedy
    multiple-choice knapsack); then swaps that raise the score and still fit are taken, best first, so a coarse
    last step does not leave budget unused; still under the band, the swap that loses the least score per mJ
    spent. The budget is what the user can afford: the penalty of the search acts only above it, but the written
    cell spends it. The normal cell's guards hold throughout (never more than `max_skip` skip_connects, never fewer
    than `min_parametric` parametric ops than it already has). Out of reach, the result is the cheapest (or
    dearest) cell reachable. `actions` receives one line per swap."""
    from genotypes import edge_rows
    from operations import is_parametric
    usable = [k for k, p in enumerate(primitives) if p != "none"]
    index = {p: k for k, p in enumerate(primitives)}
    cells = {kind: list(pairs) for kind, pairs in cells.items()}
    rows = {kind: edge_rows(pairs) for kind, pairs in cells.items()}

    def score(kind: str, p: int, k: int) -> float:
        return math.log(max(weights[kind][rows[kind][p]][k], 1e-30))

    def energy() -> float:
        return base + sum(cost(kind, op, j) for kind, pairs in cells.items() for op, j in pairs)

    floor = sum(is_parametric(op) for op, _ in cells.get("normal", []))
    floor = min(min_parametric, floor)

    def allowed(kind: str, p: int, new: str) -> bool:
        if kind != "normal":
            return True
        ops = [op for op, _ in cells[kind]]
        ops[p] = new
        return ((max_skip is None or ops.count("skip_connect") <= max_skip)
                and sum(is_parametric(op) for op in ops) >= floor)

    def swaps():
        for kind, pairs in cells.items():
            for p, (op, j) in enumerate(pairs):
                for k in usable:
                    new = primitives[k]
                    if new != op and allowed(kind, p, new):
                        yield (kind, p, new, score(kind, p, k) - score(kind, p, index[op]),
                               cost(kind, new, j) - cost(kind, op, j))

    def apply(kind: str, p: int, new: str, why: str) -> None:
        op, j = cells[kind][p]
        cells[kind][p] = (new, j)
        if actions is not None:
            actions.append(f"energy budget ({why}): {kind} cell, edge (node {p // 2 + 2}, input {j}): {op} -> {new}, "
                           f"network {energy():.4f} mJ (budget {budget_mj:.4f})")

    while energy() > budget_mj:  # cheaper: least score lost per mJ saved
        cheaper = [s for s in swaps() if s[4] < 0]
        if not cheaper:
            break
        kind, p, new, _, _ = min(cheaper, key=lambda s: -s[3] / -s[4])
        apply(kind, p, new, "over")
    while True:  # better and still within the budget: most score gained
        room = budget_mj - energy()
        better = [s for s in swaps() if s[3] > 1e-12 and s[4] <= room + 1e-12]
        if not better or room < -1e-12:
            break
        kind, p, new, _, _ = max(better, key=lambda s: s[3])
        apply(kind, p, new, "fill")
    while energy() < (1.0 - tolerance) * budget_mj:  # under the band: least score lost per mJ spent
        room = budget_mj - energy()
        dearer = [s for s in swaps() if 0 < s[4] <= room + 1e-12]
        if not dearer:
            break
        kind, p, new, _, _ = min(dearer, key=lambda s: -s[3] / s[4])
        apply(kind, p, new, "under")
    return cells
