"""How the energy-model fit is judged (issue 13), shared by tests/test_energy_fit.py and bench/estimator_fit.py.

* Random networks of the DARTS space (random cells, at one or several widths/depths), traced once: per-family
  features for the fit, per-layer records (family, MACs, bytes, calls, cell position, whether the layer reads a
  cell input) for the synthetic devices.
* Synthetic devices with the structure of real ones: near the prior with 5-20 % noise, launch-dominated (edge
  GPU), memory-bound with a cache cliff, and effects the features cannot see (cost growing with the cell's
  position, edges that read a cell input).
* The baseline the fit must beat: NNLS on the op counts per cell type plus a constant -- the regression people
  fit on such benchmarks. It lives here, not in the product.
* Draws: a seeded permutation; the first 60 (or 240) networks train, the rest (the same ones for both sizes) are
  ranked (Spearman).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls
from scipy.stats import spearmanr

from torch import nn

from dl_energy_estimator import EnergyEstimator
from dl_energy_estimator.defaults import FAMILIES, FEATURES

OPS = ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
       "dil_conv_5x5"]
_CELL = re.compile(r"^cells\.(\d+)\.(?:_ops\.(\d+)|(preprocess))")


def random_genotype(rng: random.Random) -> dict:
    """A genotype.json object: each of 4 nodes takes two distinct earlier states through random ops."""
    def cell():
        pairs = []
        for node in range(4):
            for idx in rng.sample(range(node + 2), 2):
                pairs.append([rng.choice(OPS), idx])
        return pairs
    return {"format": 1, "normal": cell(), "normal_concat": [2, 3, 4, 5], "reduce": cell(),
            "reduce_concat": [2, 3, 4, 5], "primitives": None, "meta": {}}


def op_counts(genotype: dict) -> np.ndarray:
    """Per cell type (normal, reduce), how many edges use each op."""
    v = np.zeros(2 * len(OPS))
    for t, kind in enumerate(("normal", "reduce")):
        for op, _ in genotype[kind]:
            v[t * len(OPS) + OPS.index(op)] += 1
    return v


@dataclass
class Net:
    config: tuple[int, int]          # (init channels, layers)
    genotype: object                 # darts: genotype.json object; nb201: list of 6 op names
    feats: dict                      # family -> [MACs, bytes, calls] per sample
    layers: np.ndarray               # per layer: family index, MACs, bytes, calls, cell position in [0, 1], reads input
    counts: np.ndarray = field(default=None)

    def cells_of_type(self) -> np.ndarray:
        C, L = self.config
        if isinstance(self.genotype, list):  # nb201: one cell type
            return np.array([3.0 * L])
        n_reduce = len({L // 3, 2 * L // 3})
        return np.array([L - n_reduce, n_reduce], dtype=float)


def _darts_where(genotype: dict, config: tuple[int, int]):
    C, L = config
    reductions = {L // 3, 2 * L // 3}

    def where(name: str) -> tuple[float, float]:
        m = _CELL.match(name)
        if not m:
            return -1.0, 0.0
        cell = int(m.group(1))
        if m.group(3):
            return cell / max(1, L - 1), 1.0
        kind = "reduce" if cell in reductions else "normal"
        return cell / max(1, L - 1), float(genotype[kind][int(m.group(2))][1] < 2)
    return where


def trace_net(est: EnergyEstimator, module, where, config, genotype, counts: np.ndarray, shape) -> Net:
    """Per-layer records of one traced network; ``where(name)`` -> (cell position in [0, 1] or -1, reads input)."""
    rows = []
    for f in est.trace(module, shape):
        rows.append([FAMILIES.index(f.family), f.macs, f.bytes, f.calls, *where(f.name)])
    layers = np.array(rows, dtype=float)
    layers[:, 1:4] /= shape[0]
    feats = {}
    for fam_i in np.unique(layers[:, 0]).astype(int):
        feats[FAMILIES[fam_i]] = layers[layers[:, 0] == fam_i, 1:4].sum(0)
    return Net(config, genotype, feats, layers, counts)


def build_pool(n_per_config: dict, seed: int = 0, input_shape=(1, 3, 32, 32), progress: bool = False,
               space: str = "darts") -> list[Net]:
    """Random networks, ``n_per_config[(C, layers)]`` of each configuration, traced with the default estimator.
    darts: the project's networks (spaces.energy_network); nb201: :class:`NB201Net` (cells per stage = layers)."""
    est = EnergyEstimator.default()
    rng = random.Random(seed)
    jobs = [cfg for cfg, n in n_per_config.items() for _ in range(n)]
    it = jobs
    if progress:
        from tqdm import tqdm
        it = tqdm(jobs, desc=f"tracing {space} networks", unit="net")
    out = []
    for C, L in it:
        if space == "darts":
            import spaces
            g = random_genotype(rng)
            module = spaces.energy_network("darts", g, input_shape[1:], 10, C, L)
            out.append(trace_net(est, module, _darts_where(g, (C, L)), (C, L), g, op_counts(g), input_shape))
        else:
            arch = [rng.choice(NB201_OPS) for _ in range(6)]
            module = NB201Net(arch, C, L, input_shape[1]).eval()
            out.append(trace_net(est, module, module.where, (C, L), arch, nb201_counts(arch), input_shape))
    return out


# ------------------------------------------------------------------------------------------------ NB201-like
NB201_OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
NB201_INPUT = [0, 0, 1, 0, 1, 2]  # edge k of the cell reads node NB201_INPUT[k] (edges into nodes 1, 2, 3)


def nb201_counts(arch: list[str]) -> np.ndarray:
    """How many edges use each op other than none (the 4 op counts of the regression)."""
    return np.array([sum(op == o for op in arch) for o in NB201_OPS[1:]], dtype=float)


class _Zero(nn.Module):
    def forward(self, x):
        return x.mul(0.0)


def _nb201_op(name: str, C: int) -> nn.Module:
    if name == "none":
        return _Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    k = 1 if name == "nor_conv_1x1" else 3
    return nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, k, 1, k // 2, bias=False), nn.BatchNorm2d(C))


class _NB201Cell(nn.Module):
    def __init__(self, arch: list[str], C: int):
        super().__init__()
        self.edges = nn.ModuleList(_nb201_op(op, C) for op in arch)

    def forward(self, x):
        nodes = [x]
        k = 0
        for j in range(1, 4):
            h = None
            for _ in range(j):
                o = self.edges[k](nodes[NB201_INPUT[k]])
                h = o if h is None else h + o
                k += 1
            nodes.append(h)
        return nodes[-1]


class _ResBlock(nn.Module):
    """NAS-Bench-201's reduction between stages: a stride-2 basic block with an avg-pool + 1x1 shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.a = nn.Sequential(nn.ReLU(), nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout))
        self.b = nn.Sequential(nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x):
        return self.short(x) + self.b(self.a(x))


class NB201Net(nn.Module):
    """A NAS-Bench-201-like network (evaluation only): stem, 3 stages of ``N`` cells at C, 2C, 4C, residual
    reductions, BN-ReLU, global pooling, classifier."""

    def __init__(self, arch: list[str], C: int = 16, N: int = 5, in_channels: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, 1, 1, bias=False), nn.BatchNorm2d(C))
        cells, c = [], C
        for stage in range(3):
            if stage:
                cells.append(_ResBlock(c, 2 * c))
                c *= 2
            cells += [_NB201Cell(arch, c) for _ in range(N)]
        self.cells = nn.ModuleList(cells)
        self.lastact = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, classes)
        self._n = len(cells)

    def forward(self, x):
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.classifier(self.pool(self.lastact(x)).flatten(1))

    def where(self, name: str) -> tuple[float, float]:
        m = re.match(r"^cells\.(\d+)\.(?:edges\.(\d+))?", name)
        if not m:
            return -1.0, 0.0
        pos = int(m.group(1)) / (self._n - 1)
        return pos, float(m.group(2) is not None and NB201_INPUT[int(m.group(2))] == 0)


# ------------------------------------------------------------------------------------------------ devices
def _coefs(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Default coefficients (family x feature) with a random factor per family and feature."""
    d = EnergyEstimator.default().coefficients
    base = np.array([[d[f][k] for k in FEATURES] for f in FAMILIES])
    return base * np.exp(sigma * rng.standard_normal(base.shape))


def _layer_energy(layers: np.ndarray, coef: np.ndarray) -> np.ndarray:
    fam = layers[:, 0].astype(int)
    return (coef[fam] * layers[:, 1:4]).sum(1)


def _noise(e: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return e * np.exp(sigma * rng.standard_normal(len(e)))


def device_energies(nets: list[Net], device: str, seed: int = 0) -> np.ndarray:
    """Joules per sample of each network on a synthetic device (see DEVICES)."""
    rng = np.random.default_rng(seed)
    fi = {f: i for i, f in enumerate(FAMILIES)}
    if device.startswith("near-prior"):
        sigma = int(device.split("-")[-1].rstrip("%")) / 100
        coef = _coefs(rng, 0.3)
        e = np.array([_layer_energy(n.layers, coef).sum() for n in nets])
        return _noise(e, rng, sigma)
    if device == "launch-dominated":
        # edge GPU at batch 1: ~20 us per kernel at a few watts; depthwise and pooling kernels are slower per launch
        factor = {"conv": 1.3, "conv_pw": 1.0, "conv_dw": 1.6, "conv_dw_dilated": 2.0, "bn": 0.6, "relu": 0.5,
                  "pool": 1.2, "pool_max": 1.0, "linear": 1.0, "elementwise": 0.7, "concat": 0.9, "other": 1.0}
        per_call = 40e-6 * np.array([factor.get(f, 0.0) for f in FAMILIES])
        coef = np.stack([np.full(len(FAMILIES), 0.4e-12), np.full(len(FAMILIES), 1.5e-12), per_call], 1)
        e = np.array([_layer_energy(n.layers, coef).sum() for n in nets]) + 3e-3  # sync, copies: per pass
        return _noise(e, rng, 0.05)
    if device == "memory-bound":
        # bytes dominate; a layer whose traffic exceeds the cache pays DRAM prices (a cliff no feature shows)
        coef = np.zeros((len(FAMILIES), 3))
        coef[:, 0] = 2e-12
        for f in ("conv_dw", "conv_dw_dilated", "pool", "pool_max"):
            coef[fi[f], 0] = 8e-12
        coef[:, 1] = 30e-12
        coef[:, 2] = 0.3e-6
        out = []
        for n in nets:
            spill = np.where(n.layers[:, 2] > 96e3, 3.0, 1.0)
            out.append((_layer_energy(n.layers, coef) + (spill - 1) * n.layers[:, 2] * 30e-12).sum())
        return _noise(np.array(out), rng, 0.05)
    if device == "accelerator":
        # a systolic array: dense MACs cheap, depthwise at a tenth of the utilisation, BN and ReLU fused away,
        # on-chip SRAM traffic, no launch cost; a simulator's numbers (1 % noise)
        coef = np.zeros((len(FAMILIES), 3))
        for f, e in {"conv": 1.0, "conv_pw": 1.0, "linear": 1.0, "conv_dw": 10.0, "conv_dw_dilated": 12.0,
                     "pool": 3.0, "pool_max": 3.0, "elementwise": 2.0, "concat": 0.5}.items():
            coef[fi[f], 0] = e * 1e-12
        coef[:, 1] = 1e-12
        coef[fi["bn"], 1] = coef[fi["relu"], 1] = 0.0
        e = np.array([_layer_energy(n.layers, coef).sum() for n in nets])
        return _noise(e, rng, 0.01)
    if device == "cell-position":
        # what the features cannot see: deeper cells cost up to 2x (clock throttling over the pass), and an edge
        # reading a cell input (an older tensor, evicted) costs 1.5x
        coef = _coefs(rng, 0.3)
        out = []
        for n in nets:
            pos, reads = n.layers[:, 4], n.layers[:, 5]
            factor = np.where(pos >= 0, 1.0 + pos, 1.0) * np.where(reads > 0, 1.5, 1.0)
            out.append((_layer_energy(n.layers, coef) * factor).sum())
        return _noise(np.array(out), rng, 0.10)
    raise ValueError(f"unknown device {device!r}")


DEVICES = ("near-prior-5%", "near-prior-20%", "launch-dominated", "memory-bound", "accelerator", "cell-position")


# ------------------------------------------------------------------------------------------------ baseline
def op_count_design(nets: list[Net]) -> np.ndarray:
    """Op counts per cell type times the number of cells of that type, plus one constant per configuration."""
    configs = sorted({n.config for n in nets})
    rows = []
    for n in nets:
        cells = n.cells_of_type()
        k = len(n.counts) // len(cells)
        c = n.counts * np.repeat(cells, k)
        rows.append(np.concatenate([c, [float(n.config == cfg) for cfg in configs]]))
    return np.array(rows)


def nnls_op_counts(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray) -> np.ndarray:
    """NNLS regression of the energy on op counts (relative errors, as the fit): predictions for X_test."""
    scale = np.abs(X_train).max(0)
    scale[scale == 0] = 1
    w, _ = nnls(X_train / scale / y_train[:, None], np.ones(len(y_train)), maxiter=100 * X_train.shape[1])
    return X_test / scale @ w


# ------------------------------------------------------------------------------------------------ draws
TOL = 0.005  # the conditions' tolerance: equally good models differ by this much on a few dozen held-out networks


def rho(a, b) -> float:
    return float(spearmanr(a, b).statistic)


def evaluate(nets: list[Net], y: np.ndarray, sizes=(60, 240), draws: int = 5, seed: int = 0) -> dict:
    """Spearman on the held-out networks of each draw: default, fit and op-count NNLS per training size.

    Every size of one draw is ranked on the same held-out networks (those after the largest training size)."""
    est = EnergyEstimator.default()
    X = op_count_design(nets)
    default = np.array([est.predict_features(n.feats) for n in nets])
    sizes = [s for s in sizes if s < len(nets) - 10]
    out = {"default": [], **{f"fit{s}": [] for s in sizes}, **{f"nnls{s}": [] for s in sizes},
           "chosen": {s: [] for s in sizes}}
    for d in range(draws):
        perm = np.random.default_rng([seed, d]).permutation(len(nets))
        test = perm[max(sizes):]
        out["default"].append(rho(default[test], y[test]))
        for s in sizes:
            tr = perm[:s]
            fitted = est.fit_features([nets[i].feats for i in tr], y[tr], seed=seed, report=False)
            pred = [fitted.predict_features(nets[i].feats) for i in test]
            out[f"fit{s}"].append(rho(pred, y[test]))
            out[f"nnls{s}"].append(rho(nnls_op_counts(X[tr], y[tr], X[test]), y[test]))
            out["chosen"][s].append(fitted.fit_stats["chosen"])
    return out
