"""Per-epoch controllers of a search, fed the derived cell, and their flags: early stop on skip collapse (DARTS+),
the energy weight's warm-up and ramp, and an energy budget's Lagrange multiplier. Pure (no tensors, no files):
train_search.py feeds them, tests drive them directly.
The projection of a derived cell onto the budget is derivation's (`derivation.project_to_budget`).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Hashable, Optional

from cliargs import CLIError, nonneg_int, positive_float, positive_int
from derivation import project_to_budget  # noqa: F401 (re-exported: the budget's projection of a derived cell)
from operations import is_parametric


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags against skip/pool collapse (README, "Avoiding collapse"); all off by default (plain DARTS)."""
    g = p.add_argument_group("collapse guards and energy budget")
    g.add_argument("--warmup_epochs", type=nonneg_int, default=0,
                   help="train the weights only (alphas frozen) for the first N epochs (PC-DARTS)")
    g.add_argument("--energy_ramp_epochs", type=nonneg_int, default=0,
                   help="after the warm-up, ramp the energy weight in linearly over M epochs")
    g.add_argument("--max_skip", type=nonneg_int, default=None,
                   help="cap skip_connects in the derived normal cell (P-DARTS: 2)")
    g.add_argument("--min_parametric", type=nonneg_int, default=None,
                   help="at least K parametric ops in the derived normal cell (default 2 with --max_skip, else 0)")
    g.add_argument("--early_stop", action="store_true",
                   help="DARTS+: stop when the unguarded normal cell holds >2 skips for 2 epochs (or --patience)")
    g.add_argument("--patience", type=positive_int, default=None,
                   help="with --early_stop: also stop when the ranking of ops is stable for N epochs")
    g.add_argument("--energy_budget", type=positive_float, default=None,
                   help="mJ per image of the derived network: adaptive penalty on energy above it (replaces "
                        "--energy_weight); the written cell is projected to within 5 %% under it")
    g.add_argument("--budget_rate", type=positive_float, default=0.02,
                   help="step of the budget's Lagrange multiplier per architecture step")


def check_args(args: argparse.Namespace, pairs: int = 2 * 4) -> None:
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


def energy_scale(epoch: int, warmup_epochs: int, ramp_epochs: int) -> float:
    """The energy weight's share in `epoch` (0-based): 0 during the warm-up, then a linear ramp over
    `ramp_epochs` (1 without one)."""
    if epoch < warmup_epochs:
        return 0.0
    return min(1.0, (epoch - warmup_epochs + 1) / ramp_epochs) if ramp_epochs else 1.0




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

    def state_dict(self) -> Dict[str, Any]:
        return {"lam": self.lam}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        lam = state.get("lam")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= self.max_lambda:
            raise ValueError(f"lambda {lam!r} is not a number in [0, {self.max_lambda}]")
        self.lam = float(lam)

    def within(self, energy_mj: float, tolerance: float = 0.1) -> bool:
        return abs(energy_mj / self.budget_mj - 1.0) <= tolerance
