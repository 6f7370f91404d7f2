"""The NAS-Bench-201 space: sizes as NB201 counts them, arch strings and genotype.json, the supernet's energy
contract, derivation and guards, the additive cost table and budget projection, benchmark tables and plots."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from nb201 import benchmark
from nb201 import space as nb201
from nb201 import pricing as ne
import spaces
from architect import Architect
from plumbing.cliargs import CLIError
from plumbing.datasets import DataInfo
from dl_energy_estimator import EnergyEstimator
from derivation import CollapseStopper
from plumbing.utils import count_params

BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
MIXED = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
DIGITS = DataInfo(1, 10, 8)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared CPU their barriers stall: one thread, restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def tiny_supernet(primitives=nb201.PRIMITIVES, seed=0, **kw):
    torch.manual_seed(seed)
    net = nb201.Supernet(4, 10, 1, primitives, in_channels=1, estimator=EnergyEstimator.default(), **kw)
    return net, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])


def set_alphas(net, winners, high=5.0):
    """Alphas where edge e's op `winners[e]` dominates."""
    with torch.no_grad():
        net.alphas.zero_()
        for e, op in enumerate(winners):
            net.alphas[e, net.primitives.index(op)] = high


# ------------------------------------------------------------------------------------------------------ sizes
def test_all_conv_cell_has_nb201s_size_on_cifar10():
    net = nb201.NB201Network(BEST).eval()
    assert count_params(net) == 1_531_546
    macs = EnergyEstimator.default().count_macs(net, (1, 3, 32, 32))
    assert round(macs / 1e6, 2) == 220.12
    assert len(net.cells) == 3 * 5 + 2 and sum(c.reduction for c in net.cells) == 2


def test_final_network_forward_and_attributes():
    net = nb201.energy_network(MIXED, 1, 7, channels=4, layers=1)
    net.drop_path_prob = 0.3  # accepted, no effect
    logits, aux = net(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 7) and aux is None
    net.set_channels_last(True)
    assert net(torch.randn(2, 1, 8, 8))[0].shape == (2, 7)
    seam = spaces.energy_network("nb201", MIXED, (1, 3, 32, 32))
    assert count_params(seam) == count_params(nb201.NB201Network(MIXED))


def test_none_edges_run_nothing_and_a_cut_off_cell_outputs_zeros():
    net = nb201.NB201Network("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", 4, 1, 10, 1).eval()
    cell = net.cells[0]
    assert torch.equal(cell(torch.randn(2, 4, 8, 8)), torch.zeros(2, 4, 8, 8))


# ----------------------------------------------------------------------------------------------- arch strings
def test_arch_strings_round_trip_and_normalize():
    for text in (BEST, MIXED, "|none~0|+|skip_connect~0|avg_pool_3x3~1|+|nor_conv_1x1~0|none~1|none~2|"):
        ops = nb201.parse_arch(text)
        assert len(ops) == 6 and nb201.format_arch(ops) == text
    shuffled = "  |nor_conv_3x3~0|+|avg_pool_3x3~1|nor_conv_3x3~0|+|skip_connect~2|nor_conv_3x3~1|skip_connect~0|\n"
    assert nb201.format_arch(shuffled) == MIXED
    assert nb201.pairs(MIXED)[2] == ("avg_pool_3x3", 1)


@pytest.mark.parametrize("bad", [
    "|conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|",            # op outside NB201
    "|none~1|+|none~0|none~1|+|none~0|none~1|none~2|",                # input not earlier
    "|none~0|+|none~0|none~1|",                                       # too few nodes
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|+|none~0|",       # too many nodes
    "|none~0|+|none~0|none~0|+|none~0|none~1|none~2|",                # an input twice
    "|none~0|+|none~0|+|none~0|none~1|none~2|",                       # an input missing
    "|none~0|x+|none~0|none~1|+|none~0|none~1|none~2|",               # stray character
    "|none~0||+|none~0|none~1|+|none~0|none~1|none~2|",               # empty item
    "|none-0|+|none~0|none~1|+|none~0|none~1|none~2|",                # no '~'
    "|none~00|+|none~0|none~1|+|none~0|none~1|none~2|",               # not the index as written
    "|none~0|+|none~0|none ~1|+|none~0|none~1|none~2|",               # blank inside
    "", 42,
])
def test_malformed_arch_strings_are_one_clear_error(bad):
    with pytest.raises(CLIError) as e:
        nb201.parse_arch(bad)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


# ---------------------------------------------------------------------------------------------- genotype.json
def test_genotype_json_round_trip(tmp_path):
    path = str(tmp_path / "genotype.json")
    nb201.save(MIXED, path, nb201.PRIMITIVES, {"dataset": "digits", "energy_mj": 0.25})
    data = json.load(open(path))
    assert data["space"] == "nb201" and data["format"] == 1 and data["arch"] == MIXED
    arch, meta = nb201.load(path)
    assert nb201.format_arch(arch) == MIXED and meta["energy_mj"] == 0.25
    assert nb201.resolve(path) == (arch, meta)
    assert nb201.resolve(MIXED) == (arch, {})
    with pytest.raises(CLIError, match="neither"):
        nb201.resolve(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("change, message", [
    ({"format": 2}, "format"), ({"format": True}, "format"), ({"space": "darts"}, "space"),
    ({"arch": 7}, "arch"), ({"arch": "|x~0|"}, "node"), ({"primitives": "none"}, "primitives"),
    ({"primitives": ["none", "sep_conv_3x3"]}, "primitives"), ({"primitives": ["none", "skip_connect"]}, "not among"),
    ({"meta": []}, "meta"),
])
def test_genotype_from_dict_checks_types(change, message):
    data = {**nb201.to_dict(MIXED, nb201.PRIMITIVES), **change}
    with pytest.raises(CLIError, match=message):
        nb201.from_dict(data)
    with pytest.raises(CLIError):
        nb201.from_dict([MIXED])


# ---------------------------------------------------------------------------------------------------- supernet
def test_supernet_energy_in_bounds_cached_and_differentiable():
    net, x, _ = tiny_supernet()
    logits, energy = net(x)
    assert logits.shape == (4, 10)
    lo, hi = net.energy_bounds()
    assert lo == 0.0 < hi and lo <= energy.item() <= hi  # `none` is derivable: every edge's cheapest op is 0 J
    for mixed in net.mixed_ops():
        for op, name in ((mixed._ops[i], mixed.primitives[i]) for i in mixed.derivable):
            if name != "none":
                assert op.energy_flag == 1 and op.energy > 0
    w = F.softmax(net.alphas, -1).detach().double()
    expected = sum(float(w[k % 6] @ mixed.op_energies()) for k, mixed in enumerate(net.mixed_ops()))
    assert energy.item() == pytest.approx(expected, rel=1e-5)  # every op, `none` at 0 J, under the shared alphas
    grad = torch.autograd.grad(energy, net.alphas)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (grad[:, 0] < 0).all()  # more weight on `none` (0 J) lowers the expected energy


def test_supernet_energy_reaches_both_bounds():
    net, x, _ = tiny_supernet()
    net(x)
    lo, hi = net.energy_bounds()
    arch = Architect(net, task_weight=0.0, energy_weight=1.0)
    mixed = list(net.mixed_ops())[0]
    energies = mixed.op_energies().tolist()
    for pick, target in ((min, 0.0), (max, 1.0)):
        set_alphas(net, [mixed.primitives[energies.index(pick(energies))]] * 6, high=20.0)
        assert arch.normalized_energy(net(x)[1]).item() == pytest.approx(target, abs=1e-3)


def test_supernet_api_for_the_runner():
    net, x, y = tiny_supernet(nb201.PRIMITIVES[1:], partial_channels=2)
    net(x)
    arch = Architect(net, arch_learning_rate=0.1)
    before = net.alphas.detach().clone()
    arch.step(x, y, x, y, eta=0.1)
    assert not torch.equal(before, net.alphas.detach())
    assert {id(p) for p in net.weight_parameters()}.isdisjoint({id(net.alphas)})
    net.set_channels_last(True)
    assert net(x)[0].shape == (4, 10) and net.new_model().channels_last
    twin = net.new_model()
    assert torch.equal(twin.alphas, net.alphas) and twin.estimator is net.estimator
    rows = json.loads(json.dumps(net.softmaxed_alphas()))["cell"]
    assert len(rows) == 6 and all(len(r) == 4 and abs(sum(r) - 1) < 1e-6 for r in rows)
    assert net.derivation_weights() == net.softmaxed_alphas()
    with pytest.raises(CLIError, match="divide"):
        nb201.Supernet(6, 10, 1, partial_channels=4)
    with pytest.raises(CLIError, match="primitives"):
        nb201.Supernet(4, 10, 1, ["none", "sep_conv_3x3"])


# -------------------------------------------------------------------------------------------------- derivation
def test_derivation_picks_the_strongest_op_per_edge():
    net, _, _ = tiny_supernet()
    winners = ["nor_conv_3x3", "skip_connect", "none", "avg_pool_3x3", "nor_conv_1x1", "none"]
    set_alphas(net, winners)
    assert net.genotype() == nb201.format_arch(winners)


def test_a_cut_off_derivation_is_connected_along_the_cheapest_path():
    net, _, _ = tiny_supernet()
    set_alphas(net, ["none"] * 6)
    with torch.no_grad():
        net.alphas[3, net.primitives.index("skip_connect")] = 4.0  # 3<-0: the runner-up with the most weight
    actions = []
    arch = net.genotype(actions=actions)
    assert arch == "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"
    assert nb201.reaches_output(arch) and len(actions) == 1 and "3<-0" in actions[0]


def test_guards_on_the_six_edges():
    weights = [[0.05, 0.6, 0.1, 0.2, 0.05]] * 6  # skip strongest, then nor_conv_3x3
    actions = []
    arch = nb201.derive_arch(weights, nb201.PRIMITIVES, max_skip=2, actions=actions)
    assert arch.count("skip_connect") == 2 and arch.count("nor_conv_3x3") == 4 and len(actions) == 4
    arch = nb201.derive_arch(weights, nb201.PRIMITIVES, min_parametric=1)
    assert arch.count("nor_conv_3x3") == 1
    stopper = CollapseStopper(max_skips=2, consecutive=1)  # DARTS+'s early stop reads the 6 edges as its cell
    assert not stopper.update(1, nb201.collapse_view(MIXED))
    assert stopper.update(2, nb201.collapse_view(("skip_connect",) * 6)) and stopper.result_epoch == 1


# ------------------------------------------------------------------------------------------ costs and budgets
@pytest.fixture(scope="module")
def costs():
    return ne.CellCosts(nb201.PRIMITIVES, DIGITS, EnergyEstimator.default(), channels=8, layers=2)


@pytest.mark.parametrize("arch", [BEST, MIXED, "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
                                  "|none~0|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|",
                                  "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|none~0|none~1|none~2|"])
def test_cost_table_is_additive(costs, arch):
    est = EnergyEstimator.default()
    measured = ne.network_energy_mj(arch, DIGITS, est, 8, 2)
    assert costs.total(arch) == pytest.approx(measured, rel=1e-9)
    net = ne.priced_network(arch, DIGITS, 8, 2)
    assert measured == pytest.approx(1e3 * est.model_energy(net, (1, 1, 8, 8)), rel=1e-12)
    per_edge, whole = ne.edge_energies(arch, DIGITS, est, 8, 2, all_cells=True)
    assert whole == pytest.approx(measured) and per_edge[0] <= costs.cost(0, nb201.parse_arch(arch)[0])


def test_projection_lands_in_the_budget_band(costs):
    weights = [[0.1, 0.15, 0.25, 0.4, 0.1]] * 6
    arch = nb201.derive_arch(weights, nb201.PRIMITIVES)
    assert arch == ("nor_conv_3x3",) * 6
    budget = 0.5 * (costs.total(arch) + costs.total(("skip_connect",) * 6))
    actions = []
    out = ne.project_to_budget(arch, weights, nb201.PRIMITIVES, costs, budget, max_skip=2, actions=actions)
    assert 0.95 * budget <= costs.total(out) <= budget and out.count("skip_connect") <= 2 and actions
    assert all(u or op == "none" for op, u in zip(out, nb201.useful_edges(out)))
    assert ne.project_to_budget(out, weights, nb201.PRIMITIVES, costs, budget) == out  # already in the band
    tiny = ne.project_to_budget(arch, weights, nb201.PRIMITIVES, costs, 1e-9)
    assert nb201.reaches_output(tiny) and costs.total(tiny) <= costs.total(out)  # out of reach: the cheapest


def test_cell_diagram(tmp_path):
    paths = ne.render(MIXED, str(tmp_path), DIGITS, EnergyEstimator.default(), 8, 2, backend="matplotlib")
    assert [os.path.basename(p) for p in paths] == ["cell.png", "cell.pdf"] and is_png(paths[0])
    dot = ne.to_dot(MIXED, [0.5] * 6, "t")
    assert dot.count("->") == 6 and "avg_pool_3x3\\n0.5000 mJ" in dot


def test_alpha_heatmap_of_the_one_cell(tmp_path):
    from plumbing import plots
    net, _, _ = tiny_supernet()
    labels = [nb201.edge_name(e) for e in range(6)]
    assert labels[2] == "2<-1"
    assert is_png(plots.alpha_heatmaps(net.softmaxed_alphas(), net.primitives, str(tmp_path / "a.png"),
                                       row_labels=labels))


# ---------------------------------------------------------------------------------------------- benchmark
def write_table(path, lines, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_benchmark_lookup(tmp_path):
    path = write_table(tmp_path / "bench.csv", [
        "arch_str,test_acc,latency_ms,note",
        f"{BEST},94.37,12.5,best",
        f'"{MIXED}",91.2,8,',
        f"{BEST},94.37,12.5,best",  # an exact repeat is tolerated
    ])
    table = benchmark.load_table(path)
    assert len(table) == 2 and table.columns == ["test_acc", "latency_ms", "note"]
    shuffled = "|nor_conv_3x3~0|+|avg_pool_3x3~1|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
    assert table.lookup(shuffled) == {"test_acc": 91.2, "latency_ms": 8, "note": None}
    assert table.metrics(nb201.parse_arch(BEST), ["test_acc"]) == {"bench_test_acc": 94.37}
    with pytest.raises(CLIError, match=r"bench\.csv: no row for arch"):
        table.lookup("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    with pytest.raises(CLIError, match="no column 'energy'"):
        table.lookup(BEST, ["energy"])


@pytest.mark.parametrize("lines, message", [
    (["arch,acc", f"{BEST},1"], "no 'arch_str' column"),
    (["arch_str,acc", f"{BEST},1", f"{BEST},2"], "repeats the arch of line 2"),
    (["arch_str,acc", "|bogus~0|,1"], "line 2"),
    (["arch_str,acc", f"{BEST},1,2"], "fields"),
    (["arch_str,acc,acc", f"{BEST},1,2"], "distinct"),
    (["arch_str,acc"], "no rows"),
])
def test_malformed_benchmark_tables(tmp_path, lines, message):
    path = write_table(tmp_path / "t.csv", lines)
    with pytest.raises(CLIError, match=message) as e:
        benchmark.load_table(path)
    assert "t.csv" in str(e.value)


def test_unreadable_benchmark_tables(tmp_path):
    latin = write_table(tmp_path / "latin.csv", ["arch_str,note", f"{BEST},caf\u00e9"], encoding="latin-1")
    with pytest.raises(CLIError, match="not UTF-8"):
        benchmark.load_table(latin)
    big = write_table(tmp_path / "big.csv", ["arch_str,acc", f"{BEST},1"])
    with pytest.raises(CLIError, match="MiB"):
        benchmark.load_table(big, max_bytes=10)
    with pytest.raises(CLIError, match="does not exist"):
        benchmark.load_table(str(tmp_path / "none.csv"))


def test_benchmark_plot_writes_a_png(tmp_path):
    import itertools
    lines = ["arch_str,test_acc,energy_mj"]
    for k, ops in enumerate(itertools.product(["none", "skip_connect", "nor_conv_3x3"], repeat=6)):
        convs = ops.count("nor_conv_3x3")
        lines.append(f"{nb201.format_arch(ops)},{60 + 5 * convs + k % 7},{0.1 + 0.3 * convs + 0.01 * (k % 5)}")
    table = benchmark.load_table(write_table(tmp_path / "b.csv", lines))
    cells = [("w0", BEST), ("w1", "|skip_connect~0|+|none~0|skip_connect~1|+|none~0|none~1|skip_connect~2|"),
             ("w2", MIXED)]  # MIXED has avg_pool_3x3: not in this table
    assert benchmark.default_better("test_acc") == "higher" and benchmark.default_better("energy_mj") == "lower"
    path, missing = benchmark.plot_sweep(table, cells, "energy_mj", "test_acc", str(tmp_path / "p.png"))
    assert is_png(path) and missing == ["w2"]
    with pytest.raises(CLIError, match="no column"):
        benchmark.plot_sweep(table, cells, "latency", "test_acc", str(tmp_path / "q.png"))
