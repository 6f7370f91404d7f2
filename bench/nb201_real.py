"""The measured NAS-Bench-201 latencies (../shared/measurements) and the family features of their networks.

Every NB201 network (the project's ``nb201.energy_network`` at 16 channels, 5 cells per stage, 32x32, 10 classes) is
the skeleton plus, in each of its 15 cells, one op per edge and one add per node input beyond the first. So its
features are ``skeleton + sum over edges of op[edge's op] + adds * add``, each term traced once (per-family
[MACs, bytes, calls] over the whole network, per image): :func:`terms` traces them (9 small networks, a few seconds)
and caches them in ``bench/nb201_terms.json``; :func:`check_terms` compares the sum with full traces. Tracing all
15,625 networks would take ~15 minutes here.
"""
from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from nb201 import space as nb201  # noqa: E402
import spaces  # noqa: E402
from dl_energy_estimator import EnergyEstimator  # noqa: E402
from dl_energy_estimator.schema import write_atomic  # noqa: E402

TABLE = os.path.join(ROOT, "..", "shared", "measurements", "nb201_latency_ms.csv")
TERMS = os.path.join(ROOT, "bench", "nb201_terms.json")
SHAPE = (1, 3, 32, 32)
OPS = [op for op in nb201.PRIMITIVES if op != "none"]


def network(arch, measured: bool = True):
    """The project's NB201 network of ``arch`` (16 channels, 5 cells per stage, 10 classes) for 32x32 images;
    ``measured``: its cells run as NB201's code runs them, which HELP measured (``nb201.space.ReferenceCell``:
    ``none`` edges run, every edge summed; ``energy.py fit --run_as reference``)."""
    return spaces.energy_network("nb201", list(arch), SHAPE[1:], 10, reference=measured)


def _trace(arch, measured: bool = False) -> dict[str, np.ndarray]:
    return EnergyEstimator.default().family_features(network(arch, measured), SHAPE)


def _sub(a: dict, b: dict) -> dict:
    return {f: np.asarray(a.get(f, 0.0)) - np.asarray(b.get(f, 0.0)) for f in set(a) | set(b)}


def terms(path: str = TERMS) -> dict:
    """Per variant ("derived": the project's cell, ``none`` left out; "measured": ``nb201.space.ReferenceCell``):
    {"skeleton": feats, "op": {op: feats}, "add": feats} (feats: family -> [MACs, bytes, calls]), cached."""
    if not os.path.exists(path):
        import torch
        doc = {"about": "family features (per image: MACs, bytes, calls) of the NB201 network's terms "
                        "(bench/nb201_real.py): features = skeleton + sum over the 6 edges of op[edge's op] "
                        "+ adds x add", "shape": list(SHAPE), "channels": 16, "cells_per_stage": 5,
               "classes": 10, "torch": torch.__version__}
        none = ["none"] * 6
        for variant, measured in (("derived", False), ("measured", True)):
            skel = _trace(none, measured)
            # edge 1<-0 alone: node 1 has one input, no add (measured: the op replaces a none, adds are fixed)
            op = {o: _sub(_trace([o] + none[1:], measured), skel) for o in OPS}
            add = {}
            if not measured:
                two = ["none"] * 3 + ["skip_connect", "skip_connect", "none"]  # node 3 sums two skips: one add
                add = _sub(_sub(_trace(two), skel), {f: 2 * v for f, v in op["skip_connect"].items()})
            doc[variant] = {"skeleton": _lists(skel), "op": {k: _lists(v) for k, v in op.items()},
                            "add": _lists(add)}
        write_atomic(path, doc)
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return {v: {"skeleton": _arr(doc[v]["skeleton"]), "op": {k: _arr(x) for k, x in doc[v]["op"].items()},
                "add": _arr(doc[v]["add"]), "measured": v == "measured"} for v in ("derived", "measured")}


def _arr(d: dict) -> dict:
    return {f: np.asarray(v, dtype=float) for f, v in d.items()}


def _lists(d: dict) -> dict:
    return {f: [float(x) for x in v] for f, v in sorted(d.items()) if np.any(np.asarray(v) != 0)}


def adds(arch, measured: bool = False) -> int:
    """Adds of one cell beyond the measured cell's fixed ones: per node, its non-none inputs less one."""
    if measured:
        return 0
    return sum(max(sum(arch[e] != "none" for e in nb201.in_edges(node)) - 1, 0) for node in range(1, nb201.NODES))


def features(arch, t: dict) -> dict[str, np.ndarray]:
    """Per-family features of the network of ``arch`` (6 ops) from the terms of one variant."""
    out = {f: v.copy() for f, v in t["skeleton"].items()}
    parts = [t["op"][op] for op in arch if op != "none"] + [t["add"]] * adds(arch, t["measured"])
    for p in parts:
        for f, v in p.items():
            out[f] = out.get(f, 0.0) + v
    return {f: v for f, v in out.items() if np.any(v != 0)}


def check_terms(archs, t: dict) -> float:
    """Largest relative difference of any family feature between the sum of the terms and a full trace."""
    worst = 0.0
    for a in archs:
        full, summed = _trace(a, t["measured"]), features(a, t)
        for f in set(full) | set(summed):
            x, y = np.asarray(full.get(f, 0.0)), np.asarray(summed.get(f, 0.0))
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-9))))
    return worst


def load_table(path: str = TABLE) -> tuple[list[tuple[str, ...]], list[str], np.ndarray]:
    """(archs as 6-op tuples, device columns, latencies ms [networks x devices])."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    cols = rows[0][1:]
    archs = [nb201.parse_arch(r[0]) for r in rows[1:]]
    return archs, cols, np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def op_counts(archs) -> np.ndarray:
    """How many edges use each of the 5 NB201 ops (the op-count regression's features, before the constant)."""
    return np.array([[sum(op == o for op in a) for o in nb201.PRIMITIVES] for a in archs], dtype=float)


def flops(archs, t: dict) -> np.ndarray:
    """MACs of the conv and linear layers per image (what FLOP counters rank by)."""
    fams = ("conv", "conv_pw", "conv_dw", "conv_dw_dilated", "linear")
    return np.array([sum(v[0] for f, v in features(a, t).items() if f in fams) for a in archs])
