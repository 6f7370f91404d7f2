"""The life of a run, shared by train_search.py and train.py: its folder and log, atomic checkpoints, resume
(flags, schedules, history rows), Ctrl-C / SIGTERM and non-finite values, and the guarded `main` that turns bad
input into one line and an exit status."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Optional, Tuple

import torch

import distributed
from tracker import Tracker, wandb_mode
from utils import CLIError, atomic_torch_save, atomic_write_json, atomic_write_text, read_json

# --------------------------------------------------------------------------------------------- run folder


def make_run_dir(args: argparse.Namespace, script: str) -> str:
    """Create <log_dir>/<run_name>/ (an unwritable log_dir is a CLIError) and return its path."""
    if not args.run_name:
        args.run_name = f"{script}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(args.log_dir, args.run_name)
    if not distributed.is_main():  # torchrun: only rank 0 creates and writes the run folder
        return run_dir
    created = _first_missing(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".probe", delete=True)
        probe.close()
    except OSError as e:
        raise CLIError(f"cannot write to --log_dir {args.log_dir} ({e.strerror}); choose a writable folder") from None
    _NEW_RUN_DIRS[os.path.abspath(run_dir)] = created
    return run_dir


_NEW_RUN_DIRS: Dict[str, Optional[str]] = {}  # run folder -> the topmost folder this process created for it


def _first_missing(path: str) -> Optional[str]:
    """The topmost folder of `path` that does not exist yet (None if `path` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


@contextlib.contextmanager
def discard_on_error(run_dir: str):
    """Set-up of a run: on bad input (CLIError), remove the folders make_run_dir created for it, so a failed
    start leaves nothing half-written. A resumed or pre-existing run folder is never removed."""
    try:
        yield
    except CLIError:
        created = _NEW_RUN_DIRS.pop(os.path.abspath(run_dir), None)
        if created:
            for h in list(logging.getLogger("eadarts").handlers):  # release log.txt before removing it
                if isinstance(h, logging.FileHandler):
                    h.close()
                    logging.getLogger("eadarts").removeHandler(h)
            shutil.rmtree(created, ignore_errors=True)
        raise


def resume_bookkeeping(log: logging.Logger, run_dir: str, ckpt: Dict[str, Any], args: argparse.Namespace,
                       explicit: set) -> None:
    """After a resume has been set up: log which restored flags are overridden (old -> new) and drop the rows
    of epochs after the checkpoint's (a kill between a metrics row and its checkpoint leaves one)."""
    saved = ckpt["args"]
    overridden = [f"{k} {saved[k]!r} -> {getattr(args, k)!r}" for k in sorted(explicit)
                  if k in saved and k != "resume" and saved[k] != getattr(args, k, None)]
    dropped = truncate_history(run_dir, ckpt["epoch"] + 1) if distributed.is_main() else 0
    for name in os.listdir(run_dir) if distributed.is_main() else []:  # temp files of interrupted atomic writes
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(run_dir, name))
    log.info(f"resumed {run_dir} after epoch {ckpt['epoch'] + 1}"
             + (f"; overriding {', '.join(overridden)}" if overridden else "; no overrides (exact resume)")
             + (f"; dropped {dropped} row(s) logged after that checkpoint" if dropped else ""))


def stopped_message(signal_name: str, epoch: int, run_dir: str) -> str:
    """What a run stopped by a signal during `epoch` (0-based) logs: whether and how it can be resumed."""
    if epoch == 0:
        return f"stopped by {signal_name} during epoch 1, before any checkpoint: start it again to run it"
    return (f"stopped by {signal_name} during epoch {epoch + 1}; the checkpoint of epoch {epoch} is intact: "
            f"resume with --resume {run_dir}")


def truncate_history(run_dir: str, last_epoch: int) -> int:
    """On resume: drop metrics.jsonl rows and alphas.json entries after `last_epoch` (1-based), written by a
    run killed after it logged an epoch but before that epoch's checkpoint, and any torn last line.
    Returns how many rows were dropped."""
    dropped = 0
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        keep = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    dropped += 1
                    continue
                if isinstance(row, dict) and row.get("epoch", 0) <= last_epoch:
                    keep.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if dropped:
            atomic_write_text(path, "".join(keep))
    path = os.path.join(run_dir, "alphas.json")
    history = read_json(path)
    if isinstance(history, list):
        kept = [h for h in history if isinstance(h, dict) and h.get("epoch", 0) <= last_epoch]
        if len(kept) != len(history):
            dropped += len(history) - len(kept)
            atomic_write_json(path, kept)
    return dropped


def git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, energy_model_path: Optional[str], estimator) -> Dict[str, Any]:
    """The `env.json` of a run folder."""
    import torchvision
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "energy_model": energy_model_path or "analytical default",
        "energy_model_sha256": estimator.sha256(),
        "energy_batch_size": estimator.batch_size,
        "argv": sys.argv,
    }
    return info


def setup_logging(run_dir: str, rank: int = 0) -> logging.Logger:
    """Log to stdout and <run_dir>/log.txt (rank 0 only writes the file)."""
    log = logging.getLogger("eadarts")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%m/%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if rank == 0:
        fh = logging.FileHandler(os.path.join(run_dir, "log.txt"))
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


# ---------------------------------------------------------------------------------------------- checkpoints


CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str, kind: str, state: Dict[str, Any]) -> None:
    """Atomically write a checkpoint tagged with the script (`kind`) that wrote it."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": kind, **state}, path)


def load_checkpoint(path: str, kind: str) -> Dict[str, Any]:
    """Load with weights_only=True; a missing, corrupt or foreign file is a CLIError."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise CLIError(f"--resume {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CLIError(f"--resume {path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else None
        raise CLIError(f"--resume {path} is not a {kind} checkpoint (found {found!r})")
    return ckpt


def start_run(args: argparse.Namespace, run_dir: str, device: torch.device, estimator, wandb_id: Optional[str],
              log: logging.Logger, project: str = "energy-aware-darts") -> "Tracker":
    """Write args.json and env.json into the run folder and open the wandb run (resumed if `wandb_id`);
    under torchrun only rank 0 does (the other ranks get a disabled tracker)."""
    if not distributed.is_main():
        return Tracker("disabled", run_dir, {}, project, args.run_name)
    atomic_write_json(os.path.join(run_dir, "args.json"), vars(args))
    atomic_write_json(os.path.join(run_dir, "env.json"), environment(device, args.energy_model, estimator))
    log.info(f"args = {vars(args)}")
    return Tracker(wandb_mode(args.wandb), run_dir, vars(args), project, args.run_name, run_id=wandb_id, log=log)


def restored_args(args: argparse.Namespace, explicit: set, script: str):
    """With --resume: the checkpoint and its flags, overridden by those given explicitly; else (None, args)."""
    if not args.resume:
        return None, args
    ckpt = load_checkpoint(args.resume, script)
    return ckpt, merge_resumed_args(ckpt["args"], args, explicit)


def open_run(args: argparse.Namespace, explicit: set, script: str, ckpt: Optional[Dict[str, Any]], make):
    """Start the process group (torchrun), the run folder, the log, the script's runner `make(run_dir, log)` (with
    .device, .estimator, .wandb_id) and the tracker; returns (runner, run_dir, log, tracker)."""
    import distributed
    distributed.init(args.device, args.dist_timeout)  # a no-op without torchrun
    run_dir = make_run_dir(args, script)
    with discard_on_error(run_dir):  # bad input found while setting up leaves no run folder behind
        log = setup_logging(run_dir, distributed.rank())
        runner = make(run_dir, log)
    if ckpt is not None:
        resume_bookkeeping(log, run_dir, ckpt, args, explicit)
    tracker = start_run(args, run_dir, runner.device, runner.estimator, runner.wandb_id, log)
    runner.wandb_id = tracker.run_id
    return runner, run_dir, log, tracker


def run_epochs(runner, tracker: "Tracker") -> Tuple[Dict[str, Any], int]:
    """runner.run under SIGINT/SIGTERM control; returns (result, exit status: 128 + signal when stopped)."""
    with RunControl() as control:
        result = runner.run(tracker, control)
    if result["stopped"]:
        tracker.finish()
        return result, 128 + control.signal_number
    return result, 0


def guarded_main(parser: argparse.ArgumentParser, run, args: argparse.Namespace, explicit: set) -> int:
    """Run a script's body; bad input -> usage + one line + exit 2; a non-finite loss -> one line + exit 3."""
    try:
        return run(args, explicit)
    except CLIError as e:
        parser.print_usage(sys.stderr)
        fail(str(e))
    except NonFiniteError as e:
        fail(str(e), code=3)
    return 1


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and exit: how the scripts report bad input."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "eadarts"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def checkpoint_path(resume: str) -> str:
    """`--resume` takes a checkpoint file or the run folder that holds checkpoint.pt."""
    return os.path.join(resume, "checkpoint.pt") if os.path.isdir(resume) else resume


def merge_resumed_args(saved: Dict[str, Any], given: argparse.Namespace, explicit: set) -> argparse.Namespace:
    """The restored flags, overridden by those given explicitly now; the run continues in the same folder."""
    merged = argparse.Namespace(**{**vars(given), **saved})  # flags newer than the checkpoint keep defaults
    for key in explicit:
        if hasattr(given, key):
            setattr(merged, key, getattr(given, key))
    run_dir = os.path.dirname(os.path.abspath(checkpoint_path(given.resume)))
    merged.resume = given.resume
    merged.log_dir, merged.run_name = os.path.dirname(run_dir), os.path.basename(run_dir)
    return merged


def override_schedule(optimizer: torch.optim.Optimizer, scheduler, args: argparse.Namespace, explicit: set) -> None:
    """After a resume: apply an explicit --learning_rate / --epochs / --learning_rate_min to the restored
    cosine schedule (same position, new curve). Without overrides nothing changes (exact resume)."""
    if not explicit & {"learning_rate", "epochs", "learning_rate_min"}:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        scheduler.base_lrs = [args.learning_rate for _ in optimizer.param_groups]
        scheduler.T_max = args.epochs
        if getattr(args, "learning_rate_min", None) is not None:
            scheduler.eta_min = args.learning_rate_min
        t = scheduler.last_epoch
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = base
            group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * t / args.epochs)) / 2
    else:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"] = args.learning_rate
        scheduler.base_lrs = [args.learning_rate for _ in optimizer.param_groups]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ------------------------------------------------------------------------------------------- run control


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient: the run stops, the last good checkpoint stays."""


class RunControl:
    """Turns SIGINT / SIGTERM into a request to stop after the current step (the last checkpoint is whole),
    and checks losses and gradients for non-finite values."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.signal_number = 0
        self._previous: Dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def _handler(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop_requested, self.signal_number = True, signum

    def __enter__(self) -> "RunControl":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    @staticmethod
    def check_finite(value: float, what: str, epoch: int, step: int) -> None:
        if not math.isfinite(value):
            raise NonFiniteError(f"non-finite {what} ({value}) at epoch {epoch + 1}, step {step}; the last "
                                 f"checkpoint is intact: lower the learning rate and --resume it")
