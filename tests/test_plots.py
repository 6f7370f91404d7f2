"""Pareto front, plots, cell diagrams (both backends) and a resumed sweep."""
import csv
import json
import os
import shutil

import pytest

import genotypes as G
from model import op_energies
from plumbing import cell_diagrams, plots
from conftest import run_script
from plumbing.datasets import known_info
from dl_energy_estimator import EnergyEstimator


def is_png(path, min_bytes=5000):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > min_bytes


def test_pareto_front_on_known_points():
    pts = [(1.0, 90.0), (2.0, 95.0), (1.5, 89.0), (3.0, 94.0), (0.5, 80.0), (2.0, 93.0), (4.0, 97.0)]
    # (energy, accuracy): dominated are (1.5, 89) by (1, 90); (3, 94) and (2, 93) by (2, 95)
    assert plots.pareto_front(pts) == [4, 0, 1, 6]
    assert plots.pareto_front([(1.0, 50.0), (1.0, 60.0)]) == [1]
    assert plots.pareto_front([]) == []


def test_figures_are_written_and_non_empty(tmp_path):
    prims = G.PRIMITIVES
    alphas = {"normal": [[1 / len(prims)] * len(prims)] * 14, "reduce": [[1 / len(prims)] * len(prims)] * 14}
    rows = [{"epoch": e, "train_acc": 50 + e, "valid_acc": 40 + e, "train_loss": 1 / e, "valid_loss": 1.2 / e,
             "expected_energy_mj": 0.4, "genotype_energy_mj": 0.5 - 0.01 * e} for e in (1, 2, 3)]
    out = plots.search_figures(str(tmp_path), rows, alphas, prims, "test")
    assert all(is_png(p) for p in out.values())
    sweep = [{"energy_weight": w, "seed": s, "genotype_energy_mj": 1.0 - w + 0.01 * s, "valid_acc": 95 - 5 * w + s}
             for w in (0.0, 0.1, 0.5) for s in (0, 1)]
    assert is_png(plots.pareto_plot(sweep, str(tmp_path / "pareto.png"), "valid_acc"))


@pytest.mark.parametrize("backend", ["graphviz", "matplotlib"])
def test_visualize_renders_darts_v2(tmp_path, backend):
    if backend == "graphviz" and not shutil.which("dot"):
        pytest.skip("graphviz's dot is not installed")
    energies = op_energies(G.DARTS_V2, known_info("digits"), 16, 8, EnergyEstimator.default())[0]
    paths = cell_diagrams.render(G.DARTS_V2, energies, str(tmp_path), 16, 8, backend=backend, name="DARTS_V2")
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["normal.pdf", "normal.png", "reduce.pdf", "reduce.png"]
    assert all(is_png(p) for p in paths if p.endswith(".png"))
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_dot_labels_carry_op_energies():
    energies, _ = op_energies(G.DARTS_V2, known_info("cifar10"), 36, 20, EnergyEstimator.default())
    assert len(energies["normal"]) == 8 and all(e > 0 for e in energies["normal"])
    sep, skip = energies["normal"][0], energies["normal"][5]  # sep_conv_3x3 vs skip_connect
    assert sep > 5 * skip
    dot = cell_diagrams.to_dot(G.DARTS_V2.normal, [2, 3, 4, 5], energies["normal"], "t")
    assert "sep_conv_3x3\\n" in dot and "mJ" in dot and '"c_{k-2}" -> "0"' in dot


def test_visualize_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text("{}")
    res = run_script("visualize.py", str(bad), "--out", str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "missing key" in res.stderr


def fake_finished_search(run_dir, weight, seed, acc):
    os.makedirs(run_dir)
    G.save(G.DARTS_V2, os.path.join(run_dir, "genotype.json"), G.PRIMITIVES,
           {"dataset": "digits", "eval_channels": 16, "eval_layers": 8, "valid_acc": acc, "energy_weight": weight,
            "seed": seed})
    json.dump({"epochs": 1, "energy_weight": weight, "seed": seed, "dataset": "digits"},
              open(os.path.join(run_dir, "args.json"), "w"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 1, "valid_acc": acc}) + "\n")


def test_resumed_sweep_skips_finished_searches(tmp_path):
    sweep = tmp_path / "sweep"
    fake_finished_search(str(sweep / "w0-s0"), 0.0, 0, 91.0)
    fake_finished_search(str(sweep / "w0.5-s0"), 0.5, 0, 88.0)
    res = run_script("pareto.py", "--dataset", "digits", "--energy_weights", "0,0.5", "--seeds", "0",
                     "--epochs", "1", "--log_dir", str(tmp_path), "--run_name", "sweep", "--wandb", "disabled")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("search already finished, skipped") == 2
    rows = list(csv.DictReader(open(sweep / "pareto.csv")))
    assert [r["energy_weight"] for r in rows] == ["0.0", "0.5"]
    assert set(rows[0]) == {"energy_weight", "seed", "genotype_energy_mj", "params", "macs", "valid_acc",
                            "test_acc", "run"}
    assert float(rows[0]["genotype_energy_mj"]) > 0 and int(rows[0]["params"]) > 0
    assert is_png(sweep / "pareto.png")
