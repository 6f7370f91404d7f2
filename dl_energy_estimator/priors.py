"""The prior bank: coefficient sets learned from measured devices, shipped as ``priors.json`` beside this file.

A fit starts from a prior and shrinks toward it (``fitting.py``); with a few measurements of a new device, the
analytical default can be far from it (an edge GPU at batch 1 pays for kernel launches, not MACs), while a
measured device of the same kind is close. ``fit(..., prior="auto")`` therefore scores every bank entry (and the
analytical default) by the evidence of its *scaled* coefficients for the measurements given (one scale, and a
constant per pass for whole networks: how well that device, up to its speed, explains them) and starts from the
best; ``prior=NAME`` starts from that entry. Each entry records where it came from (``bench/prior_bank.py``
writes the file from ``../shared/measurements``; nothing here reads that folder).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Sequence

import numpy as np

from .defaults import FAMILIES, FEATURES, PARENTS, analytical_coefficients
from .fitting import COLUMNS, design_row, evidence
from .schema import EnergyModelError

BANK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "priors.json")
ANALYTICAL = "analytical"


class PriorError(EnergyModelError):
    """An unknown prior name or an unreadable bank (one line, names what to do)."""


@lru_cache(maxsize=4)
def load(path: str = BANK) -> dict:
    """The bank document ({"format", "about", "source", "priors": {name: entry}}); PriorError if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise PriorError(f"cannot read the prior bank {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "prior_bank" or not isinstance(doc.get("priors"), dict):
        raise PriorError(f"{path} is not a prior bank")
    return doc


def names(path: str = BANK) -> list[str]:
    """The bank's entries, in file order (the analytical default is not one of them)."""
    return list(load(path)["priors"])


def coefficients(name: str, path: str = BANK) -> dict[str, dict[str, float]]:
    """Every family's coefficients of one entry (``analytical``: the default). Families the entry's devices never
    ran (none of NB201's networks has a depthwise conv) keep the default times the entry's median ratio to it."""
    default = analytical_coefficients()
    if name == ANALYTICAL:
        return default
    bank = load(path)["priors"]
    if name not in bank:
        raise PriorError(f"unknown prior {name!r}; the bank holds {', '.join(bank)} (or 'auto', '{ANALYTICAL}')")
    learned = bank[name]["coefficients"]
    ratios = [learned[f][k] / default[f][k] for f in learned for k in FEATURES
              if f in default and default[f][k] > 0 and learned[f][k] > 0]
    r = float(np.median(ratios)) if ratios else 1.0
    out = {}
    for fam in FAMILIES:
        src = learned.get(fam) or learned.get(PARENTS.get(fam, ""))
        out[fam] = ({k: float(src[k]) for k in FEATURES} if src
                    else {k: default[fam][k] * r for k in FEATURES})
    return out


def score(feats: Sequence[dict[str, np.ndarray]], y: Sequence[float], candidates: Sequence[str],
          constant: bool, path: str = BANK) -> list[dict]:
    """Per candidate prior: the log evidence of its scaled coefficients for the measurements (the best of with
    and without a constant when ``constant``), best first."""
    y_arr = np.asarray(y, dtype=float)
    rows = []
    for name in candidates:
        coef = coefficients(name, path)
        A = np.array([design_row(f, coef) for f in feats]).reshape(len(feats), len(COLUMNS))
        ev = max(evidence(A, y_arr, "global", ic)["log_evidence"] for ic in ((False, True) if constant else (False,)))
        rows.append({"prior": name, "log_evidence": float(ev)})
    return sorted(rows, key=lambda r: -r["log_evidence"])


def choose(feats: Sequence[dict[str, np.ndarray]], y: Sequence[float], constant: bool,
           exclude: Sequence[str] = (), path: str = BANK) -> tuple[str, list[dict]]:
    """The bank entry (or the analytical default) whose scaled coefficients explain the measurements best, and
    the scores of all (``exclude``: entries left out, e.g. the device being fitted when judging the bank)."""
    cands = [ANALYTICAL] + [n for n in names(path) if n not in set(exclude)]
    rows = score(feats, y, cands, constant, path)
    return rows[0]["prior"], rows
