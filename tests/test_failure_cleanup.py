"""A failed run keeps its checkpoints: every way a run can end early (a signal in each phase, repeated signals, a
full disk at a later epoch) leaves the folder and its checkpoint once one exists, removes only what the run
created while none does, and ends in one line saying what is on disk. Signals are sent to this process from
inside the run (monkeypatched hooks), so each phase is hit exactly."""
import os
import signal
import subprocess
import sys
import time

import pytest

from plumbing import runs
from plumbing.run import Run
import train
from conftest import ROOT
from test_run_safety import TINY_TRAIN, fill_disk_at, one_error_line

EPOCHS = ["--epochs", "3"]


def argv(log, name="r", *extra):
    return TINY_TRAIN + EPOCHS + ["--log_dir", str(log), "--run_name", name, *extra]


def kill_at(monkeypatch, epoch, step=0, times=1, sig=signal.SIGTERM, where="train_step"):
    """Send `times` signals to this process at (epoch, step) of `train.train_step`, or at the start of epoch
    `epoch`'s evaluation (`Run.evaluate`) or files (`train.write_weights`) (0-based epoch)."""
    owner = Run if where == "evaluate" else train
    real = getattr(owner, where)
    seen = {"epoch": -1, "step": 0}

    def hooked(*a, **k):
        run = next(v for v in a if isinstance(v, Run))
        e = run.epoch
        seen["step"] = seen["step"] + 1 if e == seen["epoch"] else 0
        seen["epoch"] = e
        if e == epoch and seen["step"] == (step if where == "train_step" else 0):
            for _ in range(times):
                os.kill(os.getpid(), sig)
                time.sleep(0.01)  # each handler runs before the next signal is sent
        return real(*a, **k)
    monkeypatch.setattr(owner, where, hooked)


def run_main(args, capsys):
    """(exit status, last stderr line) of train.main, whether it returns or exits."""
    try:
        code = train.main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, (one_error_line(err) if code not in (0, 128 + signal.SIGTERM) or "error:" in err else err)


def epochs_of(folder):
    return runs.load_checkpoint(str(folder), "train")["epoch"] + 1


def test_a_signal_during_set_up_acts_at_once_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def slow_load(*a, **k):  # a slow data set: the signal must not wait for the first step
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        raise AssertionError("the signal was not acted on during set-up")
    monkeypatch.setattr(train, "load_dataset", slow_load)
    code, err = run_main(argv(tmp_path / "log"), capsys)
    assert code == 128 + signal.SIGTERM and "during set-up" in err and "nothing was kept" in err, err
    assert not (tmp_path / "log").exists()  # the log folder was this run's too


def test_a_signal_in_the_first_epoch_removes_only_this_run(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log"
    real = runs.RunFolder.__enter__

    def enter(self):  # a parallel run appears beside this one once the log folder exists
        out = real(self)
        os.makedirs(log / "other")
        (log / "other" / "args.json").write_text("{}")
        return out
    monkeypatch.setattr(runs.RunFolder, "__enter__", enter)
    kill_at(monkeypatch, epoch=0, step=1)
    code, _ = run_main(argv(log), capsys)
    assert code == 128 + signal.SIGTERM
    assert sorted(os.listdir(log)) == ["other"] and (log / "other" / "args.json").exists()


@pytest.mark.parametrize("times,code", [(1, 128 + signal.SIGTERM), (2, 130), (6, 130)])
def test_signals_after_the_first_checkpoint_keep_it(tmp_path, monkeypatch, capsys, times, code):
    """One SIGTERM (stop after the step), a double Ctrl-C-like pair and a burst of six: the folder stays."""
    log = tmp_path / "log"
    kill_at(monkeypatch, epoch=1, step=1, times=times)
    got, err = run_main(argv(log), capsys)
    assert got == code, err
    assert epochs_of(log / "r") == 1
    if code == 130:
        assert "keeps its checkpoint of epoch 1" in err and "--resume" in err, err
    monkeypatch.undo()
    assert train.main(["--resume", str(log / "r")]) == 0
    assert epochs_of(log / "r") == 3


def test_a_double_signal_in_the_first_epoch_says_nothing_was_kept(tmp_path, monkeypatch, capsys):
    kill_at(monkeypatch, epoch=0, step=0, times=2, sig=signal.SIGINT)
    code, err = run_main(argv(tmp_path), capsys)
    assert code == 130 and "nothing was kept" in err, err
    assert not os.listdir(tmp_path)


def test_a_signal_during_evaluation_or_the_epoch_files_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    kill_at(monkeypatch, epoch=1, where="evaluate")  # during epoch 2's evaluation: no row, no checkpoint of it
    code, _ = run_main(argv(tmp_path, "e"), capsys)
    assert code == 128 + signal.SIGTERM and epochs_of(tmp_path / "e") == 1
    assert len(open(tmp_path / "e" / "metrics.jsonl").read().splitlines()) == 1
    monkeypatch.undo()
    kill_at(monkeypatch, epoch=1, where="write_weights")  # during epoch 2's files: its checkpoint is still written
    code, _ = run_main(argv(tmp_path, "w"), capsys)
    assert code == 128 + signal.SIGTERM and epochs_of(tmp_path / "w") == 2


def test_a_signal_while_resuming_keeps_the_folder(tmp_path, monkeypatch, capsys):
    kill_at(monkeypatch, epoch=1, step=0)
    run_main(argv(tmp_path), capsys)
    monkeypatch.undo()
    real = train.load_dataset

    def load(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(train, "load_dataset", load)
    code, err = run_main(["--resume", str(tmp_path / "r")], capsys)
    assert code == 128 + signal.SIGTERM and "keeps its checkpoint of epoch 1" in err, err
    assert epochs_of(tmp_path / "r") == 1


def test_a_full_disk_at_a_later_epoch_keeps_the_folder_and_says_so(tmp_path, monkeypatch, capsys):
    fill_disk_at(monkeypatch, 2)  # the checkpoint of epoch 2
    code, err = run_main(argv(tmp_path), capsys)
    assert code == 2 and "No space left" in err and "keeps its checkpoint of epoch 1" in err, err
    assert epochs_of(tmp_path / "r") == 1 and not [f for f in os.listdir(tmp_path / "r") if f.endswith(".tmp")]
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "r")]) == 0 and epochs_of(tmp_path / "r") == 3


def test_a_full_disk_before_any_checkpoint_removes_the_folder(tmp_path, monkeypatch, capsys):
    fill_disk_at(monkeypatch, 1)
    code, err = run_main(argv(tmp_path), capsys)
    assert code == 2 and "nothing was kept" in err, err
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_a_burst_of_sigterms_in_a_real_process_keeps_the_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_TRAIN, "--epochs", "50", "--log_dir", str(tmp_path),
                             "--run_name", "b"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    t0 = time.time()
    while not (tmp_path / "b" / "checkpoint.pt").exists() and time.time() - t0 < 300:
        time.sleep(0.05)
    for _ in range(5):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    # The burst's last signals may land after the run has handed its handlers back (its line already printed):
    # the default action then ends the process (-SIGTERM), with nothing left to write.
    assert proc.returncode in (130, 128 + signal.SIGTERM, -signal.SIGTERM) and "Traceback" not in err, err[-2000:]
    assert "no run folder was written" not in err, err[-2000:]  # never a false word of what is on disk
    assert "keeps its checkpoint of epoch" in err or proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), \
        err[-2000:]
    assert epochs_of(tmp_path / "b") >= 1


def test_a_signal_during_a_search_evaluation_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import train_search
    from test_run_safety import TINY_SEARCH
    real, calls = Run.evaluate, []

    def evaluate(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # epoch 2's evaluation: its first batch sees the stop
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)
    monkeypatch.setattr(Run, "evaluate", evaluate)
    code = train_search.main(TINY_SEARCH + ["--epochs", "2", "--log_dir", str(tmp_path), "--run_name", "s",
                                            "--train_portion", "0.2"])
    assert code == 128 + signal.SIGTERM
    assert runs.load_checkpoint(str(tmp_path / "s"), "search")["epoch"] == 0
    assert len(open(tmp_path / "s" / "metrics.jsonl").read().splitlines()) == 1
