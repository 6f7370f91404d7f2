"""Tests of dl_energy_estimator (real torch, no mocks). The calibrate subprocess test is marked slow."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from dl_energy_estimator import EnergyEstimator, EnergyModelError, LayerFeatures, measure
from dl_energy_estimator.defaults import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EST = EnergyEstimator.default()


def conv(cin, cout, k=3, s=1, d=1, groups=1, bias=False):
    return nn.Conv2d(cin, cout, k, s, d * (k - 1) // 2, d, groups=groups, bias=bias)


def sep_conv(c, k=3, s=1):
    return nn.Sequential(nn.ReLU(), conv(c, c, k, s, groups=c), conv(c, c, 1), nn.BatchNorm2d(c, affine=False),
                         nn.ReLU(), conv(c, c, k, 1, groups=c), conv(c, c, 1), nn.BatchNorm2d(c, affine=False))


class TwoBranch(nn.Module):
    def __init__(self, c, add=True):
        super().__init__()
        self.a, self.b, self.add = sep_conv(c), nn.MaxPool2d(3, 1, 1), add

    def forward(self, x):
        return self.a(x) + self.b(x) if self.add else self.a(x)


class Cell(nn.Module):
    """DARTS-like cell: 4 nodes, each the sum of two edges (sep convs, pools, skips), channel concat."""

    def __init__(self, c):
        super().__init__()
        self.pre0, self.pre1 = nn.Sequential(nn.ReLU(), conv(c, c, 1), nn.BatchNorm2d(c)), nn.Identity()
        self.edges = nn.ModuleList([sep_conv(c) if i % 3 == 0 else nn.MaxPool2d(3, 1, 1) if i % 3 == 1
                                    else nn.Identity() for i in range(8)])
        self.post = conv(4 * c, c, 1)

    def forward(self, x):
        states = [self.pre0(x), self.pre1(x)]
        for i in range(4):
            states.append(sum(self.edges[2 * i + j](states[j]) for j in range(2)))
        return self.post(torch.cat(states[-4:], dim=1))


class Net(nn.Module):
    def __init__(self, c=36, layers=20, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv(3, c), nn.BatchNorm2d(c))
        self.cells = nn.Sequential(*[Cell(c) for _ in range(layers)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x):
        return self.head(self.cells(self.stem(x)))


# ------------------------------------------------------------------------------------------------ fitting
def test_fit_recovers_known_coefficients():
    truth = EnergyEstimator.default()
    scale = {"e_mac": 300.0, "e_mem": 50.0, "e_call": 200.0}
    for fam in FAMILIES:
        for k in scale:
            truth.coefficients[fam][k] *= scale[k] * (1.5 if fam == "conv" else 1.0)
    rng = np.random.default_rng(0)
    samples = []
    for c in (8, 16, 32, 64, 128):
        for r in (4, 8, 16, 32):
            for k in (1, 3):
                m, shape = conv(c, c, k), (1, c, r, r)
                samples.append((m, shape, truth.op_energy(m, shape) * math.exp(rng.normal(0, 0.03))))
    fitted = EnergyEstimator.default().fit(samples)
    for k in scale:  # conv (dense 3x3) coefficients recovered within 15 %
        assert fitted.coefficients["conv"][k] == pytest.approx(truth.coefficients["conv"][k], rel=0.15)
    m = conv(48, 48, 3)
    assert fitted.op_energy(m, (1, 48, 24, 24)) == pytest.approx(truth.op_energy(m, (1, 48, 24, 24)), rel=0.05)
    # families with no data keep the default coefficients times one global factor
    ratios = [fitted.coefficients["pool"][k] / EnergyEstimator.default().coefficients["pool"][k] for k in scale]
    assert ratios[0] == pytest.approx(ratios[1]) == pytest.approx(ratios[2]) == fitted.fit_stats["global_scale"]
    assert fitted.fit_stats["n_samples"] == len(samples) and fitted.fit_stats["median_rel_error"] < 0.05


def test_fit_mixes_ops_and_whole_networks():
    truth = EnergyEstimator.default()
    for c in truth.coefficients.values():
        for k in c:
            c[k] *= 7.0
    nets = [(Net(c, layers=2), (1, 3, 16, 16)) for c in (8, 16)] + [(sep_conv(16), (1, 16, 16, 16))]
    fitted = EnergyEstimator.default().fit([(m, s, truth.model_energy(m, s)) for m, s in nets])
    for m, s in nets:
        assert fitted.model_energy(m, s) == pytest.approx(truth.model_energy(m, s), rel=0.02)


# ------------------------------------------------------------------------------------------------ monotonicity
def test_monotonicity():
    e = EST.op_energy
    assert e(conv(16, 16), (1, 16, 16, 16)) < e(conv(32, 32), (1, 32, 16, 16)) < e(conv(64, 64), (1, 64, 16, 16))
    assert e(conv(16, 16, 3), (1, 16, 16, 16)) < e(conv(16, 16, 5), (1, 16, 16, 16))
    assert e(conv(16, 16, 3, groups=16), (1, 16, 16, 16)) < e(conv(16, 16, 5, groups=16), (1, 16, 16, 16))
    assert e(conv(16, 16), (1, 16, 8, 8)) < e(conv(16, 16), (1, 16, 16, 16)) < e(conv(16, 16), (1, 16, 32, 32))
    assert e(conv(64, 64, 3, groups=64), (1, 64, 32, 32)) < 0.2 * e(conv(64, 64), (1, 64, 32, 32))
    assert e(conv(32, 32, 3, 2), (1, 32, 32, 32)) < e(conv(32, 32, 3, 1), (1, 32, 32, 32))
    assert e(nn.MaxPool2d(3, 2, 1), (1, 32, 32, 32)) < e(nn.MaxPool2d(3, 1, 1), (1, 32, 32, 32))
    assert e(nn.AvgPool2d(3, 2, 1), (1, 32, 32, 32)) < e(nn.AvgPool2d(3, 1, 1), (1, 32, 32, 32))
    assert e(nn.BatchNorm2d(8), (1, 8, 16, 16)) < e(nn.BatchNorm2d(32), (1, 32, 16, 16))
    for m in (nn.BatchNorm2d(16, affine=False), nn.ReLU(), nn.MaxPool2d(3, 1, 1),
              nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.AdaptiveAvgPool2d(1), nn.Identity(), nn.Dropout()):
        assert e(m, (1, 16, 8, 8)) > 0, m  # memory-bound ops are not free
    assert e(nn.Linear(64, 10), (1, 64)) < e(nn.Linear(256, 10), (1, 256))
    assert e(conv(16, 16, 3, d=2, groups=16), (1, 16, 16, 16)) > 0


def test_batch_is_deployment_batch_and_results_per_sample():
    m = conv(16, 16)
    assert EST.count_macs(m, (4, 16, 8, 8)) == EST.count_macs(m, (1, 16, 8, 8)) == 16 * 16 * 9 * 64
    assert EST.op_energy(m, (8, 16, 8, 8)) < EST.op_energy(m, (1, 16, 8, 8))  # call overhead shared by the batch
    assert EST.batch_size == 1 and EnergyEstimator.default(batch_size=8).batch_size == 8


# ------------------------------------------------------------------------------------------------ op vs model
def test_op_and_model_energies_agree():
    for m in (conv(16, 32, 3, 2, bias=True), nn.BatchNorm2d(16), nn.MaxPool2d(3, 1, 1), sep_conv(16)):
        assert EST.model_energy(nn.Sequential(m), (1, 16, 16, 16)) == pytest.approx(EST.op_energy(m, (1, 16, 16, 16)))
    shape = (1, 16, 16, 16)
    with_add, without = TwoBranch(16), TwoBranch(16, add=False)
    expect = EST.op_energy(with_add.a, shape) + EST.op_energy(with_add.b, shape) + EST.elementwise_energy(shape, 2)
    assert EST.model_energy(with_add, shape) == pytest.approx(expect)
    assert EST.model_energy(with_add, shape) > EST.model_energy(without, shape) + EST.op_energy(with_add.b, shape)
    rows = EST.breakdown(with_add, shape)
    assert {"name", "type", "macs", "bytes", "energy_mj"} <= set(rows[0])
    assert [r["type"] for r in rows].count("elementwise") == 1
    assert sum(r["energy_mj"] for r in rows) == pytest.approx(1e3 * EST.model_energy(with_add, shape))


def test_functional_ops_are_not_free():
    class Cat(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], 1)

    class Mask(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv(8, 8)

        def forward(self, x):
            return self.conv(x) * torch.ones(1, 8, 1, 1)

    s = (1, 8, 8, 8)
    types = [r["type"] for r in EST.breakdown(Cat(), s)]
    assert types == ["concat"] and EST.model_energy(Cat(), s) > 0
    assert EST.model_energy(Mask(), s) > EST.op_energy(conv(8, 8), s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unknown childless modules with priced functional ops do not warn
        EST.model_energy(Cat(), s)


def test_register_extension_point():
    class Zero(nn.Module):
        def forward(self, x):
            return x.mul(0.)

    class Fancy(nn.Module):
        def forward(self, x):
            return x.flip(1)

    EnergyEstimator.register(Fancy, lambda m, i, o: {"family": "elementwise", "macs": 0, "bytes": 123.0,
                                                     "calls": 1})
    f = EST.breakdown(Fancy(), (1, 4, 4, 4))
    assert len(f) == 1 and f[0]["bytes"] == 123
    assert EST.op_energy(Zero(), (1, 4, 4, 4)) > 0  # x.mul(0.) is priced as element-wise work
    with pytest.raises(ValueError):
        LayerFeatures("nonsense")


def test_unknown_leaf_warns_once_and_costs():
    class Weird(nn.Module):
        def forward(self, x):
            return x.flip(1)  # an op the tracer does not price

    model = nn.Sequential(Weird(), Weird())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        e1 = EST.model_energy(model, (1, 8, 8, 8))
        e2 = EST.model_energy(model, (1, 8, 8, 8))
    hits = [x for x in w if "Weird" in str(x.message)]
    assert len(hits) == 1 and e1 == e2 > 0
    assert EST.breakdown(model, (1, 8, 8, 8))[0]["type"] == "other"


def test_trace_has_no_side_effects_and_is_fast():
    net = Net(36, 20)
    net.train()
    net.cells[3].eval()
    bn = net.stem[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    t = time.perf_counter()
    e = EST.model_energy(net, (1, 3, 32, 32))
    elapsed = time.perf_counter() - t
    assert e > 0 and elapsed < 1.0, elapsed
    assert net.training and not net.cells[3].training and net.cells[4].training
    assert torch.equal(before[0], bn.running_mean) and torch.equal(before[1], bn.running_var)
    assert before[2] == int(bn.num_batches_tracked)
    assert all(p.grad is None for p in net.parameters())
    assert EST.count_macs(net, (1, 3, 32, 32)) > 0


def test_nested_op_energy_inside_forward_is_not_double_counted():
    class CachingOp(nn.Module):  # the project's pattern: estimate itself on first forward, guarded
        def __init__(self, c):
            super().__init__()
            self.op, self.energy, self._busy = sep_conv(c), None, False

        def forward(self, x):
            if self.energy is None and not self._busy:
                self._busy = True
                try:
                    self.energy = EST.op_energy(self, (1,) + tuple(x.shape[1:]))
                finally:
                    self._busy = False
            return self.op(x)

    a, b = CachingOp(8), CachingOp(8)
    total = EST.model_energy(nn.Sequential(a, b), (1, 8, 8, 8))
    assert a.energy == pytest.approx(EST.op_energy(a.op, (1, 8, 8, 8)))
    assert total == pytest.approx(a.energy + b.energy)


# ------------------------------------------------------------------------------------------------ ranking sanity
def test_analytical_beats_flops_on_sanity_checks():
    """Pairs whose order is known on every real device at batch 1, and which FLOP counts cannot separate:
    zero-FLOP layers added to a network, depthwise vs dense at equal MACs (depthwise is memory bound and slower
    per MAC everywhere), many tiny layers vs one layer of equal MACs (per-kernel overhead)."""
    s = (1, 32, 16, 16)
    flops = lambda m, shp: sum(r["macs"] for r in EST.breakdown(m, shp) if r["type"].startswith(("conv", "linear")))
    base = nn.Sequential(conv(32, 32))
    growing = [base, nn.Sequential(conv(32, 32), nn.BatchNorm2d(32)),
               nn.Sequential(conv(32, 32), nn.BatchNorm2d(32), nn.ReLU()),
               nn.Sequential(conv(32, 32), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 1, 1)),
               TwoBranchMax(32)]
    truth = list(range(len(growing)))
    est = [EST.model_energy(m, s) for m in growing]
    fl = [flops(m, s) for m in growing]
    assert spearmanr(est, truth).statistic == pytest.approx(1.0)
    assert spearmanr(est, truth).statistic > (spearmanr(fl, truth).statistic if np.std(fl) else 0.0)
    # depthwise stack vs dense conv with the same MACs: 32 depthwise 3x3 layers at 32 ch = one dense 3x3 32->32
    dw_stack = nn.Sequential(*[conv(32, 32, 3, groups=32) for _ in range(32)])
    dense = conv(32, 32)
    assert flops(dw_stack, s) == flops(dense, s)
    assert EST.model_energy(dw_stack, s) > 2 * EST.model_energy(dense, s)
    # 16 tiny 1x1 convs vs one 1x1 conv of the same MACs (8 -> 128 channels)
    tiny, one, s8 = nn.Sequential(*[conv(8, 8, 1) for _ in range(16)]), conv(8, 128, 1), (1, 8, 16, 16)
    assert flops(tiny, s8) == flops(one, s8)
    assert EST.model_energy(tiny, s8) > EST.model_energy(one, s8)


class TwoBranchMax(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Sequential(conv(c, c), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(3, 1, 1))
        self.b = nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


# ------------------------------------------------------------------------------------------------ files
def test_save_load_roundtrip(tmp_path):
    truth = EnergyEstimator.default()
    samples = [(conv(c, c), (1, c, 8, 8), truth.op_energy(conv(c, c), (1, c, 8, 8)) * 3) for c in (8, 16, 32)]
    fitted = EnergyEstimator.default().fit(samples)
    p = tmp_path / "energy_model.json"
    fitted.save(p)
    loaded = EnergyEstimator.load(p)
    assert loaded.to_dict() == fitted.to_dict() and loaded.sha256() == fitted.sha256()
    net = Net(8, 2)
    assert loaded.model_energy(net, (1, 3, 16, 16)) == fitted.model_energy(net, (1, 3, 16, 16))
    p2 = tmp_path / "again.json"
    loaded.save(p2)
    assert p.read_text() == p2.read_text()
    doc = json.loads(p.read_text())
    assert doc["format"] == 1 and set(doc) == {"format", "coefficients", "meta", "fit"}
    assert {"device", "driver", "torch", "dtype", "batch_size", "source", "date"} <= set(doc["meta"])
    assert [f.name for f in tmp_path.iterdir()] and not [f for f in tmp_path.iterdir() if f.suffix == ".tmp"]
    assert len(EnergyEstimator.default().sha256()) == 64 and EnergyEstimator.default().name


@pytest.mark.parametrize("text, problem", [
    ("not json {", "not valid JSON"),
    ("[1, 2]", "top level"),
    (None, "unsupported format"),
    ("drop:meta", "missing key 'meta'"),
    ("drop:conv", "missing coefficients for layer family 'conv'"),
    ("neg", "negative"),
    ("nan", "not valid JSON"),
])
def test_bad_files_raise_energy_model_error(tmp_path, text, problem):
    doc = EnergyEstimator.default().to_dict()
    if text is None:
        doc["format"] = 2
    elif text == "drop:meta":
        del doc["meta"]
    elif text == "drop:conv":
        del doc["coefficients"]["conv"]
    elif text == "neg":
        doc["coefficients"]["relu"]["e_mem"] = -1.0
    if text is None or text.startswith("drop") or text == "neg":
        text = json.dumps(doc)
    elif text == "nan":
        text = json.dumps(doc).replace('"e_call": 1.5e-06', '"e_call": NaN', 1)
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(EnergyModelError) as ei:
        EnergyEstimator.load(p)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError) and str(p) in msg and problem in msg and "\n" not in msg
    with pytest.raises(EnergyModelError, match="cannot read"):
        EnergyEstimator.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------ measuring / CLI
def _rapl_readable() -> bool:
    import glob
    for p in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj"):
        try:
            open(p).read()
            return True
        except OSError:
            pass
    return False


def _cli(args, cwd, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dl_energy_estimator", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_measure_latency_x_watts():
    res = measure([(conv(8, 8), (1, 8, 8, 8)), (conv(64, 64), (1, 64, 32, 32))], watts=10.0, window_s=0.02,
                  repeats=1, batch_size=2)
    assert res.source == "latency_x_watts" and res.meta["watts"] == 10.0 and 0 < res[0] < res[1]
    assert res.joules == list(res)
    with pytest.raises(ValueError):
        measure([(conv(8, 8), (1, 8, 8, 8))], watts=-1)


@pytest.mark.skipif(_rapl_readable(), reason="this machine has a readable RAPL counter")
def test_calibrate_without_watts_exits_2(tmp_path):
    r = _cli(["calibrate", "--device", "cpu", "--grid", "small", "--out", "m.json"], tmp_path, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "m.json").exists()
    assert "no energy counter is readable" in r.stderr.strip().splitlines()[-1] and "--watts" in r.stderr
    for bad in (["calibrate", "--watts", "-3"], ["calibrate", "--grid", "huge"], ["report", "nope.json"]):
        r = _cli(bad, tmp_path, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_calibrate_cli_small_grid_ranks_heldout_layers(tmp_path):
    r = _cli(["calibrate", "--device", "cpu", "--watts", "65", "--grid", "small", "--out", "m.json",
              "--no_progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out" in r.stdout and "cv_med_rel_err" in r.stdout
    est = EnergyEstimator.load(tmp_path / "m.json")
    assert est.meta["source"] == "latency_x_watts" and est.meta["batch_size"] == 1
    items = sorted(est.fit_stats["heldout"]["items"], key=lambda it: it["measured_mj"])
    kept = [items[0]]  # distinct sizes: drop near-ties (within 25 % of the previous kept item)
    for it in items[1:]:
        if it["measured_mj"] > 1.25 * kept[-1]["measured_mj"]:
            kept.append(it)
    assert len(kept) >= 6
    rho = spearmanr([it["predicted_mj"] for it in kept], [it["measured_mj"] for it in kept]).statistic
    assert rho >= 0.9, (rho, kept)
    rep = _cli(["report", "m.json"], tmp_path, timeout=60)
    assert rep.returncode == 0 and "held-out" in rep.stdout and "conv_dw" in rep.stdout
