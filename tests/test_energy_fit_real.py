"""Issue 22: the fit on measured devices (an extract of the NAS-Bench-201 latency table, tests/data), and the prior
bank. Networks as NB201's code runs them (bench/nb201_real.py: features summed from per-edge terms)."""
from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import nb201_real as R  # noqa: E402
from nb201 import space as nb201  # noqa: E402
from dl_energy_estimator import EnergyEstimator, priors  # noqa: E402
from dl_energy_estimator.fitting import spearman  # noqa: E402
from estimator_fit import evaluate_real  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data", "nb201_latency_extract.csv")
TOL = 0.01  # the tolerance against counting ops


@pytest.fixture(scope="module")
def table():
    with open(DATA, newline="") as f:
        rows = list(csv.reader(f))
    archs = [nb201.parse_arch(r[0]) for r in rows[1:]]
    t = R.terms()["measured"]
    feats = [R.features(a, t) for a in archs]
    return (feats, R.op_counts(archs), R.flops(archs, t), rows[0][1:],
            np.array([[float(v) for v in r[1:]] for r in rows[1:]]))


@pytest.mark.parametrize("device", ["1080ti_1", "titan_rtx_32", "silver_4114", "samsung_a50"])
def test_fit_worst_draw_vs_op_counts_and_default(table, device):
    """5 draws: at n=20 the fit's worst draw is at least the op-count NNLS's (less TOL); at n=10 at least the
    default's. The bank fit (the device's own entry left out) at n=20 against the op counts too (at n=10 it may fall
    below a default that already ranks well: bench/README.md)."""
    feats, counts, flops, cols, Y = table
    r = evaluate_real(feats, counts, flops, Y[:, cols.index(device)], device, sizes=(10, 20), draws=5)
    msg = {n: {k: np.round(v, 3).tolist() for k, v in r[n].items() if k in ("default", "fit", "bank", "nnls")}
           for n in r}
    assert min(r[20]["fit"]) >= min(r[20]["nnls"]) - TOL, msg
    assert min(r[10]["fit"]) >= min(r[10]["default"]) - 1e-3, msg
    assert min(r[20]["bank"]) >= min(r[20]["nnls"]) - TOL, msg
    assert device not in r[10]["prior"]


def test_launch_count_model_keeps_a_noisier_gpu_at_the_op_counts(table):
    """1080ti_1 with 4 % measurement noise (the op-count model's residual on 1080ti_32 and titan_rtx_1, the GPUs
    where the fit fell below the op counts at n=10; 2 % on 1080ti_1), 6 noise seeds x 5 draws of n=10: the fit's
    worst draw is at least the op-count NNLS's (less TOL) and the default's. Without the ``launches`` structure
    (the default-centred ones only) the worst draw of noise seed 1 was 0.956 against the op counts' 0.969."""
    from estimator_fit import _coef_vector, _raw_features, op_count_nnls
    feats, counts, _, cols, Y = table
    X, est = _raw_features(feats), EnergyEstimator.default()
    for noise in range(6):
        y = Y[:, cols.index("1080ti_1")] * np.exp(0.04 * np.random.default_rng(noise).standard_normal(len(Y)))
        r = {"fit": [], "nnls": [], "default": []}
        launches = 0.0
        for d in range(5):
            perm = np.random.default_rng([0, d, 10]).permutation(len(y))
            tr, te = perm[:10], perm[10:]
            fit = est.fit_features([feats[i] for i in tr], y[tr], report=False)
            launches += sum(e["weight"] for e in fit.fit_stats["evidence"] if e["structure"] == "launches")
            r["fit"].append(spearman(X[te] @ _coef_vector(fit), y[te]))
            r["nnls"].append(spearman(op_count_nnls(counts[tr], y[tr], counts[te]), y[te]))
            r["default"].append(spearman(X[te] @ _coef_vector(est), y[te]))
        msg = (noise, {k: np.round(v, 3).tolist() for k, v in r.items()})
        assert min(r["fit"]) >= min(r["nnls"]) - TOL and min(r["fit"]) >= min(r["default"]), msg
        assert launches > 1.0, msg  # the launch-count model holds a share of the average (a GPU at batch 1)


def test_noiseless_device_of_any_op_cost_shape_reaches_the_op_counts(table):
    """Accelerators whose energies come from a cost model: exactly a constant plus a price per NB201 op, shapes far
    from the default's (an expensive skip, a cost ordering the default reverses: its Spearman down to -0.6).
    5 draws of n=10 and n=20: the fit's worst draw is at least the op-count NNLS's (less TOL). Before (worst
    0.91-0.97): a skip was priced at 0 in ``launches``; the evidence's Gaussian let factors go negative (an exact
    fit at sigma 1e-6 for a non-negative fit 3 % off); relative errors below 3e-4 were noise to it; and a prior
    whose best non-negative scale beside a constant is 0 centred every structure's factors at 1e300."""
    from estimator_fit import _coef_vector, _raw_features, op_count_nnls, op_cost_devices
    feats, counts, _, _, _ = table
    X, est = _raw_features(feats), EnergyEstimator.default()
    names, Y = op_cost_devices(counts, 12, seed=0)
    for j, device in enumerate(names):
        y = Y[:, j]
        for n in (10, 20):
            fit, nnls = [], []
            for d in range(5):
                perm = np.random.default_rng([0, d, n]).permutation(len(y))
                tr, te = perm[:n], perm[n:]
                model = est.fit_features([feats[i] for i in tr], y[tr], report=False)
                fit.append(spearman(X[te] @ _coef_vector(model), y[te]))
                nnls.append(spearman(op_count_nnls(counts[tr], y[tr], counts[te]), y[te]))
            assert min(fit) >= min(nnls) - TOL, (device, n, np.round(fit, 3).tolist(), np.round(nnls, 3).tolist())


def test_clean_measurements_move_the_model_noisy_ones_do_not(table):
    """10 clean measurements of a device the default ranks badly move the factors; the same device with 30 %
    noise keeps (about) the scaled prior; stats say why."""
    feats, _, _, cols, Y = table
    y = Y[:, cols.index("1080ti_1")]
    est = EnergyEstimator.default()
    clean = est.fit_features(feats[:10], y[:10], report=False)
    spread = lambda e: np.ptp(np.log([v for f in e.fit_stats["multipliers"].values() for v in f if v > 0]))
    assert clean.fit_stats["method"] == "evidence" and "average of" in clean.fit_stats["why"]
    assert clean.fit_stats["tau"] > 0.1 and spread(clean) > 1.0
    noisy_y = y[:10] * np.exp(0.3 * np.random.default_rng(0).standard_normal(10))
    noisy = est.fit_features(feats[:10], noisy_y, report=False)
    assert noisy.fit_stats["evidence"][0]["name"] == "global"
    assert spread(noisy) < 0.5 * spread(clean)
    # deterministic
    again = est.fit_features(feats[:10], y[:10], report=False)
    assert again.to_dict()["coefficients"] == clean.to_dict()["coefficients"]


def test_scaled_prior_is_scored_never_averaged(table):
    """The scaled prior (``global``, with or without a constant) has weight 0 on every draw and the other structures
    share the model by their evidence alone (conditioned on the device not being exactly the default; the draw where
    the old rule kept it whole is test_energy_fit's noisy default)."""
    feats, _, _, cols, Y = table
    est = EnergyEstimator.default()
    for j in (0, len(cols) - 1):
        y = Y[:, j]
        for lo in (0, 10, 20):
            ev = est.fit_features(feats[lo:lo + 10], y[lo:lo + 10], report=False).fit_stats["evidence"]
            w = {r["name"]: r["weight"] for r in ev}
            p = {r["name"]: np.exp(r["log_evidence"] - max(q["log_evidence"] for q in ev)) for r in ev}
            assert w["global"] == w["global+c"] == 0.0 and sum(w.values()) == pytest.approx(1.0), w
            rest = sum(v for k, v in p.items() if not k.startswith("global"))
            for k in w:
                if w[k] > 0:
                    assert w[k] == pytest.approx(p[k] / rest, rel=2e-3), (k, w, p)  # MIN_WEIGHT cuts


def test_prior_bank_ships_with_provenance_and_auto_picks_a_device_of_the_kind():
    doc = priors.load()
    assert doc["kind"] == "prior_bank" and "HELP" in doc["source"]["measurements"]
    assert len(priors.names()) == 23 and all("coefficients" in e for e in doc["priors"].values())
    assert priors.coefficients("analytical") == EnergyEstimator.default().coefficients
    with pytest.raises(priors.PriorError, match="unknown prior 'nope'"):
        priors.coefficients("nope")
    # every family gets coefficients, also those NB201 networks never run
    c = priors.coefficients("pixel2")
    assert set(c) == set(EnergyEstimator.default().coefficients) and all(v >= 0 for f in c.values()
                                                                         for v in f.values())


def test_auto_prior_of_a_gpu_is_a_gpu(table):
    feats, _, _, cols, Y = table
    y = Y[:10, cols.index("1080ti_1")]
    fitted = EnergyEstimator.default().fit_features(feats[:10], y, prior="auto", exclude_priors=["1080ti_1"],
                                                    report=False)
    assert fitted.fit_stats["prior"] != "1080ti_1"
    assert priors.load()["priors"][fitted.fit_stats["prior"]]["kind"].startswith("desktop GPU")
    assert [r["prior"] for r in fitted.fit_stats["prior_choice"]][0] == fitted.fit_stats["prior"]


def test_cli_fit_with_prior(table, tmp_path):
    """python energy.py fit --space nb201 --table ... --prior auto|NAME (derived networks)."""
    from energy import main
    feats, _, _, cols, Y = table
    with open(DATA, newline="") as f:
        rows = list(csv.reader(f))[:13]
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([[r[0], r[1]] for r in rows])
    for prior in ("auto", "titanx_1"):
        out = tmp_path / f"em_{prior}.json"
        assert main(["fit", "--space", "nb201", "--table", str(path), "--column", "1080ti_1", "--unit", "ms",
                     "--watts", "10", "--out", str(out), "--no_progress", "--prior", prior]) == 0
        doc = json.loads(out.read_text())
        assert doc["fit"]["prior"] == (prior if prior != "auto" else doc["fit"]["prior_choice"][0]["prior"])
    assert main(["fit", "--space", "nb201", "--table", str(path), "--column", "1080ti_1", "--unit", "ms",
                 "--watts", "10", "--out", str(tmp_path / "x.json"), "--no_progress", "--prior", "nope"]) == 2
    assert not (tmp_path / "x.json").exists()


def test_reference_networks_run_what_nb201s_code_runs(table, tmp_path):
    """`--run_as reference` prices a network as NAS-Bench-201's code runs it (its `none` edges run, every edge is
    summed): the traced features equal the measured variant's terms, and differ from the derived network's, which
    leaves `none` edges out. A table of arch strings is priced that way by default (`auto`); the fitted model
    says how its networks were priced."""
    import spaces
    from energy import main
    est, t, shape = EnergyEstimator.default(), R.terms(), (1, 3, 32, 32)
    arch = ("none", "skip_connect", "nor_conv_3x3", "none", "avg_pool_3x3", "nor_conv_1x1")
    traced = {ref: est.family_features(spaces.energy_network("nb201", list(arch), shape[1:], 10, reference=ref),
                                       shape) for ref in (True, False)}
    for ref, variant in ((True, "measured"), (False, "derived")):
        want = R.features(arch, t[variant])
        assert set(traced[ref]) == set(want)
        for fam, v in want.items():
            np.testing.assert_allclose(traced[ref][fam], v, rtol=1e-6)
    calls = lambda f: sum(float(v[2]) for v in f.values())  # noqa: E731
    assert calls(traced[True]) > calls(traced[False])
    with open(DATA, newline="") as f:
        rows = list(csv.reader(f))[:13]
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([[r[0], r[1]] for r in rows])
    fitted = {}
    for flag in ("reference", "derived", None):  # None: the default, auto -- a table of arch strings is reference
        out = tmp_path / f"em_{flag}.json"
        assert main(["fit", "--space", "nb201", "--table", str(path), "--column", rows[0][1], "--unit", "ms",
                     "--watts", "10", "--out", str(out), "--no_progress"]
                    + (["--run_as", flag] if flag else [])) == 0
        fitted[flag] = json.loads(out.read_text())
        assert fitted[flag]["meta"]["run_as"] == (flag or "reference")
    assert fitted[None]["coefficients"] == fitted["reference"]["coefficients"]
    assert fitted["derived"]["coefficients"] != fitted["reference"]["coefficients"]
