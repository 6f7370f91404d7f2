"""Per-epoch controllers of a search, fed the derived cell: early stop on skip collapse (DARTS+) and an energy
budget's Lagrange multiplier. Pure (no torch, no files): train_search.py feeds them, tests drive them directly.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Optional


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
