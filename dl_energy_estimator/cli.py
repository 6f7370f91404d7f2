"""CLI: ``python -m dl_energy_estimator calibrate ...`` and ``python -m dl_energy_estimator report FILE``."""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
from typing import Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from .estimator import EnergyEstimator
from .grid import build_grid, split
from .measure import EnergyCounterUnavailable, measure
from .schema import EnergyModelError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2 (no usage dump, no traceback)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s!r}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dl_energy_estimator", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = sub.add_parser("calibrate", help="measure a grid of layers on this machine and fit an energy model")
    c.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    c.add_argument("--out", default="energy_model.json", help="energy-model JSON to write")
    c.add_argument("--watts", type=_positive_float, default=None,
                   help="device power while busy (W); used as latency x watts when no energy counter is readable")
    c.add_argument("--source", choices=("auto", "nvml", "rapl", "latency_x_watts"), default="auto")
    c.add_argument("--batch_size", type=_positive_int, default=1, help="deployment batch size")
    c.add_argument("--grid", choices=("small", "default"), default="small")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--heldout", type=float, default=0.25, help="fraction of the grid held out for validation")
    c.add_argument("--window_s", type=_positive_float, default=None, help="measurement window per repeat (s)")
    c.add_argument("--threads", type=_positive_int, default=1, help="CPU threads while measuring (default 1)")
    c.add_argument("--no_progress", action="store_true")
    r = sub.add_parser("report", help="print an energy model's metadata and fit table")
    r.add_argument("path")
    return p


def _kfold_predictions(est0: EnergyEstimator, feats: list, y: np.ndarray, k: int, seed: int) -> np.ndarray:
    n = len(y)
    order = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    for f in range(k):
        test = order[f::k]
        train = np.setdiff1d(order, test)
        m = est0.fit_features([feats[i] for i in train], y[train])
        pred[test] = [m.predict_features(feats[i]) for i in test]
    return pred


def _rel(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(pred - y) / y


def calibrate(args: argparse.Namespace) -> int:
    if not 0 < args.heldout < 1:
        print("calibrate: error: --heldout must be between 0 and 1", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        print(f"calibrate: error: output folder {out_dir} does not exist", file=sys.stderr)
        return 2
    items = build_grid(args.grid, args.batch_size, args.seed)
    try:
        meas = measure([(it.module, it.shape) for it in items], device=args.device, watts=args.watts,
                       batch_size=args.batch_size, source=args.source, window_s=args.window_s,
                       progress=not args.no_progress, seed=args.seed,
                       threads=args.threads)
    except (EnergyCounterUnavailable, ValueError) as e:
        print(f"calibrate: error: {e}", file=sys.stderr)
        return 2
    y = np.asarray(meas, dtype=float)
    est0 = EnergyEstimator.default(batch_size=args.batch_size)
    feats = [est0.family_features(it.module, it.shape) for it in items]
    tr, te = split(items, args.heldout, args.seed)
    date = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    meta = {"name": f"{meas.source}-{meas.meta['device']}-b{args.batch_size}-{date[:10]}",
            "device": meas.meta["device"], "driver": meas.meta["driver"], "torch": torch.__version__,
            "dtype": "float32", "batch_size": args.batch_size, "source": meas.source, "date": date,
            "idle_w": meas.meta["idle_w"], "watts": args.watts}
    fitted = est0.fit_features([feats[i] for i in tr], y[tr], meta=meta)
    ytr = y[tr]
    cv = _kfold_predictions(est0, [feats[i] for i in tr], ytr, 5, args.seed)
    pred_tr = np.array([fitted.predict_features(feats[i]) for i in tr])
    table = []
    for fam in sorted({it.family for it in items}):
        idx = [j for j, i in enumerate(tr) if items[i].family == fam]
        if not idx:
            continue
        table.append({"family": fam, "n": len(idx), "measured_mj": 1e3 * float(np.median(ytr[idx])),
                      "predicted_mj": 1e3 * float(np.median(pred_tr[idx])),
                      "cv_median_rel_error": float(np.median(_rel(cv[idx], ytr[idx])))})
    yte = y[te]
    pte = np.array([fitted.predict_features(feats[i]) for i in te])
    rho = float(spearmanr(pte, yte).statistic) if len(te) > 2 else float("nan")
    flops = np.array([feats[i].get("conv", np.zeros(3))[0] + feats[i].get("conv_pw", np.zeros(3))[0]
                      + feats[i].get("conv_dw", np.zeros(3))[0] + feats[i].get("linear", np.zeros(3))[0]
                      for i in te])
    rho_flops = float(spearmanr(flops, yte).statistic) if len(te) > 2 else float("nan")
    heldout = {"n": len(te), "spearman": rho, "spearman_macs_only": rho_flops,
               "median_rel_error": float(np.median(_rel(pte, yte))) if len(te) else float("nan"),
               "items": [{"name": items[i].name, "family": items[i].family, "measured_mj": 1e3 * float(y[i]),
                          "predicted_mj": 1e3 * float(p)} for i, p in zip(te, pte)]}
    stats = dict(fitted.fit_stats)
    stats.update({"grid": args.grid, "seed": args.seed, "n_grid": len(items), "n_train": len(tr),
                  "cv_folds": 5, "cv_median_rel_error": float(np.median(_rel(cv, ytr))),
                  "table": table, "heldout": heldout, "measurement": meas.meta})
    final = EnergyEstimator(fitted.coefficients, fitted.meta, stats)
    try:
        final.save(args.out)
    except OSError as e:
        print(f"calibrate: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(format_report(final))
    print(f"wrote {args.out} (sha256 {final.sha256()[:16]})")
    return 0


def _f(v, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def format_report(est: EnergyEstimator) -> str:
    m, fit = est.meta, est.fit_stats
    lines = [f"energy model {est.name}  (source {m['source']}, device {m['device']}, batch_size {m['batch_size']},"
             f" torch {m['torch']}, {m['date']})"]
    if m.get("idle_w") is not None and m["source"] in ("nvml", "rapl"):
        lines.append(f"idle power subtracted: {m['idle_w']:.2f} W")
    if not fit.get("table"):
        lines.append("no fit statistics (analytical model)" if m["source"] == "analytical" else "no fit table")
        return "\n".join(lines)
    lines.append(f"{'family':<12} {'n':>3} {'measured_mj':>12} {'predicted_mj':>13} {'cv_med_rel_err':>15}")
    for r in fit["table"]:
        lines.append(f"{r['family']:<12} {r['n']:>3} {_f(r['measured_mj'], '12.5f')} {_f(r['predicted_mj'], '13.5f')}"
                     f" {_f(r['cv_median_rel_error'], '14.1%'):>15}")
    lines.append(f"train: n={fit.get('n_train')} median rel err {_f(fit.get('median_rel_error'), '.1%')}, "
                 f"{fit.get('cv_folds')}-fold CV median rel err {_f(fit.get('cv_median_rel_error'), '.1%')}, "
                 f"global scale {_f(fit.get('global_scale'), '.3g')}")
    h = fit.get("heldout") or {}
    lines.append(f"held-out: n={h.get('n')} Spearman {_f(h.get('spearman'), '.3f')} (MACs only "
                 f"{_f(h.get('spearman_macs_only'), '.3f')}), median rel err {_f(h.get('median_rel_error'), '.1%')}")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
    try:
        est = EnergyEstimator.load(args.path)
    except EnergyModelError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(format_report(est))
    print(f"sha256 {est.sha256()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return calibrate(args) if args.cmd == "calibrate" else report(args)
