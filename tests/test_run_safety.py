"""Never lose finished work: a run folder belongs to one run (refused when it holds a run, locked while in use,
plain names only, nothing left by a failed start), early stop survives --resume, and damaged or hostile files end
in one error line with exit 2 (a fuzz over mutated genotype, args and checkpoint files), never a traceback."""
import copy
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import pareto
from plumbing import runs
import train
import train_search
from conftest import ROOT, run_script

TINY_TRAIN = ["--dataset", "digits", "--arch", "DARTS_V2", "--layers", "3", "--init_channels", "4", "--epochs", "1",
              "--batch_size", "256", "--wandb", "disabled"]
TINY_SEARCH = ["--dataset", "digits", "--layers", "3", "--init_channels", "4", "--batch_size", "96", "--wandb",
               "disabled", "--primitives", "none,max_pool_3x3,skip_connect,sep_conv_3x3", "--eval_channels", "4",
               "--eval_layers", "3"]


def one_error_line(err: str, word: str = "") -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].count("error:") == 1 and word in lines[-1], err[-3000:]
    return lines[-1]


def exits_2(main, argv, capsys, word=""):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, argv
    return one_error_line(capsys.readouterr().err, word)


def snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 1-epoch training run."""
    log = tmp_path_factory.mktemp("own")
    assert train.main(TINY_TRAIN + ["--log_dir", str(log), "--run_name", "t"]) == 0
    return log, log / "t"


def test_a_new_run_refuses_a_folder_that_holds_a_run(trained, capsys):
    log, run = trained
    before = snapshot(run)
    line = exits_2(train.main, TINY_TRAIN + ["--log_dir", str(log), "--run_name", "t", "--seed", "1"], capsys)
    assert "--resume" in line and "--run_name" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", ".hidden", "a\\b"])
def test_run_name_is_a_plain_name(tmp_path, capsys, name):
    exits_2(train.main, TINY_TRAIN + ["--log_dir", str(tmp_path / "log"), "--run_name", name], capsys,
            "--run_name" if name else "")
    assert not os.path.exists(tmp_path / "escape") and not os.listdir(tmp_path)


def test_a_folder_in_use_is_refused_and_a_stale_lock_is_not(trained, capsys):
    import fcntl
    log, run = trained
    with open(run / ".lock", "a+") as f:  # another process holds the run
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = exits_2(train.main, ["--resume", str(run), "--epochs", "2"], capsys, "in use")
        assert "pid" in line
    (run / ".lock").write_text("999999")  # a killed run's lock file: no one holds the flock
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 0
    assert [json.loads(r)["epoch"] for r in open(run / "metrics.jsonl")] == [1, 2]


def test_resuming_a_finished_run_changes_nothing(trained, capsys):
    _, run = trained
    before = snapshot(run)
    assert train.main(["--resume", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(run) == before


def test_damaged_checkpoints_are_one_line(trained, tmp_path, capsys):
    _, run = trained
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    cases = {"no-model": lambda c: c.pop("model"), "model-text": lambda c: c.__setitem__("model", "x"),
             "epoch-text": lambda c: c.__setitem__("epoch", "3"), "args-list": lambda c: c.__setitem__("args", []),
             "bad-flag": lambda c: c["args"].__setitem__("learning_rate", "fast"),
             "foreign-state": lambda c: c.__setitem__("model", {"w": torch.zeros(2)}),
             "no-rng": lambda c: c.pop("rng"), "genotype-list": lambda c: c.__setitem__("genotype", [1])}
    for name, mutate in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        c = copy.deepcopy(good)
        mutate(c)
        c["epoch"] = c.get("epoch") if name == "epoch-text" else 0
        torch.save(c, folder / "checkpoint.pt")
        exits_2(train.main, ["--resume", str(folder), "--epochs", "2"], capsys)
        assert sorted(os.listdir(folder)) == ["checkpoint.pt"] or not any(
            f.endswith(".jsonl") for f in os.listdir(folder)), name


def test_weights_need_measure_energy_and_must_be_a_state_dict(trained, tmp_path, capsys):
    _, run = trained
    exits_2(train.main, ["--dataset", "digits", "--arch", "DARTS_V2", "--report", "--weights",
                         str(run / "weights.pt")], capsys, "--measure_energy")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for bad in (tmp_path / "list.pt", tmp_path):
        exits_2(train.main, ["--dataset", "digits", "--arch", "DARTS_V2", "--report", "--measure_energy",
                             "--watts", "10", "--weights", str(bad)], capsys, "--weights")


def fill_disk_at(monkeypatch, nth: int) -> None:
    """From the `nth` checkpoint written on (1-based), renaming it into place fails with a full disk."""
    import errno
    from plumbing import utils
    real, calls = utils.os.replace, []

    def full(src, dst):
        if dst.endswith("checkpoint.pt"):
            calls.append(dst)
            if len(calls) >= nth:
                raise OSError(errno.ENOSPC, "No space left on device", dst)
        return real(src, dst)
    monkeypatch.setattr(utils.os, "replace", full)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(trained, monkeypatch, capsys):
    _, run = trained
    train.main(["--resume", str(run), "--epochs", "3"])  # a third epoch: the folder has a checkpoint of epoch 3
    capsys.readouterr()
    before = open(run / "checkpoint.pt", "rb").read()
    fill_disk_at(monkeypatch, 1)
    exits_2(train.main, ["--resume", str(run), "--epochs", "4"], capsys, "No space left")
    assert open(run / "checkpoint.pt", "rb").read() == before
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ early stop
@pytest.mark.slow
def test_an_early_stopped_search_stays_stopped(tmp_path):
    argv = TINY_SEARCH + ["--epochs", "6", "--early_stop", "--patience", "1", "--log_dir", str(tmp_path),
                          "--run_name", "es", "--train_portion", "0.2"]
    res = run_script("train_search.py", *argv, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "es"
    meta = json.load(open(run / "genotype.json"))["meta"]
    assert "early_stop" in meta
    epochs = len(open(run / "metrics.jsonl").read().splitlines())
    assert epochs < 6
    ckpt = runs.load_checkpoint(str(run), "search")
    assert ckpt["stopped_early"] and ckpt["stopper"]["stopped"] and ckpt["stopper"]["result"]["genotype"]
    before = snapshot(run)
    res = run_script("train_search.py", "--resume", str(run), timeout=600)
    assert res.returncode == 0 and "stopped early" in res.stdout and "nothing to do" in res.stdout
    assert snapshot(run) == before
    assert pareto.search_finished(str(run))


def test_the_stopper_keeps_the_least_collapsed_epoch_when_none_is_healthy():
    from collections import namedtuple
    from derivation import CollapseStopper
    Geno = namedtuple("Geno", "normal reduce")
    stop = CollapseStopper(consecutive=3)
    cells = [Geno([("skip_connect", 0)] * k + [("sep_conv_3x3", 1)] * (8 - k), []) for k in (5, 3, 4)]
    fired = [stop.update(e, g, result={"genotype": {"e": e}, "row": {}}) for e, g in enumerate(cells, 1)]
    assert fired == [False, False, True]
    assert stop.result_epoch == 2 and "least collapsed" in stop.reason
    again = CollapseStopper(consecutive=3)
    again.load_state_dict(json.loads(json.dumps(stop.state_dict())))
    assert again.state_dict() == stop.state_dict()


# ---------------------------------------------------------------------------------------- hostile files
def mutations(obj, rng, n, odd=None):
    """`n` mutated copies of a JSON object (or a checkpoint: tensors are leaves): values replaced by other types
    (`odd`), keys dropped, deep nesting."""
    odd = odd or [None, True, -1, 0, 1e308, "x", [], {}, [[[]]], "9" * 5000, {"a": [1, {"b": None}]}]
    paths = []

    def walk(o, path):
        paths.append(path)
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o[:3]):
                walk(v, path + [i])
    walk(obj, [])
    out = []
    for _ in range(n):
        m = copy.deepcopy(obj)
        path = rng.choice(paths[1:])
        parent = m
        for p in path[:-1]:
            parent = parent[p]
        if isinstance(parent, dict) and rng.random() < 0.3:
            parent.pop(path[-1])
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(odd))
        out.append(m)
    return out


def test_fuzzed_genotype_files_load_or_fail_with_one_line(tmp_path):
    import genotypes as G
    good = G.to_dict(G.DARTS_V2, G.PRIMITIVES, {"dataset": "digits", "eval_channels": 8, "eval_layers": 3})
    rng = random.Random(0)
    texts = [json.dumps(m) for m in mutations(good, rng, 150)]
    texts += ["[" * 100000 + "]" * 100000, '{"format": 1, "normal": ' + "9" * 100000 + "}", "\xff\xfe", "",
              json.dumps({**good, "format": 1e400}) if False else '{"format": NaN}']
    for i, text in enumerate(texts):
        path = tmp_path / f"g{i}.json"
        path.write_text(text, errors="surrogateescape") if isinstance(text, str) else path.write_bytes(text)
        try:
            G.load_with_meta(str(path))
        except G.GenotypeError as e:
            assert "\n" not in str(e) and str(path) in str(e)


def test_fuzzed_genotype_files_through_train_and_pareto(tmp_path):
    """A sample of mutations through the real CLIs: exit 0 or 2 with one line, never a traceback."""
    import genotypes as G
    good = G.to_dict(G.DARTS_V2, G.PRIMITIVES, {"dataset": "digits", "eval_channels": 4, "eval_layers": 3})
    rng = random.Random(1)
    for i, m in enumerate(mutations(good, rng, 6)):
        path = tmp_path / f"g{i}.json"
        path.write_text(json.dumps(m))
        res = run_script("train.py", "--dataset", "digits", "--genotype", str(path), "--report", "--init_channels",
                         "4", "--layers", "3", timeout=300)
        assert res.returncode in (0, 2), res.stderr[-2000:]
        if res.returncode:
            one_error_line(res.stderr)


def test_damaged_run_folders_for_pareto_are_one_line(trained, tmp_path, capsys):
    import genotypes as G
    run = tmp_path / "r"
    run.mkdir()
    G.save(G.DARTS_V2, str(run / "genotype.json"), G.PRIMITIVES, {"dataset": "digits", "eval_channels": 4,
                                                                  "eval_layers": 3})
    for args_text in ('{"energy_weight": "heavy", "seed": 0, "epochs": 1}', "[1, 2]", "{bad json",
                      '{"energy_weight": 0.1, "seed": [0], "epochs": 1}'):
        (run / "args.json").write_text(args_text)
        exits_2(pareto.main, ["--from", str(run), "--log_dir", str(tmp_path / "out"), "--run_name", "p",
                              "--wandb", "disabled"], capsys)


@pytest.mark.parametrize("argv,word", [(["--energy_weights", "nan"], "energy_weights"),
                                       (["--energy_weights", "inf,0.1"], "energy_weights"),
                                       (["--no_such_flag", "3"], "no_such_flag"),
                                       (["--layers", "2"], "--layers 2"),
                                       (["--seed", "4"], "--seed"),
                                       (["--train", "--train_args", "--epochs zero"], "epochs"),
                                       (["--train", "--train_args", "'unbalanced"], "train_args")])
def test_pareto_checks_its_flags_before_launching(tmp_path, capsys, argv, word):
    with pytest.raises(SystemExit) as exc:
        pareto.main(["--dataset", "digits", "--log_dir", str(tmp_path), "--run_name", "p", "--wandb", "disabled",
                     *argv])
    assert exc.value.code == 2
    one_error_line(capsys.readouterr().err, word)
    assert not os.path.exists(tmp_path / "p" / "w0-s0")


# ------------------------------------------------------------------------------------------- image folders
def image_folder(root, classes, corrupt=False):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    if corrupt:
        (root / "train" / classes[0] / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.mark.parametrize("classes,corrupt,word", [(["only"], False, "two"), (["a", "b"], True, "broken.png")])
def test_image_folder_problems_are_one_line(tmp_path, capsys, classes, corrupt, word):
    data = image_folder(tmp_path / "data", classes, corrupt)
    exits_2(train.main, ["--dataset", "imagefolder", "--data", str(data), "--arch", "DARTS_V2", "--layers", "3",
                         "--init_channels", "4", "--epochs", "1", "--batch_size", "2", "--image_size", "12",
                         "--log_dir", str(tmp_path / "log"), "--run_name", "i", "--wandb", "disabled"], capsys, word)
    assert not os.path.exists(tmp_path / "log" / "i")


# ------------------------------------------------------------------------------------------ signals, memory
@pytest.mark.slow
def test_a_second_ctrl_c_exits_130_without_a_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_TRAIN, "--epochs", "50", "--log_dir", str(tmp_path),
                             "--run_name", "c"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "c" / "metrics.jsonl"
    t0 = time.time()
    while not metrics.exists() and time.time() - t0 < 300:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (130, 128 + signal.SIGINT), err[-2000:]
    assert "Traceback" not in err
    assert runs.load_checkpoint(str(tmp_path / "c"), "train")["epoch"] >= 0


def test_an_energy_batch_too_big_to_allocate_is_one_line(capsys):
    """Estimates at a huge deployment batch need no memory (features extrapolate from batches 1-3); measuring at
    one that cannot be allocated is one line."""
    assert train.main(["--dataset", "digits", "--arch", "DARTS_V2", "--report", "--energy_batch_size",
                       "100000000"]) == 0
    exits_2(train.main, ["--dataset", "digits", "--arch", "DARTS_V2", "--report", "--measure_energy", "--watts", "5",
                         "--energy_batch_size", "1000000000"], capsys, "memory")


def test_a_signal_in_the_first_epoch_leaves_no_folder(tmp_path):
    proc = subprocess.Popen([sys.executable, "train_search.py", *TINY_SEARCH, "--epochs", "5", "--log_dir",
                             str(tmp_path), "--run_name", "s"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (tmp_path / "s" / "args.json").exists() and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if (tmp_path / "s" / "checkpoint.pt").exists():  # the first epoch ended before the signal: kept, resumable
        return
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert not (tmp_path / "s").exists()
    assert train_search.main(TINY_SEARCH + ["--epochs", "1", "--log_dir", str(tmp_path), "--run_name", "s"]) == 0
