"""The life of a run, shared by train_search.py and train.py: its folder and log, atomic checkpoints, resume
(flags, schedules, history rows), Ctrl-C / SIGTERM and non-finite values, and the guarded `main` that turns bad
input into one line and an exit status."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Optional

import torch

from plumbing import distributed
from plumbing import jsonfile
from plumbing.tracker import Tracker, wandb_mode
from plumbing.cliargs import CLIError, check, fail
from plumbing.utils import atomic_torch_save, atomic_write_json, atomic_write_text

# --------------------------------------------------------------------------------------------- run folder


PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.=+,@-]{1,200}$")
# Files that hold finished work: a new run never writes over a folder that has one (it is --resume'd instead).
WORK_FILES = ("checkpoint.pt", "metrics.jsonl", "genotype.json", "summary.json", "weights.pt", "alphas.json")


def check_run_name(name: str) -> str:
    """`--run_name` is a plain folder name inside --log_dir: no path separators, no `..`, no hidden name."""
    if not PLAIN_NAME.match(name) or name.startswith(".") or ".." in name:
        raise CLIError(f"--run_name {name!r} is not a plain name (letters, digits and _ . = + , @ -, not starting "
                       f"with '.', no '..' or path separators); the run goes to <log_dir>/<run_name>/")
    return name


class RunFolder:
    """`<log_dir>/<run_name>/`, owned by one run for its lifetime (a context manager).

    Entering it creates the folder and takes an exclusive lock on `<folder>/.lock` (flock: the kernel drops the
    lock of a killed process, so a stale lock never blocks a resume). A second process on the same folder is
    refused, and so is a new run (not --resume) in a folder that holds finished work (`WORK_FILES`). On leaving,
    a folder this process created is removed again only while nothing in it holds work (no checkpoint: bad input,
    a failure or a stop during set-up or the first epoch), so a failed start leaves nothing behind and the same
    command can be run again; once a checkpoint exists nothing is ever removed. Only what this process created
    goes: the run folder, then each parent it made as long as that is empty. `on_disk` says afterwards what is
    left (the failure's message ends with it). `reuse=True` (pareto's sweep folder) lets a new process continue
    a folder that holds work."""

    def __init__(self, args: argparse.Namespace, script: str, resume: bool = False, reuse: bool = False) -> None:
        if not args.run_name:
            args.run_name = f"{script}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_run_name(args.run_name)
        check_log_dir(args.log_dir)
        self.path = os.path.join(args.log_dir, args.run_name)
        self.log_dir, self.resume, self.reuse = args.log_dir, resume, reuse
        self.created: Optional[str] = None
        self.on_disk = f"nothing was written to {self.path}"
        self.entered = False
        self._lock = None

    def __enter__(self) -> "RunFolder":
        if not distributed.is_main():  # torchrun: only rank 0 creates, locks and writes the run folder
            return self
        created = _first_missing(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
            self._lock = open(os.path.join(self.path, ".lock"), "a+", encoding="utf-8")
        except OSError as e:
            raise CLIError(f"cannot write to --log_dir {self.log_dir} ({e.strerror}); choose a writable "
                           f"folder") from None
        self.created = created
        try:
            self._take_lock()
            work = [f for f in WORK_FILES if os.path.exists(os.path.join(self.path, f))]
            if work and not (self.resume or self.reuse):
                raise CLIError(f"run folder {self.path} already holds a run ({', '.join(work)}): continue it "
                               f"with --resume {self.path}, or choose a fresh --run_name")
        except BaseException:
            self._close(failed=True)
            raise
        self.entered = True
        return self

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the folder checks still hold
            return
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "?"
            raise CLIError(f"run folder {self.path} is in use by another run (pid {owner}); wait for it to end, "
                           f"or choose a fresh --run_name") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(failed=exc_type is not None)
        if exc is not None and self.entered:  # the failure's one line ends with what is on disk (guarded_main)
            try:
                exc.on_disk, exc.kept_work = self.on_disk, bool(held_work(self.path))
            except AttributeError:
                pass

    def _close(self, failed: bool) -> None:
        if not distributed.is_main():
            return
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
        work = held_work(self.path)
        logs = self.reuse and os.path.isdir(self.path) and set(os.listdir(self.path)) - {".lock", "log.txt", "wandb"}
        if self.created and not work and not logs and (failed or not self.reuse):
            release_log_file()
            shutil.rmtree(self.path, ignore_errors=True)
            _remove_empty_parents(self.path, self.created)
            self.on_disk = f"nothing was kept ({self.path} held no checkpoint yet and was removed)"
        elif work:
            self.on_disk = describe_work(self.path, work)
        elif logs:  # a sweep whose runs all failed: their logs say why
            self.on_disk = f"{self.path} keeps the sweep's logs ({', '.join(sorted(logs)[:5])})"
        elif os.path.isdir(self.path):
            self.on_disk = f"{self.path} holds no checkpoint"
        self.created = None


def check_output_file(path: Optional[str], flag: str, force: bool = False, inputs=()) -> str:
    """`path` if a script may write its `flag` output there (`output_file_problem`), else a CLIError: never a
    file of a run folder or one of the `inputs`, an existing file only with --force, never empty. Checked before
    any work starts."""
    from dl_energy_estimator.runner import output_file_problem
    problem = output_file_problem(path, flag, force, inputs)
    if problem:
        raise CLIError(problem)
    return path


def check_log_dir(log_dir: str) -> None:
    """`--log_dir` names a folder: not empty (the current folder would fill with runs), not a file."""
    if not isinstance(log_dir, str) or not log_dir.strip():
        raise CLIError("--log_dir is empty; name the folder that holds the runs (default ./log)")
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise CLIError(f"--log_dir {log_dir} is a file, not a folder; name the folder that holds the runs")


def held_work(path: str) -> list:
    """The checkpoints under `path` (a run folder, or a sweep folder holding runs): what a failure never removes."""
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "wandb"]
        found += [os.path.join(folder, f) for f in files if f == "checkpoint.pt"]
    return sorted(found)


def describe_work(path: str, checkpoints: list) -> str:
    """What a failed or stopped run leaves: its checkpoint (and epoch), or a sweep's runs with checkpoints."""
    own = os.path.join(path, "checkpoint.pt")
    if checkpoints == [own]:
        epoch = checkpoint_epoch(own)
        what = f"its checkpoint of epoch {epoch}" if epoch is not None else "its checkpoint.pt"
        return f"{path} keeps {what}: continue with --resume {path}"
    return f"{path} keeps {len(checkpoints)} run(s) with checkpoints: run the same command again to continue"


def checkpoint_epoch(path: str) -> Optional[int]:
    """The 1-based epoch a checkpoint file holds (None if it cannot be read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["epoch"]) + 1
    except Exception:  # noqa: BLE001 - only for a message: an unreadable file is described without its epoch
        return None


def _remove_empty_parents(path: str, top: str) -> None:
    """Remove the parents of `path` up to `top` (those this process created), each only while it is empty: a
    parallel run's folder beside ours is never touched."""
    top, folder = os.path.abspath(top), os.path.dirname(os.path.abspath(path))
    while len(folder) >= len(top) and folder.startswith(top):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)


def release_log_file() -> None:
    """Close log.txt (before its folder is removed)."""
    log = logging.getLogger("eadarts")
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            log.removeHandler(h)


def _first_missing(path: str) -> Optional[str]:
    """The topmost folder of `path` that does not exist yet (None if `path` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


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
    history = jsonfile.read(path, "alphas file", None)
    if isinstance(history, list):
        kept = [h for h in history if isinstance(h, dict) and h.get("epoch", 0) <= last_epoch]
        if len(kept) != len(history):
            dropped += len(history) - len(kept)
            atomic_write_json(path, kept)
    return dropped


def last_row(run_dir: str) -> Dict[str, Any]:
    """The last row of a run's metrics.jsonl ({} if it has none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = jsonfile.read_lines(path, "metrics file") if os.path.isfile(path) else []
    return rows[-1] if rows else {}


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
    """Load with weights_only=True; a missing, corrupt or foreign file is a CLIError. Checks `epoch` up front;
    `field` checks the other keys where they are used."""
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
    ckpt["path"] = path
    epoch = field(ckpt, "epoch", int)
    if epoch < 0:
        raise CLIError(f"--resume {path}: 'epoch' is {epoch}, not an epoch index")
    check_checkpoint(ckpt)
    return ckpt


def check_checkpoint(ckpt: Dict[str, Any]) -> None:
    """What a damaged checkpoint can get wrong that loading it would not notice: an epoch beyond its run's
    --epochs (or any bound), non-finite weights or alphas (the first step would be NaN), an RNG state that
    does not fit (`check_rng_state`). Each is one CLIError naming the checkpoint."""
    where = f"--resume {ckpt['path']} (a damaged checkpoint)"
    epoch = ckpt["epoch"] + 1
    check("epochs", epoch, f"{where}: its epoch")
    saved = ckpt.get("args")
    epochs = saved.get("epochs") if isinstance(saved, dict) else None
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epoch > epochs:
        raise CLIError(f"{where}: it claims epoch {epoch} of a run of {epochs} epochs")
    acc, wall = ckpt.get("best_valid_acc"), ckpt.get("wall_s")
    if isinstance(acc, (int, float)) and not isinstance(acc, bool) and not -1 <= acc <= 100:
        raise CLIError(f"{where}: best_valid_acc {acc} is not a percentage")
    if isinstance(wall, (int, float)) and not isinstance(wall, bool) and not 0 <= wall < 1e9:
        raise CLIError(f"{where}: wall_s {wall} is not a duration")
    for key in ("model", "optimizer", "arch_optimizer"):
        bad = _non_finite(ckpt.get(key), key)
        if bad:
            raise CLIError(f"{where}: {bad} holds NaN or infinite values; resume an earlier copy or start again")
    if "rng" in ckpt:
        check_rng_state(ckpt["rng"], where)


def _non_finite(value: Any, name: str) -> Optional[str]:
    """The name of the first floating tensor in a (nested) state holding a NaN or infinity, else None."""
    stack = [(name, value)]
    while stack:
        name, v = stack.pop()
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return name
        elif isinstance(v, dict):
            stack.extend((f"{name}.{k}", x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{name}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            return name
    return None


def check_rng_state(state: Any, where: str) -> None:
    """A checkpoint's RNG states have the shapes `utils.set_rng_state` needs (Python's Mersenne twister: 625
    words; NumPy's: 'MT19937', 624 keys and a position; torch's CPU state: as long as this torch's; each CUDA
    state a non-empty byte tensor), so a damaged one is this line, not a crash when the epochs start."""
    def bad(what: str):
        raise CLIError(f"{where}: its RNG state {what}")
    if not isinstance(state, dict) or not state:
        bad("is empty or not an object")
    py = state.get("python")
    if not (isinstance(py, (list, tuple)) and len(py) == 3 and isinstance(py[1], (list, tuple)) and len(py[1]) == 625
            and all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 2 ** 32 for w in py[1])):
        bad("of Python's random is not 625 32-bit words")
    np_state = state.get("numpy")
    if not (isinstance(np_state, (list, tuple)) and len(np_state) == 5 and np_state[0] == "MT19937"
            and isinstance(np_state[1], torch.Tensor) and np_state[1].numel() == 624
            and isinstance(np_state[2], int) and 0 <= np_state[2] <= 624):
        bad("of NumPy is not an MT19937 state of 624 keys")
    cpu = state.get("torch")
    if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.numel() == torch.get_rng_state().numel()):
        bad(f"of torch is not a byte tensor of {torch.get_rng_state().numel()} (this torch's CPU generator)")
    cuda, tensors = state.get("cuda"), []
    stack = [cuda] if cuda is not None else []
    while stack:  # a list per device (or per rank and device): every leaf a non-empty byte tensor
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            tensors.append(v)
    if cuda is not None and (not tensors or any(not isinstance(t, torch.Tensor) or t.dtype != torch.uint8
                                                or t.numel() == 0 for t in tensors)):
        bad("of CUDA is not a list of byte tensors, one per device")
    ranks = state.get("ranks")  # torchrun: every rank's own streams (utils.rng_state), each of the same form
    if ranks is not None:
        if not isinstance(ranks, list) or not ranks or any(isinstance(r, dict) and "ranks" in r for r in ranks):
            bad("has a 'ranks' entry that is not a list of per-rank states")
        for i, r in enumerate(ranks):
            check_rng_state(r, f"{where} (rank {i})")


_MISSING = object()


def field(ckpt: Dict[str, Any], key: str, types, default: Any = _MISSING) -> Any:
    """`ckpt[key]` if it has one of `types` (bools are not numbers); else the default (when the key is absent or
    null and one is given) or a CLIError naming the checkpoint and the key."""
    where = f"--resume {ckpt.get('path', 'checkpoint')} (a damaged checkpoint)"
    return jsonfile.get(ckpt, key, types, where) if default is _MISSING else \
        jsonfile.get(ckpt, key, types, where, default)


def load_state(target, state: Any, what: str) -> None:
    """`target.load_state_dict(state)` with a damaged or foreign state as one CLIError line."""
    try:
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a state dict")
        target.load_state_dict(state)
        if isinstance(target, torch.optim.Optimizer):
            _check_optimizer_state(target)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"{what} in the checkpoint does not fit this run ({first[:300]})") from None


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """load_state_dict takes any per-parameter state: each must be an object of tensors (momentum buffers, Adam's
    moments: the parameter's shape) and numbers, or the first step fails deep inside torch; so must each group's
    hyperparameters (a momentum of None, a learning rate of text) be of the kind of the optimizer's defaults."""
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():
            _check_hyperparameter(key, group.get(key), default)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if not isinstance(state, dict):
                raise TypeError(f"a parameter's state is a {type(state).__name__}, not an object")
            for name, v in state.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(f"'{name}' has shape {tuple(v.shape)} for a parameter of {tuple(p.shape)}")
                if not isinstance(v, (torch.Tensor, int, float)) and v is not None:
                    raise TypeError(f"'{name}' is a {type(v).__name__}")


def _check_hyperparameter(key: str, value: Any, default: Any) -> None:
    """`value` (an optimizer group's `key`) is of the kind of its default: a finite number, a bool, or a tuple of
    finite numbers (Adam's betas); options whose default is None (foreach, fused) are torch's to check."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = number(value) or isinstance(value, torch.Tensor) and value.numel() == 1 and bool(value.isfinite())
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(number, value))
    else:
        return
    if not ok:
        raise TypeError(f"its hyperparameter '{key}' is {str(value)[:40]}, not like the default {default}")


def validate_saved_args(parser: argparse.ArgumentParser, saved: Dict[str, Any], where: str) -> None:
    """Flags restored from a checkpoint or args.json must still be values the parser accepts: a damaged file is
    one CLIError naming the flag, not a crash later."""
    for action in parser._actions:
        if action.dest not in saved or action.dest == "help":
            continue
        value = saved[action.dest]
        if value is None or isinstance(value, list) and action.dest == "primitives":
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            ok = isinstance(value, bool)
        elif action.choices is not None:
            ok = isinstance(value, str) and value in action.choices
        elif action.type is not None:
            ok = isinstance(value, (int, float, str)) and not isinstance(value, bool) and _parses(action.type, value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise CLIError(f"{where}: the saved flag --{action.dest} = {value!r} is not valid; the file is damaged")


def _parses(cast, value) -> bool:
    try:
        cast(str(value))
        return True
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False


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


def restored_args(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set, script: str):
    """With --resume: the checkpoint and its flags, overridden by those given explicitly; else (None, args)."""
    if not args.resume:
        return None, args
    ckpt = load_checkpoint(args.resume, script)
    validate_saved_args(parser, field(ckpt, "args", dict), f"--resume {ckpt['path']}")
    return ckpt, merge_resumed_args(ckpt["args"], args, explicit)


def guarded_main(parser: argparse.ArgumentParser, run, args: argparse.Namespace, explicit: set) -> int:
    """Run a script's body: bad input -> usage + one line + exit 2; a non-finite loss -> one line + exit 3;
    a full disk or out of memory -> one line + exit 2; a second Ctrl-C -> exit 130, no traceback. A failure
    inside a run folder ends its line with what is on disk (`RunFolder.on_disk`)."""
    try:
        return run(args, explicit)
    except StoppedBySignal as e:  # during set-up, before any epoch (plumbing.run.Run stops later ones itself)
        print(f"{os.path.basename(sys.argv[0]) or 'run'}: stopped by {e} during set-up, before any epoch; "
              f"{on_disk(e)}", file=sys.stderr)
        return 128 + e.signum
    except CLIError as e:
        parser.print_usage(sys.stderr)
        fail(one_line(e) + (f"; {e.on_disk}" if getattr(e, "kept_work", False) else ""))
    except NonFiniteError as e:
        fail(f"{e}; {on_disk(e)}", code=3)
    except KeyboardInterrupt as e:
        fail(f"interrupted; {on_disk(e)}", code=130)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        fail(f"cannot read or write{where} ({e.strerror or e}); free the space or fix the path; {on_disk(e)}")
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        fail("out of memory; lower --batch_size, --init_channels / --layers or --energy_batch_size "
             f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}); {on_disk(e)}")
    return 1


def on_disk(e: BaseException) -> str:
    """What a failure left on disk, as the RunFolder it went through recorded it."""
    return getattr(e, "on_disk", None) or "no run folder was written"


def one_line(e: BaseException) -> str:
    """The message of `e` as one line. An error raised in a data-loader worker comes back with the worker's
    traceback in its message ("Caught DataError in DataLoader worker ... Original Traceback ..."): its last line
    is the original message, after the exception's name."""
    text = str(e).strip()
    if "\n" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    name = type(e).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, MemoryError, or an allocator's RuntimeError ("not enough memory")."""
    from dl_energy_estimator import EnergyMemoryError
    text = str(e).lower()
    return isinstance(e, (MemoryError, EnergyMemoryError)) or isinstance(e, getattr(torch, "OutOfMemoryError", ())) or \
        any(w in text for w in ("out of memory", "not enough memory", "failed to allocate", "can't allocate memory",
                                "cannot allocate memory"))


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


class StoppedBySignal(BaseException):
    """SIGINT / SIGTERM during set-up, before the epochs: acted on at once (nothing to save yet); `guarded_main` turns
    it into its one line and exit status 128 + signal. A BaseException, like KeyboardInterrupt: no handler for
    errors catches it on its way out (`guarded_main` does)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunControl:
    """Turns SIGINT / SIGTERM into a stop: during set-up (data, model, tables) at once (`StoppedBySignal`), during
    the epochs after the current step (the last checkpoint is whole; `in_epochs`). A second signal stops at once
    (KeyboardInterrupt, exit 130); later ones are ignored while the run unwinds, so a burst of SIGTERMs cannot
    break its clean-up. Also checks losses and gradients for non-finite values (`check_finite`)."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.signal_number = 0
        self.signals = 0
        self.in_epochs = False
        self._unwinding = False
        self.context: Dict[str, Any] = {}  # what `nonfinite_message` may blame: the resumed checkpoint, weights
        self._previous: Dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def _handler(self, signum, frame) -> None:
        self.signals += 1
        if self._unwinding:  # already stopping at once: later signals must not break the clean-up
            return
        if self.signals == 1:
            self.stop_requested, self.signal_number = True, signum
            if self.in_epochs:
                return
        self._unwinding = True
        raise StoppedBySignal(signum) if self.signals == 1 else KeyboardInterrupt  # a second Ctrl-C: at once

    def settle(self) -> None:
        """From now on signals are ignored: the run's outcome is decided and only quick bookkeeping is left (a
        signal raised after the run folder has closed would otherwise exit 130 with no word of what is on disk)."""
        self._unwinding = True

    def __enter__(self) -> "RunControl":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def check_finite(self, value: float, what: str, epoch: int, step: int) -> None:
        """A NaN or infinity stops the run with `nonfinite_message`."""
        if not math.isfinite(value):
            raise NonFiniteError(nonfinite_message(what, value, epoch, step, self.context))


def nonfinite_message(what: str, value: float, epoch: int, step: int, context: Dict[str, Any]) -> str:
    """The one line of a non-finite value: the likely cause this run can see, and what to do about it.

    `context` may hold `resumed` (the checkpoint's path), `start_epoch` (the first epoch after it), `weights`
    (flag -> value of the loss weights), `learning_rate` and `rate_changed` (a rate given anew on resume). A
    value gone bad in the first step after a resume with the same rates points at the checkpoint (resuming it
    again would fail the same way); an extreme loss weight points at itself; otherwise the usual cause is a
    learning rate too high for this network."""
    where = f"non-finite {what} ({value}) at epoch {epoch + 1}, step {step}"
    extreme = [f"--{k} {v:g}" for k, v in sorted(context.get("weights", {}).items()) if abs(v) > EXTREME_WEIGHT]
    rate = f" (--learning_rate {context['learning_rate']:g})" if context.get("learning_rate") else ""
    if (context.get("resumed") and epoch == context.get("start_epoch") and step == 0 and not extreme
            and not context.get("rate_changed")):
        return (f"{where}, the first step after resuming {context['resumed']}: the checkpoint is likely damaged "
                f"(resuming it again fails the same way); start the run again from scratch, or from a copy of an "
                f"earlier checkpoint")
    if extreme:
        return (f"{where}: the loss weight {', '.join(extreme)} is extreme (the normalized terms are ~1, weights "
                f"above {EXTREME_WEIGHT:g} only overflow); use a weight in [0, {EXTREME_WEIGHT:g}]")
    return f"{where}: the learning rate{rate} is likely too high for this network; lower --learning_rate"


EXTREME_WEIGHT = 100.0  # loss weights above this (the door allows up to cliargs.LIMITS['weight']) are named
