"""--amp done right (bf16 autocast exists on the CPU): the unrolled step stays fp32, energies do not move, each
forward opens its own autocast (so the weights it sees are the current ones), and every op the supernet builds is
priced, whichever way it is written; end to end, --amp training and search land within a few points of fp32."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import operations
from architect import Architect
from plumbing.cliargs import CLIError
from conftest import run_script
from dl_energy_estimator import EnergyEstimator
from model_search import Network

PRIMS = ["none", "skip_connect", "sep_conv_3x3", "max_pool_3x3"]


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def supernet(primitives=PRIMS, seed=0):
    torch.manual_seed(seed)
    return Network(4, 10, 3, primitives, 1, EnergyEstimator.default())


def batches():
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    return x, torch.randint(0, 10, (16,), generator=g), xv, torch.randint(0, 10, (16,), generator=g)


def alpha_grads(autocast, outer=None):
    net = supernet()
    opt = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    arch = Architect(net, arch_learning_rate=3e-3, arch_weight_decay=1e-3, momentum=0.9, weight_decay=3e-4,
                     task_weight=0.9, energy_weight=0.05, unrolled=True, autocast=autocast)
    with outer() if outer else torch.enable_grad():
        arch.step(*batches(), 0.1, opt)
    return torch.cat([a.grad.flatten() for a in net.arch_parameters()])


def test_unrolled_alpha_gradient_under_amp_is_the_fp32_one():
    """The finite-difference Hessian-vector product runs with autocast off, even inside a caller's bf16 region."""
    ref = alpha_grads(lambda: torch.enable_grad())
    for outer in (None, bf16):
        amp = alpha_grads(bf16, outer)
        assert F.cosine_similarity(amp, ref, dim=0) >= 0.99


def test_first_order_step_runs_its_forward_under_amp():
    net = supernet()
    seen = []
    net.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    arch = Architect(net, arch_learning_rate=3e-3, unrolled=False, autocast=bf16)
    arch.step(*batches(), 0.1)
    assert seen == [torch.bfloat16] and all(a.grad.dtype == torch.float32 for a in net.arch_parameters())


def energies(net):
    return [op.energy for m in net.mixed_ops() for op in m._ops], net.energy_bounds()


def test_energies_identical_with_and_without_amp():
    x = batches()[0]
    ref, amp = supernet(), supernet()
    ref(x)
    with bf16():
        _, e_amp = amp(x)
    assert energies(amp) == energies(ref) and energies(ref)[1][1] > 0
    from model import network_report
    from plumbing.datasets import DataInfo
    import genotypes as G
    from model import NetworkCIFAR
    info = DataInfo(1, 10, 8)
    plain = network_report(NetworkCIFAR(8, 10, 3, False, G.DARTS_V2, 1, 8).eval(), EnergyEstimator.default(),
                           info).energy_mj
    with bf16():
        mixed = network_report(NetworkCIFAR(8, 10, 3, False, G.DARTS_V2, 1, 8).eval(),
                               EnergyEstimator.default(), info).energy_mj
    assert mixed == plain


def test_autocast_per_step_trains_where_one_context_per_epoch_does_not():
    """Why autocast wraps each forward: inside one long context every forward reuses the first step's bf16 weights."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 20), torch.randint(0, 2, (64,))

    def train(per_step):
        torch.manual_seed(0)
        net = nn.Linear(20, 2)
        opt = torch.optim.SGD(net.parameters(), 0.5)
        first = F.cross_entropy(net(x), y).item()
        seen = []
        ctx = bf16() if not per_step else torch.enable_grad()
        with ctx:
            for _ in range(20):
                with bf16() if per_step else torch.enable_grad():
                    loss = F.cross_entropy(net(x), y)
                seen.append(loss.item())
                opt.zero_grad()
                loss.backward()
                opt.step()
        return first, seen
    first, per_step = train(True)
    _, per_epoch = train(False)
    assert per_step[-1] < 0.8 * first
    assert max(per_epoch) - min(per_epoch) < 1e-6  # the cached copy never changes: nothing is learned


@pytest.mark.parametrize("choice, device, deterministic", [("auto", "cpu", True), ("auto", "cuda", False),
                                                           ("on", "cuda", True), ("off", "cpu", False)])
def test_deterministic_is_on_for_cpu_runs_and_off_on_cuda(choice, device, deterministic):
    from plumbing import utils
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    try:
        assert utils.set_deterministic(choice, torch.device(device)) is deterministic
        assert cudnn.deterministic is deterministic and cudnn.benchmark is not deterministic
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


# ------------------------------------------------------------------------------------------- new ops priced

class OverridesForward(operations.EnergyOp):
    """An op written the other way: forward() instead of compute()."""

    def __init__(self, C, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, stride, padding=1, bias=False)

    def forward(self, x):
        return self.conv(F.relu(x))


class PlainOp(nn.Module):
    def __init__(self, C, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, stride, padding=1, bias=False)

    def forward(self, x):
        return self.conv(F.relu(x))


@pytest.fixture
def new_ops(monkeypatch):
    monkeypatch.setitem(operations.OPS, "my_forward", lambda C, stride, affine: OverridesForward(C, stride))
    monkeypatch.setitem(operations.OPS, "my_plain", lambda C, stride, affine: PlainOp(C, stride))
    monkeypatch.setitem(operations.OPS, "my_broken", lambda C, stride: PlainOp(C))
    monkeypatch.setitem(operations.OPS, "my_nothing", lambda C, stride, affine: None)


@pytest.mark.parametrize("partial_channels", [1, 2])
def test_new_ops_are_priced_however_written(new_ops, partial_channels):
    torch.manual_seed(0)
    net = Network(4, 10, 2, ["none", "my_forward", "my_plain", "skip_connect"], 1, EnergyEstimator.default(),
                  partial_channels=partial_channels)
    net(batches()[0])
    est = EnergyEstimator.default()
    for m in net.mixed_ops():
        forward_op, plain = m._ops[1], m._ops[2]
        assert isinstance(plain, operations.Priced) and plain.energy_flag == 1
        C = plain.in_channels * partial_channels
        expected = est.op_energy(PlainOp(C, m.stride), (1, C, *plain._energy_shape[1:]))
        assert forward_op.energy == pytest.approx(expected, rel=1e-12) and plain.energy == forward_op.energy > 0


@pytest.mark.parametrize("name, words", [("my_broken", "factory(C, stride, affine)"), ("my_nothing", "NoneType")])
def test_an_op_that_cannot_be_built_is_one_line_naming_it(new_ops, name, words):
    with pytest.raises(CLIError) as e:
        Network(4, 10, 2, ["none", name], 1, EnergyEstimator.default())
    assert name in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ end to end

def final(run, name="metrics.jsonl"):
    return [json.loads(line) for line in (run / name).read_text().splitlines()][-1]


@pytest.mark.slow
def test_amp_training_and_search_match_fp32(tmp_path):
    """Same seed, digits: --amp lands within a few points of fp32 (it used to end at 10 %, a uniform guess), and the
    energies do not move with --amp (the estimates are traced in fp32). Measured here: train 97.78 % fp32, 96.39 %
    --amp; search valid 93.60 % fp32, 91.10 % --amp."""
    import subprocess
    import sys
    from conftest import ROOT
    train = ["train.py", "--dataset", "digits", "--arch", "DARTS_V2", "--layers", "4", "--init_channels", "8",
             "--epochs", "3", "--wandb", "disabled", "--log_dir", str(tmp_path)]
    search = ["train_search.py", "--dataset", "digits", "--layers", "3", "--init_channels", "4", "--epochs", "3",
              "--primitives", "none,max_pool_3x3,skip_connect,sep_conv_3x3", "--eval_channels", "8",
              "--eval_layers", "3", "--wandb", "disabled", "--log_dir", str(tmp_path)]
    procs = {name: subprocess.Popen([sys.executable, *cmd, "--run_name", name] + (["--amp"] if "amp" in name else []),
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    env=dict(__import__("os").environ, OMP_NUM_THREADS="1"))
             for name, cmd in (("t", train), ("t_amp", train), ("s", search), ("s_amp", search))}
    for name, p in procs.items():
        assert p.wait(timeout=900) == 0, (name, p.stderr.read()[-2000:])
    t, t_amp = (final(tmp_path / n) for n in ("t", "t_amp"))
    assert t["test_acc"] > 85 and abs(t_amp["test_acc"] - t["test_acc"]) <= 5, (t, t_amp)
    s, s_amp = (final(tmp_path / n) for n in ("s", "s_amp"))
    assert s["valid_acc"] > 80 and abs(s_amp["valid_acc"] - s["valid_acc"]) <= 6, (s, s_amp)
    summary = [json.loads((tmp_path / n / "summary.json").read_text())["energy_mj"] for n in ("t", "t_amp")]
    assert summary[0] == summary[1]
    # E(alpha) differs only through the (slightly different) alphas; E_max, E_min and pricing are the same.
    assert math.isclose(s_amp["expected_energy_mj"], s["expected_energy_mj"], rel_tol=0.05)
