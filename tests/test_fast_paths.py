"""Fast paths equal the plain (DARTS) computation: weights-only and alphas-only gradients, skipped `none`,
partial channels' shapes, and bf16 autocast within a stated tolerance."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from architect import Architect
from dl_energy_estimator import EnergyEstimator
from model_search import Network
from train_search import weight_step
from plumbing import utils
from conftest import ROOT

PRIMS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"]


def make(skip_none=True, partial_channels=1):
    torch.manual_seed(0)
    net = Network(4, 10, 3, PRIMS, 1, EnergyEstimator.default(), partial_channels=partial_channels,
                  skip_none=skip_none)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return net, x, y


def test_weight_step_equals_full_backward_step():
    fast, x, y = make()
    plain = copy.deepcopy(fast)
    opt_f = torch.optim.SGD(fast.weight_parameters(), 0.1, momentum=0.9)
    opt_p = torch.optim.SGD(plain.weight_parameters(), 0.1, momentum=0.9)
    weight_step(fast, fast.weight_parameters(), opt_f, x, y, 5.0)
    logits, _ = plain(x)
    F.cross_entropy(logits, y).backward()  # DARTS: every leaf, alphas included
    torch.nn.utils.clip_grad_norm_(plain.weight_parameters(), 5.0)
    opt_p.step()
    for a, b in zip(fast.weight_parameters(), plain.weight_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_order_architect_step_equals_full_backward():
    fast, x, y = make()
    plain = copy.deepcopy(fast)
    Architect(fast, arch_learning_rate=0.01).step(x, y, x, y, 0.1)
    arch_p = Architect(plain, arch_learning_rate=0.01)
    arch_p.objective(*plain(x), y).backward()
    arch_p.optimizer.step()
    for a, b in zip(fast.arch_parameters(), plain.arch_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_skip_none_supernet_equals_plain_supernet():
    fast, x, y = make(skip_none=True)
    plain, _, _ = make(skip_none=False)
    plain.load_state_dict(fast.state_dict())
    lf, ef = fast(x)
    lp, ep = plain(x)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ef, ep)


def test_partial_channels_run_both_orders():
    for k in (2, 4):
        net, x, y = make(partial_channels=k)
        for unrolled in (False, True):
            arch = Architect(net, arch_learning_rate=0.01, unrolled=unrolled)
            opt = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9)
            before = [p.detach().clone() for p in net.arch_parameters()]
            arch.step(x, y, x, y, 0.1, opt)
            assert all(not torch.equal(a, b) for a, b in zip(before, net.arch_parameters()))


def test_bf16_autocast_stays_close_to_fp32():
    """bf16 keeps 8 bits of mantissa: logits agree within 0.1 absolute / 5 % relative on this network."""
    net, x, _ = make()
    net.eval()
    with torch.no_grad():
        ref, e_ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, e_low = net(x)
    torch.testing.assert_close(low.float(), ref, rtol=5e-2, atol=1e-1)
    torch.testing.assert_close(e_low.float(), e_ref.float(), rtol=1e-2, atol=0)


@pytest.mark.parametrize("partial_channels", [1, 2])
def test_channels_last_network_equals_the_default_layout(partial_channels):
    """The whole supernet in channels_last (the CPU default): same logits, energy and gradients as NCHW. In float64,
    so that the two layouts' different summation orders cannot hide a real difference (in float32 they reach ~1e-5
    on some initial weights, through BatchNorm's backward on 8-sample batches)."""
    results = []
    for on in (True, False):
        net, x, y = make(partial_channels=partial_channels)
        net, x = net.double(), x.double()
        net.set_channels_last(on)
        assert net.cells[0]._ops[0]._ops[4].layers[1].weight.is_contiguous(
            memory_format=torch.channels_last if on else torch.contiguous_format)
        logits, energy = net(x)
        loss = F.cross_entropy(logits, y) + energy
        grads = torch.autograd.grad(loss, list(net.parameters()))
        results.append((logits.detach(), grads))
        assert net.new_model().channels_last == on
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channels_last_final_network_equals_the_default_layout():
    import genotypes as G
    from model import build_network
    out = []
    for on in (True, False):
        torch.manual_seed(0)
        net = build_network(G.DARTS_V2, 8, 10, 5, True, 1, 8).set_channels_last(on)
        net.drop_path_prob = 0.0
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        logits, aux = net(x)
        y = torch.arange(4)
        loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        out.append((logits.detach(), grads))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channels_last_modes():
    from plumbing.layout import want_channels_last
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert want_channels_last("auto", cpu) and not want_channels_last("off", cpu)
    assert not want_channels_last("auto", cuda) and want_channels_last("auto", cuda, amp=True)
    assert want_channels_last("on", cuda)
    with pytest.raises(ValueError):
        want_channels_last("sometimes", cpu)


@pytest.mark.slow
def test_compiled_cell_equals_eager():
    """--compile: one cell through torch.compile (inductor) gives the eager cell's output, energy and gradients."""
    net, x, y = make()
    net.trace_energies(x.shape)  # energies estimated (eagerly) first, as in a search
    eager = copy.deepcopy(net)
    net.cells[0].compile(fullgraph=True)
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    results = []
    for model in (net, eager):
        logits, energy = model(x)
        loss = F.cross_entropy(logits, y) + energy
        results.append((logits.detach(), energy.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs  # the cell really went through dynamo
    assert list(net.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        net.alphas_normal.add_(torch.randn_like(net.alphas_normal))
    net(x)
    assert counters["stats"]["unique_graphs"] == graphs  # new alphas are new inputs, not a recompile


@pytest.mark.slow
def test_a_search_cell_is_one_graph():
    """--compile: a cell's forward is one dynamo graph with no break (energies traced first, outside it)."""
    net, x, _ = make()
    net.trace_energies(x.shape)
    w, _, _ = net.arch_weights(False)
    s = net.stem(net.to_layout(x))
    explained = torch._dynamo.explain(net.cells[0])(s, s, w, None)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("unrolled", [False, True])
def test_search_step_reads_nothing_to_the_host(unrolled):
    """A search step (architect + weights, non-finite checks on) dispatches no host sync and copies no host data
    onto the device: losses and checks stay tensors, the energy table is a buffer built once."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from timing import DispatchCount
    net, x, y = make()
    arch = Architect(net, arch_learning_rate=0.01, unrolled=unrolled)
    opt = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9, foreach=True)
    flags = utils.FiniteFlags()

    def step():
        flags.check(arch.step(x, y, x, y, 0.1, opt), "architecture loss")
        weight_step(net, net.weight_parameters(), opt, x, y, 5.0, flags.check)

    step()  # the first step traces the energies and builds the table and the optimizers' state
    with DispatchCount() as count:
        step()
    assert count.ops > 0 and count.syncs == 0 and count.h2d == 0
    assert flags.bad() is None
    flags.check(torch.tensor(float("inf")), "weight gradient")
    assert flags.bad() == ("weight gradient", pytest.approx(float("nan"), nan_ok=True))


def test_energy_table_follows_the_ops_energies():
    """E(alpha) from the table equals the per-edge sum over the MixedOps; a changed op energy rebuilds it."""
    net, x, _ = make()
    _, energy = net(x)
    ew = {k: net.arch_weights(k)[1] for k in (False, True)}
    per_edge = sum(float(op.expected_energy(ew[cell.reduction][i])) for cell in net.cells
                   for i, op in enumerate(cell._ops))
    assert float(energy) == pytest.approx(per_edge, rel=1e-6)
    base = EnergyEstimator.default()

    class Tripled:  # an estimator that prices every op at 3x: the table must follow on the next forward
        batch_size = base.batch_size

        def op_energy(self, module, shape):
            return 3 * base.op_energy(module, shape)

    lo, hi = net.energy_bounds()
    net.set_estimator(Tripled())
    _, energy3 = net(x)
    assert float(energy3) == pytest.approx(3 * float(energy), rel=1e-5)
    assert net.energy_bounds() == pytest.approx((3 * lo, 3 * hi), rel=1e-9)


def test_host_copy_keeps_what_was_started():
    """`HostCopy.get()` returns the values of `start()` as lists, even when the tensors change afterwards (the
    alphas' next step updates them in place); None before any start."""
    copy_ = utils.HostCopy()
    assert copy_.get() is None
    w = torch.tensor([[0.25, 0.75]])
    copy_.start({"normal": w})
    w.add_(1.0)
    assert copy_.get() == {"normal": [[0.25, 0.75]]}
    copy_.start({"normal": w})
    assert copy_.get() == {"normal": [[1.25, 1.75]]}


def test_budget_steps_read_the_alphas_without_a_stall(tmp_path, monkeypatch):
    """With --energy_budget each step prices the cell the alphas derive; it reads them from the copy the last step
    queued (`HostCopy`), not with a read to the host of its own: the model's `derivation_weights()` (the host read)
    then runs at the run's first budget step and at each epoch's end only, and the multiplier's path is the same as
    reading the alphas every step."""
    import json
    import model_search
    import train_search
    flags = ["--dataset", "digits", "--layers", "3", "--init_channels", "4", "--batch_size", "96", "--wandb",
             "disabled", "--primitives", "none,max_pool_3x3,skip_connect,sep_conv_3x3", "--eval_channels", "4",
             "--eval_layers", "3", "--epochs", "2", "--train_portion", "0.5", "--energy_budget", "0.05",
             "--budget_rate", "0.5", "--log_dir", str(tmp_path)]
    reads, real = [], model_search.Network.derivation_weights
    monkeypatch.setattr(model_search.Network, "derivation_weights", lambda self: reads.append(1) or real(self))
    steps = []
    real_update = train_search.BudgetController.update
    monkeypatch.setattr(train_search.BudgetController, "update",
                        lambda self, e: steps.append(e) or real_update(self, e))
    assert train_search.main(flags + ["--run_name", "queued"]) == 0
    queued_reads, queued_energies = len(reads), list(steps)
    lam = [json.loads(line)["budget_lambda"] for line in open(tmp_path / "queued" / "metrics.jsonl")]
    # the same run reading the alphas on every step
    monkeypatch.setattr(utils.HostCopy, "get", lambda self: None)
    reads.clear(), steps.clear()
    assert train_search.main(flags + ["--run_name", "every_step"]) == 0
    assert len(queued_energies) >= 8 and queued_energies == steps
    assert lam == [json.loads(line)["budget_lambda"] for line in open(tmp_path / "every_step" / "metrics.jsonl")]
    per_epoch_end = (len(reads) - len(steps)) / 2  # the reads of derive() at an epoch's end
    assert queued_reads == 1 + 2 * per_epoch_end < len(reads)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_without_the_batch_counter_equals_torchs(momentum):
    """`layout.BatchNorm2d` with a momentum skips `num_batches_tracked.add_(1)` (read only by the cumulative
    average): outputs, gradients and running statistics equal torch's BatchNorm2d, the counter stays at 0; with
    `momentum=None` it counts, as torch's does."""
    from plumbing.layout import BatchNorm2d
    ours, theirs = BatchNorm2d(6, momentum=momentum), torch.nn.BatchNorm2d(6, momentum=momentum)
    theirs.load_state_dict(ours.state_dict())
    for seed in range(3):
        x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        a, b = ours(x), theirs(x)
        assert torch.equal(a, b)
        assert torch.equal(*(torch.autograd.grad(o.square().sum(), x)[0] for o in (a, b)))
    assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == (0 if momentum else 3) and int(theirs.num_batches_tracked) == 3
    assert set(ours.state_dict()) == set(theirs.state_dict())
