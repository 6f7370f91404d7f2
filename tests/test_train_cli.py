"""End to end: train.py on digits (run folder, final-epoch accuracy, best-on-validation weights), on a tiny
ImageFolder as ImageNet, its report and energy measurement, and bad genotype files."""
import json
import os

import numpy as np
import pytest
import torch

import genotypes as G
from conftest import run_script
from plumbing.datasets import DataInfo
from dl_energy_estimator import EnergyEstimator
from model import build_network

pytestmark = pytest.mark.slow

TINY = ["--init_channels", "4", "--layers", "3", "--wandb", "disabled", "--seed", "0"]


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short run from a genotype file (as a search writes it), with a validation split."""
    tmp = tmp_path_factory.mktemp("train")
    geno = tmp / "genotype.json"
    G.save(G.DARTS_V1, str(geno), G.PRIMITIVES, {"dataset": "digits", "search_run": "s", "seed": 0})
    res = run_script("train.py", "--dataset", "digits", "--genotype", str(geno), "--epochs", "3",
                     "--valid_portion", "0.2", "--log_dir", str(tmp), "--run_name", "r", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    return os.path.join(tmp, "r")


def test_run_folder_metrics_weights_and_summary(digits_run):
    for name in ("args.json", "env.json", "log.txt", "metrics.jsonl", "weights.pt", "best_weights.pt",
                 "summary.json"):
        assert os.path.isfile(os.path.join(digits_run, name)), name
    rows = _rows(os.path.join(digits_run, "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"train_acc", "test_acc", "valid_acc", "lr"} <= set(r)
        assert 0 <= r["test_acc"] <= 100 and r["lr"] > 0
    assert rows[0]["lr"] > rows[-1]["lr"]  # cosine schedule
    summary = json.load(open(os.path.join(digits_run, "summary.json")))
    assert {"params", "macs", "energy_mj", "test_acc", "seed", "wall_s"} <= set(summary)
    assert summary["test_acc"] == rows[-1]["test_acc"]  # the final epoch, never a best-on-test pick
    assert summary["test_acc"] > 50 and summary["seed"] == 0 and summary["wall_s"] > 0
    net = build_network(G.DARTS_V1, 4, 10, 3, in_channels=1, image_size=8).eval()
    est = EnergyEstimator.default()
    assert summary["energy_mj"] == pytest.approx(1e3 * est.model_energy(net, (1, 1, 8, 8)), rel=1e-12)
    assert summary["params"] == sum(p.numel() for p in net.parameters())


def test_best_weights_are_chosen_on_validation(digits_run):
    rows = _rows(os.path.join(digits_run, "metrics.jsonl"))
    best = torch.load(os.path.join(digits_run, "best_weights.pt"), map_location="cpu", weights_only=True)
    first_best = max(range(len(rows)), key=lambda i: (rows[i]["valid_acc"], -i))
    assert best["epoch"] == rows[first_best]["epoch"] and best["valid_acc"] == rows[first_best]["valid_acc"]
    last = torch.load(os.path.join(digits_run, "weights.pt"), map_location="cpu", weights_only=True)
    net = build_network(G.DARTS_V1, 4, 10, 3, in_channels=1, image_size=8)
    net.load_state_dict(last["model"])
    assert G.from_dict(last["genotype"]) == G.validate(G.DARTS_V1)


def test_report_json_and_measured_energy(tmp_path):
    out = tmp_path / "rep.json"
    res = run_script("train.py", "--arch", "DARTS_V2", "--dataset", "digits", "--init_channels", "4", "--layers",
                     "3", "--report", "--json", str(out), "--measure_energy", "--watts", "65")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "measured" in res.stdout and ("latency_x_watts" in res.stdout or "rapl" in res.stdout)
    rep = json.load(open(out))
    assert {"params", "macs", "energy_mj", "test_acc", "seed", "wall_s", "breakdown"} <= set(rep)
    net = build_network(G.DARTS_V2, 4, 10, 3, in_channels=1, image_size=8).eval()
    assert rep["energy_mj"] == 1e3 * EnergyEstimator.default().model_energy(net, (1, 1, 8, 8))
    assert rep["measured_energy_mj"] > 0 and {"name", "type", "macs", "bytes", "energy_mj"} <= set(rep["breakdown"][0])


@pytest.mark.skipif(os.path.isdir("/sys/class/powercap/intel-rapl:0"), reason="this machine has a RAPL counter")
def test_measure_without_counter_or_watts_is_one_error():
    res = run_script("train.py", "--arch", "DARTS_V2", "--report", "--measure_energy", "--init_channels", "4",
                     "--layers", "3")
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stdout == ""
    assert "--watts" in res.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("cell, problem", [
    ([["sep_conv_9x9", 0], ["skip_connect", 1]] * 4, "sep_conv_9x9"),
    ([["sep_conv_3x3", 0], ["skip_connect", 7]] * 4, "input 7 out of range"),
])
def test_bad_genotype_file_is_one_line_naming_the_problem(tmp_path, cell, problem):
    data = G.to_dict(G.DARTS_V2)
    data["normal"] = cell
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    res = run_script("train.py", "--genotype", str(path), "--report")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert problem in last and "normal[" in last and str(path) in last


def test_imagenet_on_a_tiny_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / "data" / split / cls)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    res = run_script("train.py", "--dataset", "imagenet", "--data", str(tmp_path / "data"), "--arch", "DARTS_V2",
                     "--epochs", "1", "--init_channels", "8", "--layers", "3", "--batch_size", "4",
                     "--image_size", "32", "--log_dir", str(tmp_path), "--run_name", "in", "--wandb", "disabled")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "in"
    args = json.load(open(run / "args.json"))
    # DARTS's ImageNet protocol where not overridden: lr 0.1 x0.97 per epoch, label smoothing 0.1
    assert args["learning_rate"] == 0.1 and args["label_smoothing"] == 0.1 and args["gamma"] == 0.97
    assert args["lr_schedule"] == "exponential" and args["image_size"] == 32
    summary = json.load(open(run / "summary.json"))
    net = build_network(G.DARTS_V2, 8, 2, 3, in_channels=3, image_size=32, imagenet=True).eval()
    assert summary["params"] == sum(p.numel() for p in net.parameters())
    assert summary["energy_mj"] == pytest.approx(1e3 * EnergyEstimator.default().model_energy(
        net, (1, 3, 32, 32)), rel=1e-12)
    assert 0 <= summary["test_acc"] <= 100 and DataInfo(3, 2, 32)
    assert _rows(run / "metrics.jsonl")[0]["epoch"] == 1
