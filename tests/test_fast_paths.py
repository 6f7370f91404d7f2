"""Fast paths equal the plain (DARTS) computation: weights-only and alphas-only gradients, skipped `none`,
partial channels' shapes, and bf16 autocast within a stated tolerance."""
import copy

import torch
import torch.nn.functional as F

from architect import Architect
from dl_energy_estimator import EnergyEstimator
from model_search import Network
from train_search import weight_step

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
    Architect(fast, 0.01).step(x, y, x, y, 0.1)
    arch_p = Architect(plain, 0.01)
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
            arch = Architect(net, 0.01, unrolled=unrolled)
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


def test_channels_last_layers_equal_the_default_layout():
    """Depthwise convs and max pools run in channels_last on the CPU: same outputs and gradients."""
    from operations import ChannelsLastOnCPU
    results = []
    for fast in (True, False):
        ChannelsLastOnCPU.fast_layout = fast
        try:
            net, x, y = make()
            logits, energy = net(x)
            loss = F.cross_entropy(logits, y) + energy
            grads = torch.autograd.grad(loss, list(net.parameters()))
            results.append((logits.detach(), grads))
        finally:
            ChannelsLastOnCPU.fast_layout = True
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
