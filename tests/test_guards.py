"""Guards against skip/pool collapse: derivation caps, early stop, energy budget, warm-up (issue 9)."""
import pytest
import torch

import genotypes as G
import train_search
from architect import BudgetController, energy_scale
from derivation import CollapseStopper, derive, guard_derivation
from model_search import Network
from plumbing.run import Run

PRIMS = G.PRIMITIVE_SETS["darts"]  # none, max_pool, avg_pool, skip, sep3, sep5, dil3, dil5
IDX = {p: k for k, p in enumerate(PRIMS)}


def collapsed_weights():
    """14 edges: skip_connect strongest everywhere (skip weight rising with the edge index), a different
    parametric op second on each edge, so the replacement op is known."""
    rows, second = [], ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    for e in range(14):
        w = [0.02] * len(PRIMS)
        w[IDX["skip_connect"]] = 0.5 + 0.01 * e
        w[IDX["max_pool_3x3"]] = 0.2 + 0.005 * e  # a pool beats every parametric op: "next best" must be parametric
        w[IDX[second[e % 4]]] = 0.1
        rows.append(w)
    return rows


def test_max_skip_rewrites_collapsed_cell_with_next_best_parametric_ops():
    w = collapsed_weights()
    plain = derive(w, PRIMS, 4)
    assert [op for op, _ in plain] == ["skip_connect"] * 8
    actions = []
    guarded = guard_derivation(w, PRIMS, plain, max_skip=2, min_parametric=2, actions=actions)
    assert sum(op == "skip_connect" for op, _ in guarded) == 2
    assert [j for _, j in guarded] == [j for _, j in plain]  # same 2 inputs per node
    # the two strongest skips (highest edges: node 5) survive; every other edge takes its best parametric op
    assert guarded[6][0] == guarded[7][0] == "skip_connect"
    starts = [0, 2, 5, 9]
    for pos in range(6):
        edge = starts[pos // 2] + guarded[pos][1]
        assert guarded[pos][0] == ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"][edge % 4]
    assert len(actions) == 6 and actions[0].startswith("max_skip replaced skip_connect on edge (node 2, input")


def test_min_parametric_stops_pools_filling_the_cell_and_defaults_are_darts():
    w = collapsed_weights()
    for row in w:
        row[IDX["skip_connect"]] = 0.01
    plain = derive(w, PRIMS, 4)
    assert all(op == "max_pool_3x3" for op, _ in plain)
    assert guard_derivation(w, PRIMS, plain) == plain  # guards off: DARTS as is
    guarded = guard_derivation(w, PRIMS, plain, max_skip=2, min_parametric=2)
    assert sum(op.startswith(("sep", "dil")) for op, _ in guarded) == 2
    net = Network(4, 10, 3, PRIMS, in_channels=1)
    with torch.no_grad():
        net.alphas_normal.copy_(torch.tensor(w).log())
    assert net.genotype().normal == plain
    actions = []
    assert net.genotype(2, 2, actions).normal == guarded and len(actions) == 2


def geno(skips: int, tag: str = "a"):
    normal = [("skip_connect", 0)] * skips + [("sep_conv_3x3", 1)] * (8 - skips)
    return G.Genotype(normal, [2, 3, 4, 5], [(f"max_pool_3x3", 0)] * 8, [2, 3, 4, 5]), tag


def test_early_stop_fires_on_collapse_and_keeps_last_healthy_genotype():
    stop = CollapseStopper()
    seq = [geno(1, "e1"), geno(2, "e2"), geno(3, "e3"), geno(2, "e4"), geno(4, "e5"), geno(5, "e6"), geno(6, "e7")]
    fired = None
    for epoch, (g, tag) in enumerate(seq, 1):
        if stop.update(epoch, g, result=tag, ranking=epoch):
            fired = epoch
            break
    assert fired == 6 and stop.result == "e4" and stop.result_epoch == 4  # a one-epoch blip (e3) does not stop
    assert "more than 2 skip_connects" in stop.reason


def test_early_stop_on_stable_ranking():
    stop = CollapseStopper(patience=2)
    g, _ = geno(0)
    assert not stop.update(1, g, ranking="r1")
    assert not stop.update(2, g, ranking="r2")
    assert not stop.update(3, g, ranking="r2")
    assert stop.update(4, g, result="kept", ranking="r2") and stop.result == "kept" and "stable" in stop.reason


def test_budget_multiplier_rises_over_budget_and_falls_to_zero_under():
    b = BudgetController(0.4, rate=0.1)
    for _ in range(5):
        b.update(0.8)
    assert b.lam == pytest.approx(0.5)
    b.update(0.2)
    assert b.lam == pytest.approx(0.45)
    for _ in range(20):
        b.update(0.2)
    assert b.lam == 0.0


def test_warmup_leaves_alphas_and_adam_untouched(tmp_path, monkeypatch):
    """--warmup_epochs 1: after epoch 1 the alphas are their initial values and Adam holds no state; epoch 2
    moves them (seen at each epoch's end, where the checkpoint is taken)."""
    seen = []
    real_restore, real_end = Run.restore, Run.end_epoch

    def restore(self, model, *a, **k):  # after the supernet is built, before any step
        seen.append(("init", [p.detach().clone() for p in model.arch_parameters()], 0))
        return real_restore(self, model, *a, **k)

    def end_epoch(self, row, extra, *a, **k):
        alphas = [p.detach().clone() for p in self._states["model"].arch_parameters()]
        seen.append((row["epoch"], alphas, len(extra["arch_optimizer"]["state"])))
        return real_end(self, row, extra, *a, **k)
    monkeypatch.setattr(Run, "restore", restore)
    monkeypatch.setattr(Run, "end_epoch", end_epoch)
    code = train_search.main(
        ["--dataset", "digits", "--epochs", "2", "--warmup_epochs", "1", "--layers", "3", "--init_channels", "4",
         "--train_portion", "0.05", "--batch_size", "32", "--eval_channels", "4", "--eval_layers", "3",
         "--log_dir", str(tmp_path), "--run_name", "w", "--wandb", "disabled", "--primitives",
         "none,max_pool_3x3,skip_connect,sep_conv_3x3"])
    assert code == 0 and [e for e, _, _ in seen] == ["init", 1, 2]
    (_, before, _), (_, warm, warm_state), (_, searched, _) = seen
    assert all(torch.equal(a, b) for a, b in zip(warm, before)) and warm_state == 0
    assert not all(torch.equal(a, b) for a, b in zip(searched, before))
    assert energy_scale(0, 1, 0) == 0.0 and energy_scale(1, 1, 0) == 1.0


def test_guard_flags_are_checked():
    _, args, _ = train_search.parse_args(["--dataset", "digits", "--epochs", "2", "--warmup_epochs", "2"])
    with pytest.raises(train_search.utils.CLIError):
        train_search.resolve(args)
    _, args, _ = train_search.parse_args(["--dataset", "digits", "--max_skip", "2"])
    train_search.resolve(args)
    assert args.min_parametric == 2


# ------------------------------------------------------------------------------ energy budget projection
@pytest.fixture(scope="module")
def digits_costs():
    from plumbing.datasets import known_info
    from model import CellCosts
    from dl_energy_estimator import EnergyEstimator
    info, est = known_info("digits"), EnergyEstimator.default()
    return CellCosts(PRIMS, info, 16, 6, est), info, est


def test_cell_costs_add_up_to_the_network_energy(digits_costs):
    import random
    from model import genotype_energy_mj
    costs, info, est = digits_costs
    rng = random.Random(0)
    usable = [p for p in PRIMS if p != "none"]
    randoms = [G.Genotype([(rng.choice(usable), j) for i in range(4) for j in rng.sample(range(i + 2), 2)],
                          [2, 3, 4, 5], [(rng.choice(usable), j) for i in range(4) for j in rng.sample(range(i + 2), 2)],
                          [2, 3, 4, 5]) for _ in range(3)]
    for g in [G.DARTS_V2, G.DARTS_V1] + randoms:
        assert costs.total(g) == pytest.approx(genotype_energy_mj(g, info, 16, 6, est), rel=1e-9)
    assert costs.cost("reduce", "sep_conv_3x3", 0) != costs.cost("reduce", "sep_conv_3x3", 2)  # strided vs not


def expensive_cells(seed: int):
    """Alphas favouring the dearest ops (sep_conv_5x5 first, dil_conv_5x5 second, random rest), and their cells."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for kind in ("normal", "reduce"):
        rows = torch.rand(14, len(PRIMS), generator=g) * 0.05
        rows[:, IDX["sep_conv_5x5"]] += 0.5
        rows[:, IDX["dil_conv_5x5"]] += 0.3
        w[kind] = (rows / rows.sum(-1, keepdim=True)).tolist()
    return w, {kind: derive(w[kind], PRIMS, 4) for kind in w}


@pytest.mark.parametrize("seed", [0, 1])
def test_projection_lands_within_ten_percent_of_three_budgets(digits_costs, seed):
    from derivation import project_to_budget
    costs, _, _ = digits_costs
    w, cells = expensive_cells(seed)
    geno = lambda c: G.Genotype(c["normal"], [2, 3, 4, 5], c["reduce"], [2, 3, 4, 5])  # noqa: E731
    top = costs.total(geno(cells))
    cheapest = project_to_budget(cells, w, PRIMS, costs.cost, costs.base, 0.0)
    floor = costs.total(geno(cheapest))
    assert floor < 0.5 * top
    for budget in (floor + f * (top - floor) for f in (0.2, 0.5, 0.8)):
        actions = []
        out = project_to_budget(cells, w, PRIMS, costs.cost, costs.base, budget, actions=actions)
        energy = costs.total(geno(out))
        assert 0.9 * budget <= energy <= budget, (budget, energy)
        assert [j for _, j in out["normal"]] == [j for _, j in cells["normal"]]  # each node keeps its inputs
        assert actions and all("energy budget" in line for line in actions)
    # out of reach: below the cheapest cell it stops at the cheapest, above the dearest at the dearest
    assert costs.total(geno(project_to_budget(cells, w, PRIMS, costs.cost, costs.base, 0.5 * floor))) == floor
    dearest = project_to_budget(cells, w, PRIMS, costs.cost, costs.base, 10 * top)
    assert all(costs.cost(kind, op, j) == max(costs.cost(kind, o, j) for o in PRIMS[1:])
               for kind in dearest for op, j in dearest[kind])
    assert project_to_budget(cells, w, PRIMS, costs.cost, costs.base, top) == cells  # in the band: unchanged


def test_projection_keeps_the_guards(digits_costs):
    from derivation import project_to_budget
    costs, _, _ = digits_costs
    w, cells = expensive_cells(2)
    out = project_to_budget(cells, w, PRIMS, costs.cost, costs.base, 0.0, max_skip=2, min_parametric=2)
    ops = [op for op, _ in out["normal"]]
    assert ops.count("skip_connect") <= 2 and sum(op.startswith(("sep", "dil")) for op in ops) == 2
    assert "none" not in ops


@pytest.mark.slow
def test_search_with_budget_writes_a_cell_within_it(tmp_path, digits_costs):
    """A real (short) digits search with --energy_budget: the written cell is within 10 % of the budget, and the
    run's own alphas projected onto two more budgets land within 10 % of them too (energies re-estimated)."""
    import json
    import os
    from conftest import run_script
    from model import genotype_energy_mj
    from derivation import project_to_budget
    costs, info, est = digits_costs
    budget = 0.3
    res = run_script("train_search.py", "--dataset", "digits", "--epochs", "1", "--layers", "3", "--init_channels",
                     "4", "--train_portion", "0.3", "--energy_budget", str(budget), "--log_dir", str(tmp_path),
                     "--run_name", "b", "--wandb", "disabled")
    assert res.returncode == 0, res.stderr[-3000:]
    run = os.path.join(str(tmp_path), "b")
    meta = json.load(open(os.path.join(run, "genotype.json")))["meta"]
    assert meta["energy_budget_mj"] == budget and 0.9 * budget <= meta["energy_mj"] <= budget
    row = json.loads(open(os.path.join(run, "metrics.jsonl")).read().splitlines()[-1])
    assert row["genotype_energy_mj"] == pytest.approx(meta["energy_mj"]) and row["budget_lambda"] >= 0
    assert row["unprojected_energy_mj"] > 0
    alphas = json.load(open(os.path.join(run, "alphas.json")))[-1]
    cells = {kind: derive(alphas[kind], PRIMS, 4) for kind in ("normal", "reduce")}
    geno = lambda c: G.Genotype(c["normal"], [2, 3, 4, 5], c["reduce"], [2, 3, 4, 5])  # noqa: E731
    free = genotype_energy_mj(geno(cells), info, 16, 6, est)  # the cell the alphas derive without a budget
    assert free == pytest.approx(row["unprojected_energy_mj"])
    assert project_to_budget(cells, alphas, PRIMS, costs.cost, costs.base, free) == cells  # in the band: as derived
    for b in (0.6 * free, 0.8 * free, 1.3 * free):
        out = project_to_budget(cells, alphas, PRIMS, costs.cost, costs.base, b)
        energy = genotype_energy_mj(geno(out), info, 16, 6, est)
        assert 0.9 * b <= energy <= b * (1 + 1e-9), (b, energy)


def test_pricing_a_genotype_leaves_the_search_rng_alone(digits_costs):
    """Guards and budgets change which genotype gets priced each epoch; pricing builds a network, whose initial
    weights must not come from the search's RNG stream (else a guard would change the search itself)."""
    from model import CellCosts, genotype_energy_mj
    _, info, est = digits_costs
    torch.manual_seed(0)
    state = torch.get_rng_state()
    genotype_energy_mj(G.DARTS_V2, info, 16, 6, est)
    CellCosts(["none", "skip_connect", "sep_conv_3x3"], info, 8, 3, est)
    assert torch.equal(state, torch.get_rng_state())
