"""The final network: fidelity to DARTS's parameter counts, drop path, auxiliary head, cutout, the digits split
and the energy report (small real tensors; no subprocesses)."""
import numpy as np
import pytest
import torch

import genotypes as G
from plumbing.datasets import DIGITS_TEST_FRACTION, Cutout, DataInfo, load_dataset
from dl_energy_estimator import EnergyEstimator
from model import AuxiliaryHead, NetworkCIFAR, NetworkImageNet, build_network, drop_path, network_report
from plumbing.utils import count_params


@pytest.mark.parametrize("name, expected", [("DARTS_V2", 3_349_342), ("DARTS_V1", 3_169_414),
                                            ("PC_DARTS", 3_634_678)])
def test_cifar_parameter_counts_match_the_papers(name, expected):
    net = NetworkCIFAR(36, 10, 20, True, G.named_genotype(name))
    assert count_params(net) == expected  # without the auxiliary head, as DARTS counts
    assert sum(p.numel() for p in net.parameters()) > expected  # the head exists, it is only left out


def test_imagenet_parameter_count_matches_the_paper():
    net = NetworkImageNet(48, 1000, 14, True, G.DARTS_V2)
    assert count_params(net) == 4_718_752


def test_drop_path_train_zeroes_whole_samples_and_rescales():
    torch.manual_seed(0)
    x = torch.rand(400, 3, 4, 4) + 0.5  # strictly positive: a zero can only come from the mask
    y = drop_path(x, 0.3)
    flat = y.flatten(1)
    dropped = (flat == 0).all(1)
    kept = (flat != 0).all(1)
    assert bool((dropped | kept).all())  # whole samples, never parts of one
    assert 0.2 < dropped.float().mean().item() < 0.4
    assert torch.allclose(y[kept], x[kept] / 0.7)
    assert drop_path(x, 0.0) is x


def test_drop_path_is_used_in_training_only():
    torch.manual_seed(0)
    net = build_network(G.DARTS_V2, 4, 10, 3, in_channels=1, image_size=8)
    net.drop_path_prob = 0.5
    x = torch.randn(6, 1, 8, 8)
    net.eval()
    a, b = net(x)[0], net(x)[0]
    assert torch.equal(a, b)  # eval: identity, deterministic
    net.train()
    torch.manual_seed(1)
    c = net(x)[0]
    torch.manual_seed(2)
    d = net(x)[0]
    assert not torch.allclose(c, d)  # train: random paths dropped


@pytest.mark.parametrize("in_ch, size, feat", [(3, 32, 8), (1, 8, 2), (1, 28, 7)])
def test_auxiliary_head_shapes_and_training_only(in_ch, size, feat):
    torch.manual_seed(0)
    net = build_network(G.DARTS_V2, 4, 7, 3, auxiliary=True, in_channels=in_ch, image_size=size)
    x = torch.randn(2, in_ch, size, size)
    net.train()
    logits, aux = net(x)
    assert logits.shape == (2, 7) and aux is not None and aux.shape == (2, 7)
    net.eval()
    logits, aux = net(x)
    assert logits.shape == (2, 7) and aux is None
    head = AuxiliaryHead(16, 5, feat)
    assert head(torch.randn(3, 16, feat, feat)).shape == (3, 5)


def test_auxiliary_head_is_optional():
    net = build_network(G.DARTS_V2, 4, 10, 3, auxiliary=False, in_channels=1, image_size=8).train()
    assert net(torch.randn(2, 1, 8, 8))[1] is None and net.auxiliary_head is None


@pytest.mark.parametrize("size, length", [(8, 3), (32, 16), (8, 20)])
def test_cutout_zeroes_one_square_within_bounds(size, length):
    np.random.seed(0)
    cut = Cutout(length)
    img = torch.rand(2, size, size) + 0.5
    for _ in range(30):
        out = cut(img)
        assert out.shape == img.shape and torch.all(img > 0)  # input untouched
        zero = out[0] == 0
        assert torch.equal(zero, out[1] == 0)  # the same square in every channel
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        if len(rows):
            h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
            assert h <= min(length, size) and w <= min(length, size)  # sized to the image
            assert int(zero.sum()) == h * w  # one solid rectangle
        assert torch.equal(out[out != 0], img[out != 0])


def test_digits_split_is_disjoint_and_sized():
    train, info = load_dataset("digits", "./data", train=True)
    test, _ = load_dataset("digits", "./data", train=False)
    assert info == DataInfo(1, 10, 8) and DIGITS_TEST_FRACTION == 0.2
    assert (len(train), len(test)) == (1437, 360)
    tr = {bytes(x.numpy().tobytes()) for x, _ in train}
    te = {bytes(x.numpy().tobytes()) for x, _ in test}
    # digits holds a few duplicate images; the split separates samples, so allow only those
    assert len(tr & te) <= 5
    assert len(te) >= 355


def test_search_sees_only_the_training_split():
    from types import SimpleNamespace

    from plumbing.datasets import search_loaders
    train, _ = load_dataset("digits", "./data", train=True)
    args = SimpleNamespace(train_portion=0.5, batch_size=64, workers=0)
    a, b = search_loaders(train, args, torch.device("cpu"))
    seen = list(a.sampler.indices) + list(b.sampler.indices)
    assert sorted(seen) == list(range(1437))  # indices into the training split only, each once
    assert not set(a.sampler.indices) & set(b.sampler.indices)


def test_report_energy_is_model_energy_of_the_built_model():
    est = EnergyEstimator.default()
    info = DataInfo(1, 10, 8)
    net = build_network(G.DARTS_V2, 8, 10, 5, in_channels=1, image_size=8).eval()
    rep = network_report(net, est, info)
    assert rep.energy_mj == 1e3 * est.model_energy(net, (1, 1, 8, 8))
    assert rep.params == count_params(net) and rep.macs == est.count_macs(net, (1, 1, 8, 8))
    assert sum(r["energy_mj"] for r in rep.breakdown) == pytest.approx(rep.energy_mj, rel=1e-9)
    assert set(rep.to_dict()) == {"params", "macs", "energy_mj", "breakdown"}
    assert {"name", "type", "macs", "bytes", "energy_mj"} <= set(rep.breakdown[0])


def _uniform(op_normal, op_reduce):
    pairs = lambda op: [(op, 0), (op, 1), (op, 0), (op, 1), (op, 0), (op, 1), (op, 0), (op, 1)]  # noqa: E731
    return G.Genotype(pairs(op_normal), [2, 3, 4, 5], pairs(op_reduce), [2, 3, 4, 5])


def test_expensive_ops_report_more_energy():
    est, info = EnergyEstimator.default(), DataInfo(3, 10, 32)
    cheap = network_report(build_network(_uniform("skip_connect", "max_pool_3x3"), 8, 10, 5).eval(), est, info)
    dear = network_report(build_network(_uniform("sep_conv_5x5", "sep_conv_5x5"), 8, 10, 5).eval(), est, info)
    assert dear.energy_mj > 1.5 * cheap.energy_mj and dear.macs > cheap.macs
