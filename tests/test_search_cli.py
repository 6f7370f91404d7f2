"""End to end: train_search.py on digits writes the run folder of design.md and offline wandb files."""
import glob
import json
import os

import pytest

import genotypes as G
from conftest import run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("log")
    env = {"WANDB_MODE": "offline"}
    res = run_script("train_search.py", "--dataset", "digits", "--epochs", "2", "--layers", "3", "--seed", "0",
                     "--log_dir", str(log_dir), "--run_name", "s", "--wandb", "offline", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return os.path.join(log_dir, "s"), res


def test_run_folder_has_every_file_and_key(search_run):
    run_dir, _ = search_run
    for name in ("args.json", "env.json", "log.txt", "metrics.jsonl", "genotype.json", "alphas.json",
                 "checkpoint.pt"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("train_acc", "valid_acc", "train_loss", "valid_loss", "expected_energy_mj",
                    "genotype_energy_mj", "lr"):
            assert isinstance(r[key], float), key
        assert 0 <= r["valid_acc"] <= 100 and r["genotype_energy_mj"] > 0
    assert rows[1]["valid_acc"] > 30  # percentages, and it learns
    env = json.load(open(os.path.join(run_dir, "env.json")))
    assert {"python", "torch", "torchvision", "device", "energy_model", "energy_model_sha256"} <= set(env)
    args = json.load(open(os.path.join(run_dir, "args.json")))
    assert args["energy_weight"] == 0.05 and args["task_weight"] == 0.9 and args["layers"] == 3
    alphas = json.load(open(os.path.join(run_dir, "alphas.json")))
    assert len(alphas) == 2 and len(alphas[0]["normal"]) == 14
    assert all(abs(sum(row) - 1) < 1e-5 for row in alphas[-1]["normal"])


def test_genotype_file_loads_back(search_run):
    run_dir, _ = search_run
    path = os.path.join(run_dir, "genotype.json")
    g = G.load(path)
    assert len(g.normal) == 8 and all(op != "none" for op, _ in g.normal + g.reduce)
    meta = json.load(open(path))["meta"]
    assert meta["dataset"] == "digits" and meta["energy_mj"] > 0 and meta["search_run"] == "s"


def test_wandb_offline_wrote_the_logged_keys(search_run):
    run_dir, _ = search_run
    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1, os.listdir(run_dir)
    blobs = b"".join(open(f, "rb").read() for f in glob.glob(os.path.join(runs[0], "*.wandb")))
    for key in (b"valid_acc", b"genotype_energy_mj", b"expected_energy_mj", b"train_loss"):
        assert key in blobs, key
    assert not glob.glob(os.path.join(os.path.dirname(run_dir), "..", "wandb"))  # nothing outside the run folder
    images = glob.glob(os.path.join(runs[0], "files", "media", "images", "**", "*.png"), recursive=True)
    assert len(images) >= 2 * 4  # alphas, curves, two cells, every epoch


def test_run_folder_has_the_figures(search_run):
    run_dir, _ = search_run
    for name in ("alphas.png", "curves.png", "cells/normal.png", "cells/reduce.png", "cells/normal.pdf"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 1000, name


def test_end_of_search_prints_the_report(search_run):
    _, res = search_run
    assert "estimated energy" in res.stdout and "mJ per image" in res.stdout
