"""Never lose a run: SIGKILL + --resume is bit-identical to an uninterrupted run (search and training), a kill
during a checkpoint write loses nothing, overrides beside --resume apply, and a NaN stops cleanly (exit 3)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from plumbing import runs
from plumbing import utils
from conftest import ROOT, run_script

TIMING = {"epoch_s", "wall_s"}
ENV = {"OMP_NUM_THREADS": "1"}  # the same thread count in every run of a comparison
# Tiny on purpose (the whole file must stay within ~150 s on 2 cores): 3 layers, 4 channels, 4 candidate ops.
SEARCH = ["train_search.py", "--dataset", "digits", "--layers", "3", "--epochs", "3", "--seed", "0",
          "--wandb", "disabled", "--init_channels", "4", "--primitives", "none,max_pool_3x3,skip_connect,sep_conv_3x3",
          "--eval_channels", "8", "--eval_layers", "3", "--batch_size", "96"]
TRAIN = ["train.py", "--dataset", "digits", "--arch", "DARTS_V2", "--layers", "3", "--init_channels", "8",
         "--seed", "0", "--wandb", "disabled", "--batch_size", "128"]


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def ckpt(run_dir, kind):
    return runs.load_checkpoint(run_dir, kind)


def start(cmd, log_dir, name):
    return subprocess.Popen([sys.executable, *cmd, "--log_dir", str(log_dir), "--run_name", name], cwd=ROOT,
                            env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after(proc, run_dir, k, timeout=300):
    """SIGKILL `proc` as soon as metrics.jsonl has k rows (the checkpoint of epoch k may or may not be written)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= k:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the epoch")


def killed_and_resumed(cmd, tmp_path, kind):
    """An uninterrupted run and one SIGKILLed after epoch 2 then resumed, side by side (in parallel)."""
    full = start(cmd, tmp_path, "full")
    part = start(cmd, tmp_path, "part")
    kill_after(part, tmp_path / "part", 2)
    assert part.returncode == -signal.SIGKILL
    assert full.wait(timeout=600) == 0, full.stderr.read()[-2000:]
    res = run_script(*cmd[:1], "--resume", str(tmp_path / "part"), env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no overrides (exact resume)" in open(tmp_path / "part" / "log.txt").read()
    return tmp_path / "full", tmp_path / "part"


@pytest.mark.slow
def test_search_sigkill_resume_is_bit_identical(tmp_path):
    full, part = killed_and_resumed(SEARCH, tmp_path, "search")
    assert rows(full) == rows(part) and len(rows(part)) == 3  # no duplicate rows after the resume
    a_full, a_part = (json.load(open(d / "alphas.json")) for d in (full, part))
    assert [a["epoch"] for a in a_part] == [1, 2, 3] and a_full == a_part
    g_full, g_part = (json.load(open(d / "genotype.json")) for d in (full, part))
    for key in ("normal", "normal_concat", "reduce", "reduce_concat"):
        assert g_full[key] == g_part[key]
    c_full, c_part = ckpt(full, "search"), ckpt(part, "search")
    for name in ("alphas_normal", "alphas_reduce"):
        assert torch.equal(c_full["model"][name], c_part["model"][name])
    assert all(torch.equal(c_full["model"][k], v) for k, v in c_part["model"].items())


@pytest.mark.slow
def test_train_sigkill_resume_is_bit_identical(tmp_path):
    full, part = killed_and_resumed(TRAIN + ["--epochs", "3"], tmp_path, "train")
    assert rows(full) == rows(part) and len(rows(part)) == 3
    c_full, c_part = ckpt(full, "train"), ckpt(part, "train")
    assert all(torch.equal(c_full["model"][k], v) for k, v in c_part["model"].items())
    s_full, s_part = (json.load(open(d / "summary.json")) for d in (full, part))
    assert s_full["test_acc"] == s_part["test_acc"]


@pytest.mark.slow
def test_train_extend_then_nan_then_resume(tmp_path):
    run = tmp_path / "t"
    res = run_script(*TRAIN, "--epochs", "2", "--log_dir", str(tmp_path), "--run_name", "t", env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    # A kill between an epoch's metrics row and its checkpoint leaves a row the resume must drop.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "train_acc": -1.0}) + "\n")
    res = run_script("train.py", "--resume", str(run), "--epochs", "3", env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3] and rows(run)[2]["train_acc"] >= 0
    log = open(run / "log.txt").read()
    assert "overriding epochs 2 -> 3" in log and "dropped 1 row" in log
    assert json.load(open(run / "summary.json"))["epochs"] == 3
    # NaN: an absurd learning rate on resume stops at once, exit 3, one line, the checkpoint untouched.
    before = open(run / "checkpoint.pt", "rb").read()
    res = run_script("train.py", "--resume", str(run), "--epochs", "4", "--learning_rate", "1e20", env=ENV,
                     timeout=600)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "non-finite" in line and "epoch 4" in line and "step" in line
    assert open(run / "checkpoint.pt", "rb").read() == before
    res = run_script("train.py", "--resume", str(run), "--epochs", "4", "--learning_rate", "0.01", env=ENV,
                     timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3, 4] and rows(run)[3]["lr"] <= 0.01


@pytest.mark.slow
def test_search_nan_from_the_start_exits_3(tmp_path):
    res = run_script(*SEARCH, "--epochs", "1", "--learning_rate", "1e12", "--log_dir", str(tmp_path),
                     "--run_name", "n", env=ENV, timeout=600)
    assert res.returncode == 3 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.count("error:") == 1 and "non-finite" in line and "epoch 1, step" in line


def test_failed_replace_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    runs.save_checkpoint(path, "search", {"epoch": 0, "w": torch.arange(5)})

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(utils.os, "replace", boom)
    with pytest.raises(OSError):
        runs.save_checkpoint(path, "search", {"epoch": 1, "w": torch.zeros(5)})
    monkeypatch.undo()
    c = runs.load_checkpoint(str(tmp_path), "search")
    assert c["epoch"] == 0 and torch.equal(c["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # the temp file was removed


def test_sigkill_between_temp_write_and_rename_loses_nothing(tmp_path):
    """A child writes a checkpoint, then is SIGKILLed inside the second save just before the rename."""
    code = f"""
import os, signal, torch
from plumbing import runs, utils
path = {str(tmp_path / 'checkpoint.pt')!r}
runs.save_checkpoint(path, "train", {{"epoch": 0, "w": torch.ones(3)}})
def die(src, dst):
    assert os.path.getsize(src) > 0  # the new checkpoint is fully written to the temp file
    os.kill(os.getpid(), signal.SIGKILL)
utils.os.replace = die
runs.save_checkpoint(path, "train", {{"epoch": 1, "w": torch.zeros(3)}})
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    left = sorted(os.listdir(tmp_path))
    assert "checkpoint.pt" in left and len(left) == 2 and left[0].startswith(".checkpoint.pt.")  # the orphan temp
    c = runs.load_checkpoint(str(tmp_path), "train")  # the folder resolves to checkpoint.pt, never the temp
    assert c["epoch"] == 0 and torch.equal(c["w"], torch.ones(3))


# ----------------------------------------------------------------------------------- RNG: per device, per rank

def fabricated_rng(cuda_states: int, ranks: int = 0):
    """A checkpoint's "rng" as an 8-GPU (or N-rank) run saved it, made here: the CPU streams of seeds 1, 2, ...
    and `cuda_states` fake GPU states."""
    states = []
    for r in range(max(ranks, 1)):
        utils.set_seed(100 + r)
        state = utils.rng_state(torch.device("cpu"))
        if cuda_states:
            state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(cuda_states)]
        states.append(state)
    return {**states[0], "ranks": states} if ranks else states[0]


def test_rng_saved_with_8_gpus_restores_on_the_cpu_and_on_one_gpu(monkeypatch):
    saved = fabricated_rng(cuda_states=8)
    utils.set_seed(0)
    utils.set_rng_state(saved, torch.device("cpu"))  # 8 CUDA states, none on this machine: no IndexError
    utils.set_seed(100)
    expected = torch.rand(3)
    utils.set_seed(0)
    utils.set_rng_state(saved, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state[0].item(), device)))
    utils.set_rng_state(saved, torch.device("cuda", 0))  # one GPU visible: its own state, index 0
    utils.set_rng_state(saved, torch.device("cuda", 11))  # an index the run never had: the first state
    utils.set_rng_state({**saved, "cuda": torch.full((16,), 5, dtype=torch.uint8)}, torch.device("cuda", 3))
    assert restored == [(0, torch.device("cuda", 0)), (0, torch.device("cuda", 11)), (5, torch.device("cuda", 3))]
    assert utils.device_rng(saved["cuda"], torch.device("cuda", 2))[0] == 2


def test_each_rank_restores_its_own_streams(monkeypatch):
    from plumbing import distributed
    saved = fabricated_rng(cuda_states=0, ranks=2)
    draws = []
    for rank in (0, 1, 2):  # rank 2: a resume on more ranks than saved takes rank 0's (the top level)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        utils.set_rng_state(saved, torch.device("cpu"))
        draws.append(torch.rand(2))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    utils.set_seed(101)
    assert torch.equal(torch.rand(2), draws[1])


def test_loaders_with_workers_resume_exactly():
    """With data-loader workers, a resumed epoch draws the same samples and augmentations: the training loaders
    start their workers each epoch from the restored RNG, and evaluating (persistent workers, own seed) moves
    nothing."""
    import argparse
    from plumbing.datasets import eval_loaders, search_loaders
    from torch.utils.data import Dataset

    class Noisy(Dataset):  # an "augmentation" from every RNG a transform may use
        def __len__(self):
            return 24

        def __getitem__(self, i):
            import numpy as np
            import random
            return torch.tensor([i, torch.rand(()).item(), float(np.random.rand()), random.random()]), i % 2

    args = argparse.Namespace(train_portion=0.5, batch_size=4, workers=2, seed=0, valid_portion=None)
    cpu = torch.device("cpu")

    def epoch(loaders):
        return torch.cat([torch.cat([x for x, _ in q]) for q in loaders])

    def run(resume_at=None):
        utils.set_seed(0)
        train, valid = search_loaders(Noisy(), args, cpu)
        test = eval_loaders(Noisy(), None, Noisy(), args, cpu)[2]
        seen, saved = [], None
        for e in range(3):
            if e == resume_at:  # a fresh process: new loaders, the RNG of the checkpoint
                utils.set_seed(0)
                train, valid = search_loaders(Noisy(), args, cpu)
                test = eval_loaders(Noisy(), None, Noisy(), args, cpu)[2]
                utils.set_rng_state(saved, cpu)
            seen.append(epoch([train, valid]))
            epoch([test])
            saved = utils.rng_state(cpu)
        return seen
    full, resumed = run(), run(resume_at=2)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
    assert not torch.equal(full[1], full[2])
