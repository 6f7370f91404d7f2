"""The NAS-Bench-201 space through the scripts: a digits search whose energy weight lowers the derived cell's
energy, the benchmark look-up into metrics.jsonl and the genotype, train.py on an arch string or the written
genotype.json, visualize.py, and pareto.py's plot on a benchmark table's axes."""
import csv
import itertools
import json
import os

import pytest

from nb201 import space as nb201
from conftest import run_script

SEARCH = ["train_search.py", "--space", "nb201", "--dataset", "digits", "--epochs", "3", "--wandb", "disabled"]


def write_table(path, columns=("acc", "energy")):
    """Every one of NB201's 15,625 cells with made-up metrics (deterministic in the arch)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch_str", *columns])
        for i, ops in enumerate(itertools.product(nb201.PRIMITIVES, repeat=len(nb201.EDGES))):
            w.writerow([nb201.format_arch(ops), 50 + (i * 37) % 50, round(1 + (i * 11) % 13 / 7, 3)][:1 + len(columns)])
    return path


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    log = tmp_path_factory.mktemp("nb201")
    table = write_table(log / "table.csv")
    runs = {}
    for w in ("0", "0.5"):
        res = run_script(*SEARCH, "--energy_weight", w, "--seed", "0", "--log_dir", str(log), "--run_name", f"w{w}",
                         "--benchmark", str(table), timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[w] = log / f"w{w}"
    return log, table, runs


def genotype(run):
    return json.load(open(run / "genotype.json"))


@pytest.mark.slow
def test_energy_weight_lowers_the_derived_cells_energy(searches):
    _, _, runs = searches
    plain, green = genotype(runs["0"]), genotype(runs["0.5"])
    assert plain["space"] == green["space"] == "nb201"
    assert nb201.parse_arch(plain["arch"]) and nb201.parse_arch(green["arch"])
    assert green["meta"]["energy_mj"] < plain["meta"]["energy_mj"]


@pytest.mark.slow
def test_benchmark_columns_go_to_metrics_and_genotype(searches):
    _, _, runs = searches
    rows = [json.loads(line) for line in open(runs["0"] / "metrics.jsonl")]
    assert len(rows) == 3 and all({"bench_acc", "bench_energy"} <= set(r) for r in rows)
    meta = genotype(runs["0"])["meta"]
    assert meta["bench_acc"] == rows[-1]["bench_acc"]
    alphas = json.load(open(runs["0"] / "alphas.json"))
    assert len(alphas) == 3 and len(alphas[-1]["cell"]) == 6


@pytest.mark.slow
def test_train_and_visualize_take_the_written_genotype(searches, tmp_path):
    _, _, runs = searches
    res = run_script("train.py", "--genotype", str(runs["0"] / "genotype.json"), "--dataset", "digits", "--epochs",
                     "1", "--log_dir", str(tmp_path), "--run_name", "t", "--wandb", "disabled", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(tmp_path / "t" / "summary.json"))
    assert summary["genotype"]["arch"] == genotype(runs["0"])["arch"] and 0 <= summary["test_acc"] <= 100
    args = json.load(open(tmp_path / "t" / "args.json"))
    assert args["space"] == "nb201" and args["nesterov"] is True and args["weight_decay"] == 5e-4
    res = run_script("visualize.py", str(runs["0"] / "genotype.json"), "--out", str(tmp_path / "viz"))
    assert res.returncode == 0 and os.path.isfile(tmp_path / "viz" / "cell.png"), res.stderr[-2000:]


@pytest.mark.slow
def test_pareto_plots_the_cells_on_the_benchmark_axes(searches):
    log, table, runs = searches
    res = run_script("pareto.py", "--from", str(runs["0"]), str(runs["0.5"]), "--space", "nb201", "--benchmark",
                     str(table), "--x", "energy", "--y", "acc", "--log_dir", str(log), "--run_name", "p",
                     "--wandb", "disabled", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.getsize(log / "p" / "benchmark.png") > 10_000
    rows = list(csv.DictReader(open(log / "p" / "pareto.csv")))
    assert len(rows) == 2 and list(rows[0]) == ["energy_weight", "seed", "genotype_energy_mj", "params", "macs",
                                                "valid_acc", "test_acc", "run"]


def test_report_of_an_arch_string_has_nb201s_size():
    res = run_script("train.py", "--space", "nb201", "--genotype", "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+"
                     "|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|", "--report", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "params 1,531,546" in res.stdout and "MACs 220,119,690" in res.stdout


@pytest.mark.parametrize("argv,word", [
    (["--benchmark", "{table}"], "--space nb201"),  # a DARTS search cannot look up NB201 rows
    (["--space", "nb201", "--benchmark", "{tmp}/nosuch.csv"], "nosuch.csv"),
    (["--space", "nb201", "--primitives", "none,sep_conv_3x3"], "sep_conv_3x3"),
])
def test_bad_nb201_flags_are_one_line(tmp_path, argv, word):
    table = write_table(tmp_path / "t.csv", ("acc",))
    argv = [a.format(table=table, tmp=tmp_path) for a in argv]
    res = run_script("train_search.py", "--dataset", "digits", "--epochs", "1", "--log_dir", str(tmp_path / "log"),
                     "--wandb", "disabled", *argv, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert word in res.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "log") or not os.listdir(tmp_path / "log")


def test_pareto_checks_benchmark_columns_up_front(tmp_path, capsys):
    import pareto
    table = write_table(tmp_path / "t.csv", ("acc",))
    with pytest.raises(SystemExit) as exc:
        pareto.main(["--space", "nb201", "--dataset", "digits", "--benchmark", str(table), "--x", "energy", "--y",
                     "acc", "--log_dir", str(tmp_path / "log"), "--run_name", "p", "--wandb", "disabled"])
    assert exc.value.code == 2
    assert "energy" in capsys.readouterr().err.strip().splitlines()[-1]


def test_fit_the_estimator_to_a_published_nb201_table(tmp_path):
    """`python energy.py fit --space nb201 --table`: each listed cell's network is built and the estimator is
    fitted to the column; the fitted model ranks the table's cells as measured and loads in the scripts."""
    import random
    from scipy.stats import spearmanr
    import spaces
    from plumbing import utils
    rng = random.Random(0)
    cells = rng.sample(list(itertools.product(nb201.PRIMITIVES, repeat=len(nb201.EDGES))), 40)
    measured = {nb201.format_arch(ops): 1 + 2 * ops.count("nor_conv_3x3") + ops.count("nor_conv_1x1")
                + 0.3 * ops.count("avg_pool_3x3") + 0.05 * rng.random() for ops in cells}
    with open(tmp_path / "hw.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch_str", "edgegpu_energy"])
        w.writerows(measured.items())
    res = run_script("energy.py", "fit", "--space", "nb201", "--table", str(tmp_path / "hw.csv"),
                     "--column", "edgegpu_energy", "--unit", "mJ", "--out", str(tmp_path / "m.json"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    est = utils.load_estimator(str(tmp_path / "m.json"), None)
    predicted = [est.model_energy(spaces.energy_network("nb201", a, (3, 32, 32)), (1, 3, 32, 32)) for a in measured]
    assert spearmanr(predicted, list(measured.values())).statistic > 0.95
    res = run_script("energy.py", "fit", "--space", "nb201", "--table", str(tmp_path / "hw.csv"),
                     "--column", "no_such", "--out", str(tmp_path / "x.json"), timeout=300)
    assert res.returncode == 2 and "no_such" in res.stderr and "Traceback" not in res.stderr
