"""Calibration on whole networks: a device whose energies follow another model than the analytical default
(here a GPU-like device, launch-dominated, with noise) is learned from ~60 measured networks well enough to rank
60 unseen ones."""
import random

import numpy as np
import pytest
from scipy.stats import spearmanr

import genotypes as G
from dl_energy_estimator import EnergyEstimator
from model import build_network

pytestmark = pytest.mark.slow


def random_genotype(rng):
    ops = [o for o in G.PRIMITIVES if o != "none"]
    cell = lambda: [(rng.choice(ops), rng.randrange(node + 2)) for node in range(4) for _ in range(2)]
    return G.Genotype(cell(), [2, 3, 4, 5], cell(), [2, 3, 4, 5])


def device_truth(est, feats, rng):
    """A device unlike the default: launches cost 20x more, depthwise and pooling 3x, memory 0.5x; 5 % noise."""
    scale = {"e_mac": 1.0, "e_mem": 0.5, "e_call": 20.0}
    extra = {"conv_dw": 3.0, "pool": 3.0}
    total = 0.0
    for fam, (macs, nbytes, calls) in feats.items():
        c = est.coefficients[fam]
        total += extra.get(fam, 1.0) * (macs * c["e_mac"] * scale["e_mac"] + nbytes * c["e_mem"] * scale["e_mem"]
                                        + calls * c["e_call"] * scale["e_call"])
    return total * (1 + 0.05 * rng.standard_normal())


def test_fit_on_60_networks_ranks_unseen_networks():
    rng, nrng = random.Random(0), np.random.default_rng(0)
    est = EnergyEstimator.default()
    feats, truth = [], []
    for _ in range(120):
        C, layers = rng.choice([8, 16, 24]), rng.choice([5, 8, 11])
        net = build_network(random_genotype(rng), C, 10, layers, False, 3, 32).eval()
        f = est.family_features(net, (1, 3, 32, 32))
        feats.append(f)
        truth.append(device_truth(est, f, nrng))
    fitted = est.fit_features(feats[:60], truth[:60])
    pred = [fitted.predict_features(f) for f in feats[60:]]
    default = [est.predict_features(f) for f in feats[60:]]
    rho_fit = spearmanr(pred, truth[60:]).correlation
    rho_default = spearmanr(default, truth[60:]).correlation
    assert rho_fit >= 0.8, (rho_fit, rho_default)
    assert rho_fit > rho_default
