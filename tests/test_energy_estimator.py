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

from conftest import distinct_sizes
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
    # the fixed-ridge per family x feature model recovers all three dense-conv coefficients within 15 %
    fixed = EnergyEstimator.default().fit(samples, ridge=1e-3)
    for k in scale:
        assert fixed.coefficients["conv"][k] == pytest.approx(truth.coefficients["conv"][k], rel=0.15)
    # the cross-validated fit chooses for prediction: its unseen layers within 5 %, and the coefficients that
    # carry the energy within 15 % (memory is ~1 % of a conv's energy here: 3 % noise leaves it unidentified)
    fitted = EnergyEstimator.default().fit(samples)
    assert fitted.fit_stats["chosen"] != "global"
    for k in ("e_mac", "e_call"):
        assert fitted.coefficients["conv"][k] == pytest.approx(truth.coefficients["conv"][k], rel=0.15)
    m = conv(48, 48, 3)
    assert fitted.op_energy(m, (1, 48, 24, 24)) == pytest.approx(truth.op_energy(m, (1, 48, 24, 24)), rel=0.05)
    assert fixed.op_energy(m, (1, 48, 24, 24)) == pytest.approx(truth.op_energy(m, (1, 48, 24, 24)), rel=0.05)
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
    # 0.3 s windows (the default for latency is 0.1 s): one held-out pooling layer timed at 2x its usual cost on
    # some runs of a shared 2-core machine; the bar stays, the timing behind it is steadier
    r = _cli(["calibrate", "--device", "cpu", "--watts", "65", "--grid", "small", "--out", "m.json",
              "--window_s", "0.3", "--no_progress"], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out" in r.stdout and "cv_med_rel_err" in r.stdout
    est = EnergyEstimator.load(tmp_path / "m.json")
    assert est.meta["source"] == "latency_x_watts" and est.meta["batch_size"] == 1
    kept = distinct_sizes(est.fit_stats["heldout"]["items"], lambda it: it["measured_mj"])
    assert len(kept) >= 6
    rho = spearmanr([it["predicted_mj"] for it in kept], [it["measured_mj"] for it in kept]).statistic
    # 0.89-0.96 on an idle machine; the held-out truth is itself a timing (an avgpool of 36 to 64 mJ from run to
    # run on a loaded 2-core CI machine), so the bar leaves room for that and asks, beyond it, for a large margin
    # over ranking by MACs (0.36-0.40 on the same items)
    assert rho >= 0.85, (rho, kept)
    h = est.fit_stats["heldout"]
    assert h["spearman"] >= h["spearman_macs_only"] + 0.3, h
    rep = _cli(["report", "m.json"], tmp_path, timeout=60)
    assert rep.returncode == 0 and "held-out" in rep.stdout and "conv_dw" in rep.stdout


# ------------------------------------------------------------------------------------------------ batch size
class _BatchDependent(nn.Module):
    """Control flow on the batch: its trace is not affine in it."""

    def forward(self, x):
        return x.sum(0, keepdim=True) if x.shape[0] > 2 else x * 2


def test_large_batches_are_extrapolated_exactly_not_allocated():
    from dl_energy_estimator.trace import _trace
    net = Net(8, 2)
    direct = _trace(net, (8, 3, 16, 16), EnergyEstimator._registry)
    extrapolated = EST.trace(net, (8, 3, 16, 16))
    assert [(f.name, f.family, f.macs, f.bytes, f.calls) for f in extrapolated] == \
        [(f.name, f.family, f.macs, f.bytes, f.calls) for f in direct]
    t = time.perf_counter()
    huge = EST.model_energy(net, (10_000_000, 3, 16, 16))  # 31 GB of input alone: never allocated
    assert time.perf_counter() - t < 5 and 0 < huge < EST.model_energy(net, (8, 3, 16, 16))
    # not affine: traced at the batch itself, and a batch too big for memory is one clear error
    m = _BatchDependent()
    assert EST.breakdown(m, (4, 8, 4, 4))[0]["type"] == "elementwise"
    from dl_energy_estimator import EnergyMemoryError
    with pytest.raises(EnergyMemoryError, match="smaller batch size"):
        EST.model_energy(m, (10 ** 9, 8, 16, 16))
    with pytest.raises(EnergyMemoryError, match="smaller batch size"):
        measure([(conv(8, 8), (1, 8, 64, 64))], watts=1.0, batch_size=10 ** 8)


# ------------------------------------------------------------------------------------------------ Zeus
class _FakeMonitor:
    """ZeusMonitor's interface: windows; energy = 5 W x wall time + 25 W x this process's CPU time."""
    kind = "cpu"

    def __init__(self, gpu_indices=None, cpu_indices=None, approx_instant_energy=False):
        k = type(self).kind
        if k == "gpu" and gpu_indices:
            self.gpu_indices = list(gpu_indices)
        elif k == "gpu-missing" and gpu_indices:
            raise RuntimeError("no NVML")
        else:
            self.gpu_indices = []
        self.cpu_indices = [0] if k == "cpu" and cpu_indices is None else []
        self.soc_is_present = k == "soc"
        self.open = {}

    def begin_window(self, key, sync_execution=True):
        self.open[key] = (time.perf_counter(), time.process_time())

    def end_window(self, key, sync_execution=True):
        from types import SimpleNamespace
        t0, c0 = self.open.pop(key)
        j = 5 * (time.perf_counter() - t0) + 25 * (time.process_time() - c0)
        k = type(self).kind
        return SimpleNamespace(time=0, gpu_energy={i: j for i in self.gpu_indices},
                               cpu_energy={0: 0.8 * j} if k == "cpu" else None,
                               dram_energy={0: 0.2 * j} if k == "cpu" else None,
                               soc_energy=SimpleNamespace(total_energy_mj=1e3 * j) if k == "soc" else None)


@pytest.fixture
def fake_zeus(monkeypatch):
    import types
    zeus, monitor = types.ModuleType("zeus"), types.ModuleType("zeus.monitor")
    zeus.__version__ = "0.0-test"
    monitor.ZeusMonitor = _FakeMonitor
    zeus.monitor = monitor
    monkeypatch.setitem(sys.modules, "zeus", zeus)
    monkeypatch.setitem(sys.modules, "zeus.monitor", monitor)
    return _FakeMonitor


@pytest.mark.parametrize("kind", ["cpu", "soc"])
def test_measure_through_zeus(fake_zeus, monkeypatch, kind):
    monkeypatch.setattr(fake_zeus, "kind", kind)
    res = measure([(conv(8, 8), (1, 8, 8, 8)), (conv(64, 64), (1, 64, 32, 32))], window_s=0.05, repeats=3,
                  idle_s=0.1)
    assert res.source == "zeus" and res.meta["counter"] == f"zeus:{kind}" and "zeus 0.0-test" in res.meta["driver"]
    assert 0 <= res.meta["idle_w"] < 6 and 0 < res[0] < res[1]


def test_zeus_gpu_counter(fake_zeus, monkeypatch):
    from dl_energy_estimator.measure import ZeusCounter
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(fake_zeus, "kind", "gpu")
    c = ZeusCounter("cuda")
    c.begin()
    time.sleep(0.05)
    assert c.kind == "gpu" and c.end() >= 0.2
    monkeypatch.setattr(fake_zeus, "kind", "gpu-missing")  # no GPU counter, no SoC
    with pytest.raises(Exception, match="no GPU counter for cuda:0.*no SoC"):
        ZeusCounter("cuda")


def test_zeus_without_counter_falls_back_or_says_why(fake_zeus, monkeypatch):
    from dl_energy_estimator import EnergyCounterUnavailable
    monkeypatch.setattr(fake_zeus, "kind", "none")
    res = measure([(conv(8, 8), (1, 8, 8, 8))], watts=10.0, window_s=0.02, repeats=1)
    assert res.source == "latency_x_watts" and "RAPL" in res.meta["fallback_reason"]
    with pytest.raises(EnergyCounterUnavailable, match="Zeus found no readable RAPL.*--watts"):
        measure([(conv(8, 8), (1, 8, 8, 8))])
    monkeypatch.setitem(sys.modules, "zeus.monitor", None)  # not installed
    with pytest.raises(EnergyCounterUnavailable, match="Zeus is not installed"):
        measure([(conv(8, 8), (1, 8, 8, 8))], source="zeus")


# ------------------------------------------------------------------------------------------------ hostile files
def _fitted_doc() -> dict:
    rng = np.random.default_rng(0)
    nets = [(Net(c, layers=l), (1, 3, 8, 8)) for c in (4, 8) for l in (1, 2, 3, 4, 5)]
    est = EnergyEstimator.default().fit([(m, s, EST.model_energy(m, s) * rng.uniform(1, 3)) for m, s in nets])
    doc = est.to_dict()
    doc["fit"]["table"] = [{"family": "conv", "n": 3, "measured_mj": 1.0, "predicted_mj": 1.1,
                            "cv_median_rel_error": 0.1}]
    doc["fit"]["heldout"] = {"n": 1, "spearman": 0.9, "spearman_macs_only": None, "median_rel_error": 0.1,
                             "items": [{"name": "a", "family": "conv", "measured_mj": 1.0, "predicted_mj": 1.0}]}
    return doc


_VALUES = [None, True, False, -1, 0, 3, 2.5, 1e308, "x", "", [], {}, [1, "a"], {"a": {"b": [None]}}]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, prefix + (i,))


def _mutations(doc: dict, n: int, seed: int):
    """Texts of energy-model files: one random change each (a value of another type, a key dropped or added),
    plus pathological JSON."""
    import copy
    import random
    rng = random.Random(seed)
    paths = [p for p in _paths(doc) if p]
    for _ in range(n):
        d = copy.deepcopy(doc)
        p = rng.choice(paths)
        parent = d
        for k in p[:-1]:
            parent = parent[k]
        r = rng.random()
        if r < 0.7:
            parent[p[-1]] = copy.deepcopy(rng.choice(_VALUES))
        elif r < 0.85 and isinstance(parent, dict):
            del parent[p[-1]]
        elif isinstance(parent, dict):
            parent[f"extra{rng.randrange(9)}"] = copy.deepcopy(rng.choice(_VALUES))
        yield json.dumps(d)
    text = json.dumps(doc)
    yield "[" * 100000 + "]" * 100000                              # nesting deeper than any parser stack
    yield text[:-1] + ', "deep": ' + "[" * 40 + "]" * 40 + "}"      # deep but parseable
    yield text.replace('"batch_size": 1', '"batch_size": ' + "9" * 5000, 1)   # longer than int conversion allows
    yield text.replace('"batch_size": 1', '"batch_size": 1' + "0" * 50, 1)    # huge batch
    yield text.replace('"e_mac": ', '"e_mac": 1' + "0" * 400 + " + ", 1)    # not JSON
    yield text.replace('"e_call": 1.5e-06', '"e_call": 1e999', 1)            # infinity spelled as a number
    yield text.replace('"e_call": 1.5e-06', '"e_call": 12345678901234567890123', 1)
    yield text[:-1] + ', "pad": "' + "x" * (5 << 20) + '"}'         # over the size bound
    yield text[: len(text) // 2]                                   # truncated
    yield "\ufeff" + text                                          # a byte-order mark


def _use(est: EnergyEstimator) -> None:
    from dl_energy_estimator.cli import format_report
    format_report(est)
    est.sha256()
    assert est.model_energy(Net(4, 1), (est.batch_size if est.batch_size < 64 else 1, 3, 8, 8)) >= 0


def test_mutated_energy_model_files_load_or_raise_one_clean_error(tmp_path):
    doc = _fitted_doc()
    p = tmp_path / "m.json"
    outcomes = {"ok": 0, "error": 0}
    for text in _mutations(doc, 300, seed=0):
        p.write_text(text, encoding="utf-8")
        try:
            est = EnergyEstimator.load(p)
        except EnergyModelError as e:
            msg = str(e)
            assert msg.startswith(str(p)) and "\n" not in msg and len(msg) < 400, msg
            outcomes["error"] += 1
            continue
        _use(est)
        outcomes["ok"] += 1
    assert outcomes["ok"] > 20 and outcomes["error"] > 100, outcomes


@pytest.mark.slow
def test_mutated_energy_model_files_through_train_report(tmp_path):
    """The project's CLI on a sample of the mutations: exit 0, or exit 2 with one line; never a traceback."""
    texts = list(_mutations(_fitted_doc(), 6, seed=1))
    for i in (0, 1, 2, 3, 4, 5, 6, 8, 9, 13):
        p = tmp_path / f"m{i}.json"
        p.write_text(texts[i], encoding="utf-8")
        res = subprocess.run([sys.executable, "train.py", "--arch", "DARTS_V2", "--dataset", "digits",
                              "--init_channels", "4", "--layers", "2", "--report", "--energy_model", str(p)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=ROOT))
        assert res.returncode in (0, 2) and "Traceback" not in res.stderr, (i, res.stderr[-2000:])
        if res.returncode == 2:
            assert len(res.stderr.strip().splitlines()[-1]) < 400 and "error:" in res.stderr
