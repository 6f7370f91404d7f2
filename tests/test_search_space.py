"""Ops, MixedOp energy, the architect's gradients, derivation and genotype files (small real tensors)."""
import math

import pytest
import torch
import torch.nn.functional as F

import genotypes as G
from architect import Architect
from dl_energy_estimator import EnergyEstimator
from derivation import derive
from model_search import MixedOp, Network
from operations import OPS, attach_estimator

SMALL = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"]


class CountingEstimator:
    """The real analytical estimator, counting how often ops ask it."""

    def __init__(self):
        self.inner = EnergyEstimator.default()
        self.batch_size = 1
        self.calls = []

    def op_energy(self, module, shape):
        self.calls.append((type(module).__name__, tuple(shape)))
        return self.inner.op_energy(module, shape)


def tiny_network(primitives=SMALL, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    net = Network(4, 3, 3, primitives, in_channels=1, estimator=EnergyEstimator.default(), **kw).to(dtype)
    x = torch.randn(4, 1, 8, 8, dtype=dtype)
    y = torch.tensor([0, 1, 2, 1])
    return net, x, y


def test_op_energy_estimated_once_and_reused_per_shape():
    est = CountingEstimator()
    op = OPS["sep_conv_3x3"](8, 1, False)
    attach_estimator(op, est)
    assert op.energy == 0.0 and op.energy_flag == 0
    op(torch.randn(2, 8, 6, 6))
    assert op.energy_flag == 1 and op.energy > 0
    first = op.energy
    op(torch.randn(5, 8, 6, 6))  # another batch size: same per-sample shape, no new estimate
    op(torch.randn(2, 8, 6, 6))
    assert len(est.calls) == 1 and est.calls[0][1] == (1, 8, 6, 6)  # estimated at the deployment batch
    op(torch.randn(2, 8, 12, 12))  # a new per-sample shape is estimated again
    assert len(est.calls) == 2 and op.energy > first


def test_every_op_runs_and_keeps_shapes():
    x = torch.randn(2, 8, 7, 7)  # odd size: the stride-2 ops must agree on ceil(7 / 2)
    for name, make in OPS.items():
        for stride in (1, 2):
            y = make(8, stride, True)(x)
            assert y.shape == (2, 8, 4 if stride == 2 else 7, 4 if stride == 2 else 7), name


def test_mixed_op_expected_energy_is_softmax_over_derivable_ops():
    op = MixedOp(8, 1, SMALL)
    attach_estimator(op, EnergyEstimator.default())
    alphas = torch.randn(len(SMALL))
    w = F.softmax(alphas, -1)
    ew = F.softmax(alphas[1:], -1)  # `none` is index 0
    _, energy = op(torch.randn(2, 8, 6, 6), w, ew)
    energies = [op._ops[i].energy for i in range(1, len(SMALL))]
    assert all(e > 0 for e in energies)
    expected = sum(p * e for p, e in zip(ew.tolist(), energies))
    assert energy.item() == pytest.approx(expected, rel=1e-6)
    # `none` does not lower the expected energy: inflating its alpha changes nothing.
    alphas2 = alphas.clone()
    alphas2[0] += 10.0
    _, energy2 = op(torch.randn(2, 8, 6, 6), F.softmax(alphas2, -1), F.softmax(alphas2[1:], -1))
    assert energy2.item() == pytest.approx(expected, rel=1e-6)


def test_skipping_none_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    fast, slow = MixedOp(8, 2, SMALL, skip_none=True), MixedOp(8, 2, SMALL, skip_none=False)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8, 6, 6)
    outs = []
    for op in (fast, slow):
        a = torch.randn(len(SMALL), generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, _ = op(x, F.softmax(a, -1), F.softmax(a[1:], -1))
        (y ** 2).sum().backward()
        outs.append((y.detach(), a.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_energy_bounds_and_normalization_span_zero_to_one():
    net, x, y = tiny_network()
    net(x)
    lo, hi = net.energy_bounds()
    assert 0 < lo < hi
    arch = Architect(net, task_weight=0.0, energy_weight=1.0)
    derivable = [i for i, p in enumerate(SMALL) if p != "none"]
    for pick, target in ((min, 0.0), (max, 1.0)):
        with torch.no_grad():
            for alphas, reduction in ((net.alphas_normal, False), (net.alphas_reduce, True)):
                alphas.fill_(-50.0)
                cell = next(c for c in net.cells if c.reduction == reduction)
                for e, mixed in enumerate(cell._ops):
                    energies = [mixed._ops[i].energy for i in derivable]
                    alphas[e, derivable[energies.index(pick(energies))]] = 50.0
        _, energy = net(x)
        # cells of one kind share alphas; pick per kind matches per-edge extremes when widths agree per kind
        assert arch.normalized_energy(energy).item() == pytest.approx(target, abs=0.02)


def test_energy_gradient_on_alphas_matches_finite_differences():
    net, x, _ = tiny_network(dtype=torch.float64)
    arch = Architect(net, task_weight=0.0, energy_weight=1.0)

    def energy_n():
        _, e = net(x)
        return arch.normalized_energy(e)

    g = torch.autograd.grad(energy_n(), net.alphas_normal)[0]
    h = 1e-6
    for idx in [(0, 1), (3, 3), (7, 4), (13, 2), (2, 0)]:
        with torch.no_grad():
            net.alphas_normal[idx] += h
        up = energy_n().item()
        with torch.no_grad():
            net.alphas_normal[idx] -= 2 * h
        down = energy_n().item()
        with torch.no_grad():
            net.alphas_normal[idx] += h
        assert g[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
    assert g[:, 0].abs().max().item() < 1e-12  # `none` never changes the energy


def test_hessian_vector_product_matches_double_backward():
    net, x, y = tiny_network(primitives=["none", "skip_connect", "sep_conv_3x3", "avg_pool_3x3"],
                             dtype=torch.float64)
    net.eval()  # fixed BatchNorm statistics: the loss is a smooth function of the weights
    arch = Architect(net)
    weights = [p for _, p in arch._weights()]
    gen = torch.Generator().manual_seed(3)
    vector = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in weights]
    logits, _ = net(x)
    gw = torch.autograd.grad(F.cross_entropy(logits, y), weights, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(gw, vector))
    exact = torch.autograd.grad(dot, net.arch_parameters())
    approx = arch.hessian_vector_product(vector, x, y, r=1e-4)
    for e, a in zip(exact, approx):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-7)
    # the weights are restored after the finite differences
    for p, p0 in zip(weights, [p.detach().clone() for p in weights]):
        torch.testing.assert_close(p, p0)


@pytest.mark.parametrize("unrolled", [False, True])
def test_architect_step_on_energy_alone_lowers_expected_energy(unrolled):
    net, x, y = tiny_network()
    arch = Architect(net, arch_learning_rate=0.05, task_weight=0.0, energy_weight=1.0, unrolled=unrolled)
    opt = torch.optim.SGD(net.weight_parameters(), 0.01, momentum=0.9)
    before = net(x)[1].item()
    for _ in range(5):
        arch.step(x, y, x, y, eta=0.01, network_optimizer=opt)
    after = net(x)[1].item()
    assert after < before * 0.97


def test_unrolled_step_uses_the_same_objective_as_first_order_at_eta_zero():
    net, x, y = tiny_network(dtype=torch.float64)
    net.eval()
    a1 = Architect(net, unrolled=False, arch_learning_rate=1e-3)
    a1.optimizer.zero_grad()
    loss = a1.objective(*net(x), y)
    g1 = torch.autograd.grad(loss, net.arch_parameters())
    a2 = Architect(net, unrolled=True, weight_decay=0.0)
    _, g2 = a2._unrolled_gradients(x, y, x, y, 0.0, None)
    for g, g_unrolled in zip(g1, g2):
        torch.testing.assert_close(g_unrolled, g)


def test_derivation_follows_darts_rules():
    prims = G.PRIMITIVE_SETS["darts"]
    k = prims.index
    w = torch.full((14, len(prims)), 0.01)
    # node 0 (edges 0,1): `none` is largest on edge 0 but never chosen; strength ignores `none`
    w[0, k("none")] = 0.9
    w[0, k("sep_conv_3x3")] = 0.3
    w[1, k("max_pool_3x3")] = 0.5
    # node 1 (edges 2,3,4): edges 4 and 2 strongest
    w[2, k("dil_conv_5x5")] = 0.4
    w[3, k("skip_connect")] = 0.1
    w[4, k("sep_conv_5x5")] = 0.6
    # node 2 (edges 5..8), node 3 (edges 9..13)
    w[5, k("avg_pool_3x3")] = 0.7
    w[8, k("skip_connect")] = 0.8
    w[9, k("dil_conv_3x3")] = 0.2
    w[13, k("sep_conv_3x3")] = 0.25
    w[11, k("none")] = 0.99  # a strong `none` edge is not a strong edge
    gene = derive(w.tolist(), prims, 4)
    assert gene == [("max_pool_3x3", 1), ("sep_conv_3x3", 0),
                    ("sep_conv_5x5", 2), ("dil_conv_5x5", 0),
                    ("skip_connect", 3), ("avg_pool_3x3", 0),
                    ("sep_conv_3x3", 4), ("dil_conv_3x3", 0)]
    assert all(op != "none" for op, _ in gene)


def test_network_genotype_and_new_model_share_alphas():
    net, x, _ = tiny_network()
    with torch.no_grad():
        net.alphas_normal.normal_()
    twin = net.new_model()
    assert twin is not net
    for a, b in zip(twin.arch_parameters(), net.arch_parameters()):
        torch.testing.assert_close(a, b)
    assert twin.genotype() == net.genotype()
    assert not torch.equal(twin.stem[0].weight, net.stem[0].weight)  # fresh weights


def test_partial_channels_price_ops_at_full_width():
    full, x, _ = tiny_network()
    pc, _, _ = tiny_network(partial_channels=2)
    full(x)
    logits, energy = pc(x)
    assert logits.shape == (4, 3)
    assert pc.energy_bounds() == pytest.approx(full.energy_bounds(), rel=1e-9)
    assert len(pc.arch_parameters()) == 4  # alphas and PC-DARTS's edge betas


def test_genotype_json_round_trip_and_validation(tmp_path):
    path = tmp_path / "g.json"
    G.save(G.DARTS_V2, str(path), G.PRIMITIVES, {"dataset": "digits", "energy_mj": 1.5})
    assert G.load(str(path)) == G.validate(G.DARTS_V2)
    assert G.load_meta(str(path))["energy_mj"] == 1.5
    bad = path.read_text().replace("sep_conv_3x3", "sep_conv_9x9", 1)
    path.write_text(bad)
    with pytest.raises(G.GenotypeError, match="sep_conv_9x9"):
        G.load(str(path))
    path.write_text(path.read_text().replace("sep_conv_9x9", "sep_conv_3x3").replace('"dil_conv_3x3",\n      2',
                                                                                       '"dil_conv_3x3",\n      7'))
    with pytest.raises(G.GenotypeError, match="out of range"):
        G.load(str(path))
    path.write_text("{not json")
    with pytest.raises(G.GenotypeError, match="not valid JSON"):
        G.load(str(path))


def test_primitive_sets_and_lists_are_validated():
    assert G.parse_primitives("darts") == G.PRIMITIVES
    assert G.parse_primitives("none,skip_connect,sep_conv_3x3") == ["none", "skip_connect", "sep_conv_3x3"]
    with pytest.raises(G.GenotypeError, match="valid ops"):
        G.parse_primitives("none,conv_99")
    assert math.isclose(len(G.PRIMITIVE_SETS["cheap"]), 6)
