"""Write the prior bank (dl_energy_estimator/priors.json) from the measured NAS-Bench-201 latencies.

    python bench/prior_bank.py [--table ../shared/measurements/nb201_latency_ms.csv] [--out dl_energy_estimator/priors.json]

Per device column: the evidence fit (``fit_cv``, from the analytical default) on all 15,625 networks, each network
as NB201's code runs it (``bench/nb201_real.py``: ``none`` edges execute), features at batch 1, 32x32 inputs;
energy = latency x 1 W (only the coefficients' ratios matter: every fit refits the scale). Prints each entry's
chosen structure and in-sample Spearman.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nb201_real as R  # noqa: E402
from dl_energy_estimator import EnergyEstimator  # noqa: E402
from dl_energy_estimator.fitting import spearman  # noqa: E402
from dl_energy_estimator.priors import BANK  # noqa: E402
from dl_energy_estimator.schema import write_atomic  # noqa: E402

GROUPS = {"1080ti": "desktop GPU", "2080ti": "desktop GPU", "titan": "desktop GPU", "gold": "server CPU",
          "silver": "server CPU", "samsung": "phone", "essential": "phone", "pixel": "phone"}


def kind(col: str) -> str:
    g = next((v for k, v in GROUPS.items() if col.startswith(k)), "device")
    return f"{g}, batch {col.rsplit('_', 1)[1]}" if g == "desktop GPU" else g


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default=R.TABLE)
    p.add_argument("--out", default=BANK)
    args = p.parse_args()
    archs, cols, Y = R.load_table(args.table)
    t = R.terms()["measured"]
    feats = [R.features(a, t) for a in archs]
    est = EnergyEstimator.default()
    with open(args.table, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    priors = {}
    for j, col in enumerate(cols):
        y = Y[:, j] / 1e3  # seconds x 1 W
        fitted = est.fit_features(feats, y, report=False)
        pred = [fitted.predict_features(f) for f in feats]
        rho = spearman(pred, y)
        used = sorted({fam for f in feats for fam in f})
        priors[col] = {"device": col, "kind": kind(col),
                       "coefficients": {fam: fitted.coefficients[fam] for fam in used},
                       "fit": {"chosen": fitted.fit_stats["chosen"], "tau": fitted.fit_stats["tau"],
                               "n_networks": len(y), "spearman_in_sample": rho}}
        print(f"{col:16s} {fitted.fit_stats['chosen']:16s} Spearman {rho:.3f}", flush=True)
    doc = {"format": 1, "kind": "prior_bank",
           "about": "energy-model coefficients (J per MAC / byte / call at 1 W: latency x 1 W) learned per device; "
                    "fit(..., prior='auto'|NAME) starts from them. Families not listed never ran on the device's "
                    "networks (they take the analytical default times the entry's median ratio to it).",
           "source": {"measurements": "NAS-Bench-201 latencies of HELP (Lee et al., NeurIPS 2021; repository "
                                      "HayeonLee/HELP, data/nasbench201/latency/), 15,625 networks per device",
                      "table": os.path.basename(args.table), "table_sha256": sha,
                      "networks": "the project's NB201 network (16 channels, 5 cells per stage, 10 classes, 32x32, "
                                  "batch 1) with none edges executed as NB201's code runs them (bench/nb201_real.py)",
                      "fit": "dl_energy_estimator.fitting.fit_cv (evidence) from the analytical default, all networks",
                      "script": "bench/prior_bank.py", "date": dt.date.today().isoformat()},
           "priors": priors}
    write_atomic(args.out, doc)
    print(f"wrote {args.out} ({len(priors)} priors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
