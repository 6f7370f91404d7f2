"""Fitting the coefficients to measurements: the prior's coefficients shrunk toward the data by the evidence.

Unknowns are non-negative *multipliers* of the prior coefficients, one per (family, feature) column:
``coef = prior * m``. Column ``j`` of the design matrix ``A`` is the prior's energy contribution of that feature
(joules), and each row is divided by its measured target, so every fit minimises relative errors.

:func:`fit_cv` fits ``m = s * v``: ``s`` one scale for the whole prior (with the constant per forward pass when
one is allowed), ``v`` one factor per group of columns (a *structure*: ``global`` one group; ``feature``
compute / memory / calls; ``family`` one per layer family; ``calls`` per family's calls, compute and memory sharing
one; ``family_calls`` per family compute+memory and calls; ``full`` per family x feature), each pulled toward 1 by
a Gaussian prior ``v ~ N(1, tau^2)``; the measurements' relative errors are Gaussian with ``sigma``. For every
structure (with and without a constant ``+c``: what every network pays whatever its layers -- input copy,
synchronisation, a launch floor; reported in ``fit``, not part of the per-layer model) the marginal likelihood
(*evidence*) of the measurements is computed on a grid of ``(sigma, tau)`` (the Gaussian's quadratic form taken
at the non-negative solution the fit uses, so negative factors cannot explain the data); the structures are
averaged with weights ``exp(log evidence)`` (integrated over ``tau``, log-uniform), and each one's factors are
the average over ``tau`` (weighted by the evidence) of the non-negative ridge solutions at ``ridge = sigma^2 /
tau^2``. One more structure, evidence only, has another centre: ``launches``, per-family factors on the prior's
call energies alone (compute and memory priced at 0; a family that launches nothing keeps its memory term),
scaled to the data -- the shape of counting kernels (a GPU at batch 1 is paid per launch; on NB201 networks it
spans the op-count regression), which the prior-centred structures reach only through large, unlikely factors.
The scaled prior itself (``global``, the default times one scale: ``tau = 0``) is scored and reported but never
averaged in: a device is never exactly the default, and every structure around it already holds it as its ``tau ->
0`` limit: the average is over the other structures (conditioned on the device not being exactly the default), and
where the data cannot tell, it sits next to the default. As a model of its own, kept whole whenever 3 times as
likely as the next one, it froze the fit on draws where the evidence was a coin flip (on 15 draws of 20 networks, a
phone kept the default on 5, while the structures around it ranked better on each of them). So 10 clean measurements
that the prior cannot explain (small ``sigma``, a large ``tau`` is likely) move the model, and 10 noisy ones whose
scatter is noise (``tau`` near 0 explains them as well) stay next to the scaled prior.
Deterministic (no randomness in the choice); the seeded cross-validation (``cross_validate``) is a report: every
structure and ridge of a fixed path, and the chosen model, out of fold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import lsq_linear, nnls
from scipy.stats import rankdata

from .defaults import FAMILIES, FEATURES

COLUMNS = [(fam, k) for fam in FAMILIES for k in range(len(FEATURES))]
STRUCTURES = ("global", "feature", "family", "calls", "family_calls", "full")
LAUNCHES = "launches"  # evidence only: per-family factors on the calls alone (structure_mask)
EVIDENCE_STRUCTURES = STRUCTURES + (LAUNCHES,)
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TIE = 0.005       # cross-validated Spearman differences below this are noise at tens of samples
MIN_CV = 8        # fewer samples than this: no cross-validation, the scaled prior
Z = 1.5           # a candidate must beat the scaled prior by this many bootstrap standard deviations
Z_REL = 3.0       # ... or rank as well and beat its median relative error by this many (stricter: a lower error
                  # at an equal rank is no evidence for ranking, it must be unmistakable)
Z_IN = 1.0        # once the prior is beaten, a candidate competes when it beats the prior by this many
BOOTS = 200       # paired bootstrap resamples of the out-of-fold predictions
TAUS = np.logspace(-1.5, 1.5, 19)  # prior sd of the factors (log-uniform grid, 0.03 to 30; the scaled prior is tau = 0):
                                   # a CPU at batch 1 pays ~10-50x the analytical per-call energy, and a grid that
                                   # stops at 3 puts the evidence of every finer structure at its edge
SIGMAS = np.logspace(-6.0, 0.5, 66)  # sd of the relative errors, down to a cost model's rounding (an accelerator's
                                     # simulator is exact; a floor at 3e-4 made an exact fit as likely as one 0.1 % off)
OMEGA = 0.5       # prior sd of the constant per pass around the scaled prior's, in units of the median target
MIN_WEIGHT = 1e-4  # evidence weights below this (of the largest) are left out of the average over tau


@dataclass(frozen=True)
class Candidate:
    """One model of the search: a column structure, an optional constant per forward pass, a ridge strength."""
    structure: str
    intercept: bool = False
    ridge: float = 0.0
    toward: str = "feature"   # what the ridge pulls the finer structures toward: the feature fit, or "global";
                              # "evidence": no fixed ridge, the evidence-weighted average (fit_evidence) whose
                              # largest weight is on ``structure``
    constant: bool = True     # "evidence": whether the average may hold the structures with a constant

    @property
    def name(self) -> str:
        s = self.structure + ("+c" if self.intercept else "")
        if self.toward == "evidence":
            return f"evidence:{s}"
        return s if self.structure == "global" else f"{s}@{self.ridge:g}"

    @property
    def complexity(self) -> tuple[int, int, float]:
        """Sort key, simplest first (a larger ridge is simpler)."""
        return EVIDENCE_STRUCTURES.index(self.structure), int(self.intercept), -self.ridge


def candidates(ridges: Sequence[float] = RIDGES, structures: Sequence[str] = STRUCTURES,
               constant: bool = True) -> list[Candidate]:
    """Every (structure, constant, ridge) combination, simplest first (``constant``: also those with one)."""
    out = []
    for s in structures:
        for c in ((False, True) if constant else (False,)):
            out += [Candidate(s, c, 0.0)] if s == "global" else [Candidate(s, c, float(r)) for r in ridges]
    return sorted(out, key=lambda c: c.complexity)


def design_row(per_family: dict[str, np.ndarray], prior: dict[str, dict[str, float]]) -> np.ndarray:
    """Prior energy contribution of each (family, feature) column for one sample (per-sample features)."""
    row = np.zeros(len(COLUMNS))
    for j, (fam, k) in enumerate(COLUMNS):
        if fam in per_family:
            row[j] = per_family[fam][k] * prior[fam][FEATURES[k]]
    return row


def groups(structure: str, active: Sequence[int]) -> list[list[int]]:
    """Partition of the active column indices into groups sharing one multiplier."""
    def key(j: int):
        fam, k = COLUMNS[j]
        call = k == FEATURES.index("e_call")
        return {"global": 0, "feature": k, "family": fam, "calls": fam if call else "",
                "family_calls": (fam, call), "full": j, LAUNCHES: fam}[structure]

    out: dict = {}
    for j in active:
        out.setdefault(key(j), []).append(j)
    return list(out.values())


def structure_mask(A: np.ndarray, structure: str) -> np.ndarray:
    """Which columns a structure prices (1.0) or zeroes (0.0): all of them, or (``launches``) each family's call
    energy, and all of a family's columns where its calls cost nothing (``identity``: a tensor kept alive and
    re-read, no launch; priced at 0 it would leave the family out, and a device that pays for it -- a copy on an
    accelerator -- could only be reached through negative factors of the others, which the evidence's Gaussian
    allows and the non-negative fit does not)."""
    if structure != LAUNCHES:
        return np.ones(len(COLUMNS))
    call = FEATURES.index("e_call")
    calls = {fam for (fam, k), v in zip(COLUMNS, np.abs(A).sum(0)) if k == call and v > 0}
    return np.array([k == call or fam not in calls for fam, k in COLUMNS], dtype=float)


def structure_design(A: np.ndarray, structure: str) -> np.ndarray:
    """The columns a structure prices: all of them, or (``launches``) the calls (:func:`structure_mask`)."""
    return A * structure_mask(A, structure)


def check_values(y: np.ndarray) -> None:
    """Measured energies: at least one, each finite and > 0 (ValueError otherwise)."""
    if len(y) == 0:
        raise ValueError("fit needs at least one sample")
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("measured energies must be finite and > 0")


def check_targets(A: np.ndarray, y: np.ndarray) -> None:
    check_values(y)
    if not np.any(A.sum(1) > 0):
        raise ValueError("the samples have no features to fit (every traced layer is free)")


def global_scale(A: np.ndarray, y: np.ndarray) -> float:
    """Least-squares g of ``g * prior / measured - 1`` (relative errors)."""
    p = A.sum(1) / y
    pp = float((p * p).sum())
    return float(p.sum() / pp) if pp > 0 else 1.0


def _nnls(Aw: np.ndarray, y: np.ndarray, grp: list[list[int]], base: np.ndarray, ridge: float,
          intercept: bool) -> tuple[np.ndarray, float]:
    """Group multipliers ``v >= 0`` of ``base`` (ridge pulls each toward 1) and the constant (J per sample)."""
    Z = np.stack([Aw[:, cols] @ base[cols] for cols in grp], 1)
    n, K = Z.shape
    ybar = float(np.median(y))
    if K == 1 and not intercept:  # closed form (the scaled prior needs no solver)
        z = Z[:, 0]
        return np.array([(z.sum() + ridge * n) / ((z * z).sum() + ridge * n)]), 0.0
    b = np.ones(n)
    if intercept:
        # the constant, in units of the median target, takes either sign: projected out of the data rows (its
        # least-squares value for any v), not two opposite columns -- scipy's nnls (>= 1.12) can diverge to
        # 1e300 on such an exactly dependent pair
        e = ybar / y
        Zp, bp = Z - np.outer(e, e @ Z) / (e @ e), b - e * (e @ b) / (e @ e)
    else:
        Zp, bp = Z, b
    lam = math.sqrt(ridge * n)
    M = np.vstack([Zp, lam * np.eye(K)])
    rhs = np.concatenate([bp, lam * np.ones(K)])
    v, _ = nnls(M, rhs, maxiter=50 * M.shape[1])
    if not np.all(np.isfinite(v)):  # the active-set solver failed: the bounded-variable one
        v = lsq_linear(M, rhs, bounds=(0.0, np.inf), method="bvls").x
    if not intercept:
        return v, 0.0
    return v, float(e @ (b - Z @ v) / (e @ e) * ybar)


def solve(A: np.ndarray, y: np.ndarray, cand: Candidate, _bases: dict | None = None
          ) -> tuple[np.ndarray, float, float]:
    """Fit one candidate: (multipliers over all COLUMNS, constant in J per sample, global scale).

    ``global`` and ``feature`` scale the prior (ridge toward the global scale); the finer structures scale the
    ``feature`` fit of the same ridge and constant (ridge toward it), so a device that differs from the prior
    mainly per feature (cheaper compute, dearer launches) needs no per-family deviation to be learned.
    ``_bases``: a cache of those feature fits shared by the candidates of one training set.
    ``toward == "evidence"``: :func:`shrink_fit` (the ridge is the evidence's, not ``cand.ridge``)."""
    if cand.toward == "evidence":
        m, c, _ = fit_evidence(A, y, cand.constant)
        return m, c, global_scale(A, y)
    g = global_scale(A, y)
    Aw = A / y[:, None]
    active = np.flatnonzero(np.abs(Aw).sum(0) > 0)
    base = np.full(len(COLUMNS), g)
    if cand.structure not in ("global", "feature") and cand.toward == "feature":
        key = (cand.ridge, cand.intercept)
        if _bases is not None and key in _bases:
            base = _bases[key].copy()
        else:
            fgrp = groups("feature", active)
            v, _ = _nnls(Aw, y, fgrp, base, cand.ridge, cand.intercept)
            for vi, cols in zip(v, fgrp):
                base[cols] = g * max(vi, 0.01)  # a feature the coarse fit zeroed may still matter in one family
            if _bases is not None:
                _bases[key] = base.copy()
    grp = groups(cand.structure, active)
    v, c = _nnls(Aw, y, grp, base, cand.ridge, cand.intercept)
    m = base.copy()
    for vi, cols in zip(v, grp):
        m[cols] = base[cols] * vi
    return m, c, g


def _anchor(Aw: np.ndarray, y: np.ndarray, active: np.ndarray, intercept: bool) -> tuple[float, float]:
    """The scaled prior: scale ``s`` and (``intercept``) constant in units of the median target."""
    v, c = _nnls(Aw, y, [list(active)], np.ones(Aw.shape[1]), 0.0, intercept)
    plain = _nnls(Aw, y, [list(active)], np.ones(Aw.shape[1]), 0.0, False)[0][0] if intercept else v[0]
    if v[0] < 1e-3 * plain:
        # a device whose energies fall as the prior's rise: the best non-negative scale beside a constant is 0,
        # and a centre at 0 would put every structure's factors at 1e300. Centre at the scale without a
        # constant, the constant fitted beside it.
        e = float(np.median(y)) / y
        z = Aw[:, active].sum(1) * plain
        return max(float(plain), 1e-300), float(e @ (1.0 - z) / (e @ e))
    return max(float(v[0]), 1e-300), c / float(np.median(y))


def _constrained_quad(Aw: np.ndarray, y: np.ndarray, grp: list[list[int]], Z: np.ndarray, s: float,
                      intercept: bool, c0: float, tau: float, sigma: float) -> tuple[float, float]:
    """Misfit (sum of squared relative errors) and prior penalty of the non-negative ridge solution at
    ``sigma^2 / tau^2`` around the scale ``s`` (``Z``: each group's scaled prior, relative; the constant, if any,
    ~ N(c0, OMEGA^2) in median targets)."""
    n = len(y)
    v, c = _nnls(Aw, y, grp, np.full(Aw.shape[1], s), sigma * sigma / (tau * tau) / n, intercept)
    ybar = float(np.median(y))
    pred = Z @ v + (c / y if intercept else 0.0)
    pen = float((((v - 1.0) / tau) ** 2).sum()) + (((c / ybar - c0) / OMEGA) ** 2 if intercept else 0.0)
    return float(((1.0 - pred) ** 2).sum()), pen


def evidence(A: np.ndarray, y: np.ndarray, structure: str, intercept: bool) -> dict:
    """Log marginal likelihood of the relative errors under ``v ~ N(1, tau^2)`` per group of ``structure`` around
    the scaled prior (and, with ``intercept``, the constant ~ N(the scaled prior's, OMEGA^2)), relative errors
    ~ N(0, sigma^2): per tau of :data:`TAUS` (``global``: tau = 0 only), maximised over sigma of :data:`SIGMAS`.
    Returns {"taus", "log_ev" (per tau), "sigmas" (the best per tau), "log_evidence" (integrated over the tau
    grid, log-uniform), "scale", "groups"}. Linear algebra on the n x (groups + 1) factor, so n may be large."""
    n = len(y)
    Aw = structure_design(A, structure) / y[:, None]
    active = np.flatnonzero(np.abs(Aw).sum(0) > 0)
    s, c0 = _anchor(Aw, y, active, intercept)
    grp = [list(active)] if structure == "global" else groups(structure, active)
    Z = np.stack([Aw[:, cols].sum(1) * s for cols in grp], 1)
    u = float(np.median(y)) / y
    r = 1.0 - Z.sum(1) - (c0 * u if intercept else 0.0)
    taus = np.array([0.0]) if structure == "global" else TAUS
    s2 = SIGMAS ** 2
    log_ev, best_sigma = np.empty(len(taus)), np.empty(len(taus))
    rr = float(r @ r)
    for i, t in enumerate(taus):
        W = np.hstack([t * Z, OMEGA * u[:, None]]) if intercept else t * Z
        if W.size and np.any(W):
            # W's singular values and r's coordinates on its left singular vectors, from the small Gram matrix
            lam, V = np.linalg.eigh(W.T @ W)
            keep = lam > 1e-12 * max(lam.max(), 1e-300)
            S = np.sqrt(lam[keep])
            q = (V[:, keep].T @ (W.T @ r)) ** 2 / lam[keep]
        else:
            S, q = np.zeros(0), np.zeros(0)
        D = S[None, :] ** 2 + s2[:, None]                        # eigenvalues of C in W's span, per sigma
        quad = (q[None, :] / D).sum(1) + (rr - q.sum()) / s2
        logdet = np.log(D).sum(1) + (n - len(S)) * np.log(s2)
        ll = -0.5 * (quad + logdet + n * math.log(2 * math.pi))
        k = int(np.argmax(ll))
        if t > 0:
            # The Gaussian lets factors go negative and the fit does not: a structure can "explain" data that no
            # non-negative model of it does (60 exact measurements: the evidence at sigma 1e-6 for a fit 3 % off).
            # Score the fit that is used: the quadratic form is the minimum of misfit / sigma^2 + penalty, so its
            # constrained minimum (the non-negative ridge solution) replaces it, sigma profiled with the factors
            # held, once more at the new sigma.
            for _ in range(2):
                rss, pen = _constrained_quad(Aw, y, grp, Z, s, intercept, c0, float(t), float(SIGMAS[k]))
                ll = -0.5 * (rss / s2 + pen + logdet + n * math.log(2 * math.pi))
                k = int(np.argmax(ll))
        log_ev[i], best_sigma[i] = ll[k], SIGMAS[k]
    top = float(log_ev.max())
    total = top + math.log(float(np.exp(log_ev - top).mean()))
    return {"taus": taus, "log_ev": log_ev, "sigmas": best_sigma, "log_evidence": total, "scale": s,
            "groups": len(grp)}


def shrink_fit(A: np.ndarray, y: np.ndarray, structure: str, intercept: bool, ev: dict | None = None
               ) -> tuple[np.ndarray, float, dict]:
    """Multipliers (over COLUMNS) and constant (J per sample) of one structure: the average over tau of the
    non-negative ridge solutions at ``sigma(tau)^2 / tau^2``, weighted by their evidence; and the evidence."""
    y = np.asarray(y, dtype=float)
    ev = ev or evidence(A, y, structure, intercept)
    Aw = structure_design(A, structure) / y[:, None]
    active = np.flatnonzero(np.abs(Aw).sum(0) > 0)
    base = ev["scale"] * structure_mask(A, structure)
    grp = [list(active)] if structure == "global" else groups(structure, active)
    w = np.exp(ev["log_ev"] - ev["log_ev"].max())
    w[w < MIN_WEIGHT] = 0.0
    w /= w.sum()
    m, c = np.zeros(len(COLUMNS)), 0.0
    for wi, t, sg in zip(w, ev["taus"], ev["sigmas"]):
        if wi == 0:
            continue
        if t == 0:  # the scaled prior (with its constant)
            v, ci = _nnls(Aw, y, [list(active)], base, 0.0, intercept)
            v = np.ones(len(grp)) * v[0]
        else:
            v, ci = _nnls(Aw, y, grp, base, float(sg * sg / (t * t) / len(y)), intercept)
        mi = base.copy()
        for vi, cols in zip(v, grp):
            mi[cols] = base[cols] * vi
        m += wi * mi
        c += wi * ci
    tau_mean = float(np.exp((w * np.log(np.maximum(ev["taus"], 1e-300))).sum())) if ev["taus"].max() > 0 else 0.0
    info = {"log_evidence": ev["log_evidence"], "tau": tau_mean,
            "sigma": float((w * ev["sigmas"]).sum()), "groups": ev["groups"]}
    return m, c, info


def fold_ids(n: int, folds: int, seed: int, repeat: int) -> np.ndarray:
    """Fold of each sample for one repeat of k-fold (seeded permutation)."""
    order = np.random.default_rng([seed, repeat]).permutation(n)
    ids = np.empty(n, dtype=int)
    ids[order] = np.arange(n) % folds
    return ids


def _rank_corr_rows(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman of each row of P against y (0 for a constant row)."""
    rp, ry = rankdata(P, axis=-1), rankdata(y)
    rp = rp - rp.mean(-1, keepdims=True)
    ry = ry - ry.mean()
    den = np.sqrt((rp * rp).sum(-1) * (ry * ry).sum())
    return np.where(den > 0, (rp * ry).sum(-1) / np.where(den > 0, den, 1), 0.0)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation; None when fewer than 3 values or either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(_rank_corr_rows(a, b))


def cross_validate(A: np.ndarray, y: np.ndarray, cands: Sequence[Candidate], folds: int = 5, repeats: int = 2,
                   seed: int = 0, boots: int = BOOTS) -> list[dict]:
    """Out-of-fold Spearman (mean over repeats), median relative error, and the paired bootstrap difference of
    Spearman to the scaled prior (``cands[0]``): mean and standard deviation over resamples of the samples."""
    n = len(y)
    folds = max(2, min(folds, n))
    splits = [fold_ids(n, folds, seed, r) for r in range(repeats)]
    P = np.empty((len(cands), repeats, n))
    for r, ids in enumerate(splits):
        for f in range(folds):
            test = ids == f
            bases: dict = {}
            for i, cand in enumerate(cands):
                m, c, _ = solve(A[~test], y[~test], cand, bases)
                P[i, r, test] = A[test] @ m + c
    rho = _rank_corr_rows(P, y).mean(1)
    R = np.abs(P - y) / y
    rel = np.median(R, axis=(1, 2))
    rng = np.random.default_rng([seed, 7919])
    diffs, rdiffs = np.empty((boots, len(cands))), np.empty((boots, len(cands)))
    for b in range(boots):
        idx = rng.integers(0, n, n)
        rb = _rank_corr_rows(P[:, :, idx], y[idx]).mean(1)
        diffs[b] = rb - rb[0]
        eb = np.median(R[:, :, idx], axis=(1, 2))
        rdiffs[b] = eb[0] - eb
    return [{"name": c.name, "structure": c.structure, "intercept": c.intercept, "ridge": c.ridge,
             "cv_spearman": float(rho[i]), "cv_median_rel_error": float(rel[i]),
             "gain": float(rho[i] - rho[0]), "gain_sd": float(diffs[:, i].std()),
             "rel_gain": float(rel[0] - rel[i]), "rel_gain_sd": float(rdiffs[:, i].std())}
            for i, c in enumerate(cands)]


def select(rows: list[dict], tie: float = TIE, z: float = 1.0, z_in: float = Z_IN) -> int:
    """Index of the winner (``rows`` ordered simplest first, the scaled prior at 0).

    Two questions. Is the scaled prior beaten? Only when some candidate's Spearman gain over it exceeds ``z``
    standard deviations of the paired bootstrap (a gain within the noise of a few dozen samples is the winner's
    curse, not a better model), or some candidate ranks as well (within ``tie``) and its median relative error is
    lower by more than ``Z_REL`` standard deviations (single layers, which every model ranks alike, are told apart
    by their errors). If not: the scaled prior. If so, which fitted model? Every candidate that beats the prior by
    ``z_in`` (< ``z``) standard deviations, or by the error rule, competes: once the prior is out, the strict bar
    would favour the candidates with the narrowest bootstrap (the simplest) over ones that rank better, while no
    bar at all lets the winner's curse pick among ~60 noisy scores. Among them: best CV Spearman; within ``tie``
    of it, lowest median relative error; then simplest."""
    def beats(r: dict, zz: float) -> bool:
        if r["gain"] > 0 and r["gain"] > zz * r["gain_sd"]:
            return True
        return (r["gain"] >= -tie and r.get("rel_gain", 0) > 0
                and r.get("rel_gain", 0) > Z_REL * r.get("rel_gain_sd", 0))

    if not any(beats(r, z) for r in rows[1:]):
        return 0
    ok = [i for i in range(1, len(rows)) if beats(rows[i], min(z, z_in))]
    best = max(rows[i]["cv_spearman"] for i in ok)
    tied = [i for i in ok if rows[i]["cv_spearman"] >= best - tie]
    return min(tied, key=lambda i: (round(rows[i]["cv_median_rel_error"], 4), i))


def fit_evidence(A: np.ndarray, y: np.ndarray, constant: bool = True) -> tuple[np.ndarray, float, dict]:
    """Every structure (with a constant too, if ``constant``), each shrunk by :func:`shrink_fit`, averaged with
    weights ``exp(log evidence)`` (Bayesian model averaging: two structures the data cannot tell apart share the
    model instead of a coin flip choosing one); the scaled prior is scored, never averaged (module docstring).
    Returns (multipliers, constant, {"rows": per structure, "top": the candidate of the largest weight, "tau",
    "sigma": the top structure's, "reason": the scaled prior's evidence against the top})."""
    y = np.asarray(y, dtype=float)
    rows, evs = [], []
    for st in EVIDENCE_STRUCTURES:
        for ic in ((False, True) if constant else (False,)):
            ev = evidence(A, y, st, ic)
            k = int(np.argmax(ev["log_ev"]))
            rows.append({"name": st + ("+c" if ic else ""), "structure": st, "intercept": ic,
                         "log_evidence": ev["log_evidence"], "groups": ev["groups"],
                         "tau_map": float(ev["taus"][k]), "sigma_map": float(ev["sigmas"][k])})
            evs.append(ev)
    le = np.array([r["log_evidence"] for r in rows])
    # conditioned on the device not being exactly the default (module docstring)
    prior = np.array([r["structure"] == "global" for r in rows])
    w = np.where(prior, 0.0, np.exp(le - le[~prior].max()))
    w[w < MIN_WEIGHT] = 0.0
    w /= w.sum()
    top = int(np.argmax(w))
    g = max(np.flatnonzero(prior), key=lambda i: le[i])
    reason = (f"the scaled prior ({rows[g]['name']}) scored {le[g] - le[top]:+.2f} nats against {rows[top]['name']}, "
              "not averaged: every structure holds it as its tau -> 0 limit")
    m, c, top_info = np.zeros(len(COLUMNS)), 0.0, {}
    for i, (r, ev) in enumerate(zip(rows, evs)):
        r["weight"] = float(w[i])
        if w[i] == 0:
            continue
        mi, ci, info = shrink_fit(A, y, r["structure"], r["intercept"], ev)
        m += w[i] * mi
        c += w[i] * ci
        if i == top:
            top_info = info
    cand = Candidate(rows[top]["structure"], rows[top]["intercept"], toward="evidence", constant=constant)
    return m, c, {"rows": rows, "top": cand, "tau": top_info["tau"], "sigma": top_info["sigma"], "reason": reason}


def fit_cv(A: np.ndarray, y: np.ndarray, seed: int = 0, constant: bool = True, folds: int = 5, repeats: int = 2,
           ridges: Sequence[float] = RIDGES, tie: float | None = None, z: float | None = None,
           rule: str = "evidence", report: bool = True) -> tuple[np.ndarray, float, dict]:
    """Fit the multipliers: the structure of the highest evidence, shrunk toward the scaled prior (``rule=
    "evidence"``, :func:`shrink_fit`), or the cross-validated choice of one fixed-ridge candidate (``rule="cv"``,
    :func:`select`: the issue-13 rule).

    ``constant``: also try a constant per forward pass. Only for whole networks: on single layers it would take
    the per-call energy that the per-layer model must keep. ``report``: cross-validate every candidate (and the
    chosen model) for ``fit_stats["candidates"]`` (seeded; with at least MIN_CV samples). Returns (multipliers over
    COLUMNS, constant per forward pass in J per sample, statistics for ``fit``)."""
    y = np.asarray(y, dtype=float)
    check_targets(A, y)
    if rule not in ("evidence", "cv"):
        raise ValueError(f"unknown rule {rule!r}: evidence or cv")
    tie, z = TIE if tie is None else tie, Z if z is None else z
    cands = candidates(ridges, constant=constant)
    stats: dict = {"seed": seed, "rule": rule}
    if rule == "evidence":
        m, c, info = fit_evidence(A, y, constant)
        chosen, ev_rows = info["top"], info["rows"]
        g = global_scale(A, y)
        if chosen.name not in {cd.name for cd in cands}:
            cands.append(chosen)
        used = sorted((r for r in ev_rows if r["weight"] > 0), key=lambda r: -r["weight"])
        stats.update({"method": "evidence", "evidence": ev_rows, "tau": info["tau"], "sigma": info["sigma"],
                      "ridge": float(info["sigma"] ** 2 / info["tau"] ** 2) if info["tau"] > 0 else None,
                      "why": "average of " + ", ".join(f"{r['name']} {r['weight']:.2f}" for r in used)
                             + f" (weights: evidence; {info['reason']}); {used[0]['name']}'s factors ~ N(1, "
                               f"{info['tau']:.3g}^2) around the scaled "
                             + ("prior's call energies (compute and memory at 0)" if chosen.structure == LAUNCHES
                                else "prior") + f", relative noise {info['sigma']:.3g}"})
        rows = cross_validate(A, y, cands, folds, repeats, seed) if report and len(y) >= MIN_CV else []
        k = next((i for i, cd in enumerate(cands) if cd.name == chosen.name), 0)
    else:
        if len(y) < MIN_CV:
            rows, k = [], 0
        else:
            rows = cross_validate(A, y, cands, folds, repeats, seed)
            k = select(rows, tie, z)
        chosen = cands[k]
        m, c, g = solve(A, y, chosen)
        stats.update({"method": "cross-validated" if rows else "scaled prior (fewer than %d samples)" % MIN_CV,
                      "ridge": chosen.ridge, "tie": tie, "z": z, "z_in": min(z, Z_IN)})
    pred = A @ m + c
    stats.update({"chosen": chosen.name, "structure": chosen.structure, "intercept_j": c, "global_scale": g,
                  "cv_folds": min(folds, len(y)) if rows else 0, "cv_repeats": repeats if rows else 0,
                  "median_rel_error": float(np.median(np.abs(pred - y) / y)), "candidates": rows})
    if rows:
        stats["cv_spearman"] = rows[k]["cv_spearman"]
        stats["cv_median_rel_error"] = rows[k]["cv_median_rel_error"]
    return m, c, stats


def fit_fixed(A: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, float, dict]:
    """The per family x feature model at one given ridge, without cross-validation (the pre-CV behaviour)."""
    y = np.asarray(y, dtype=float)
    check_targets(A, y)
    # 1.0's ridge was not scaled by the number of samples; the candidates' is (strengths comparable across n)
    cand = Candidate("full", False, float(ridge) / len(y), toward="global")
    m, c, g = solve(A, y, cand)
    pred = A @ m
    return m, c, {"method": "fixed ridge", "chosen": cand.name, "structure": "full", "ridge": float(ridge),
                  "intercept_j": 0.0, "global_scale": g,
                  "median_rel_error": float(np.median(np.abs(pred - y) / y)), "candidates": []}
