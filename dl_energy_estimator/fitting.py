"""Non-negative least-squares fit of per-family coefficients (relative errors, shrunk toward a global scale).

Unknowns are *multipliers* ``m`` of the prior (default) coefficients, one per (family, feature):
``coef = prior * m``. Column ``j`` of the design matrix is the prior's energy contribution of that feature, so
all columns are in joules (well conditioned); each row is divided by its measured target, so the fit minimises
relative errors. Two stages:

1. a global scale ``g`` (closed form, least squares of ``g * prior_prediction / measured - 1``);
2. ``scipy.optimize.nnls`` for ``m / g`` with small ridge rows pulling each multiplier toward 1. The ridge makes
   collinear columns (e.g. ReLU's MACs and bytes are proportional) well-posed, and families with no data simply
   keep their prior coefficient scaled by ``g``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import nnls

from .defaults import FAMILIES, FEATURES

COLUMNS = [(fam, k) for fam in FAMILIES for k in range(len(FEATURES))]


def design_row(per_family: dict[str, np.ndarray], prior: dict[str, dict[str, float]]) -> np.ndarray:
    """Prior energy contribution of each (family, feature) column for one sample (per-sample features)."""
    row = np.zeros(len(COLUMNS))
    for j, (fam, k) in enumerate(COLUMNS):
        if fam in per_family:
            row[j] = per_family[fam][k] * prior[fam][FEATURES[k]]
    return row


def fit_multipliers(A: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, float]:
    """Multipliers (len(COLUMNS)) and the global scale, from design matrix A (n x cols) and targets y (J)."""
    y = np.asarray(y, dtype=float)
    if A.shape[0] == 0:
        raise ValueError("fit needs at least one sample")
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("measured energies must be finite and > 0")
    Aw = A / y[:, None]
    p = Aw.sum(1)
    if not np.any(p > 0):
        raise ValueError("the samples have no features to fit (every traced layer is free)")
    g = float(p.sum() / (p * p).sum())
    active = np.flatnonzero(np.abs(Aw).sum(0) > 0)
    Ag = Aw[:, active] * g
    lam = math.sqrt(ridge)
    M = np.vstack([Ag, lam * np.eye(len(active))])
    b = np.concatenate([np.ones(len(y)), lam * np.ones(len(active))])
    sol, _ = nnls(M, b, maxiter=50 * M.shape[1])
    m = np.full(len(COLUMNS), g)
    m[active] = sol * g
    return m, g
