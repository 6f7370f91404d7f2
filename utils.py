"""What the scripts share: safe file writes, seeding, devices, meters, the run folder, logging, wandb,
the energy model and checkpoints. Data sets live in `datasets.py`."""
from __future__ import annotations

import argparse
import contextlib
import math
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch

import distributed

# ----------------------------------------------------------------------------------------------- safe writes


def _atomic_write(path: str, write) -> None:
    """Write via a temp file in the same folder, fsync, rename: a kill never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def append_jsonl(path: str, obj: Dict[str, Any]) -> None:
    """Append one JSON object as a line (flushed and fsynced)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ argument checks


def _typed(cast, ok, what: str):
    def parse(text: str):
        try:
            value = cast(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


positive_int = _typed(int, lambda v: v > 0, "a positive integer")
nonneg_int = _typed(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _typed(float, lambda v: np.isfinite(v) and v > 0, "a positive number")
nonneg_float = _typed(float, lambda v: np.isfinite(v) and v >= 0, "a non-negative number")
fraction = _typed(float, lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")
unit_float = _typed(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


class CLIError(Exception):
    """Bad input found after parsing; the scripts print it as one line and exit with status 2."""


def explicit_flags(argv: Iterable[str]) -> set:
    """Names (dest form) of the long flags given on the command line, to tell them from defaults."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags both scripts share (names as in DARTS where DARTS has one)."""
    from datasets import DATASETS
    p.add_argument("--dataset", default="digits", choices=sorted(DATASETS),
                   help="data set (digits ships with scikit-learn and works offline)")
    p.add_argument("--data", default="./data", help="folder of the data set (downloaded there when online)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--gpu", type=nonneg_int, default=0, help="CUDA device index")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--log_dir", default="./log", help="runs go to <log_dir>/<run_name>/")
    p.add_argument("--run_name", default=None, help="default <script>-<dataset>-<timestamp>")
    p.add_argument("--wandb", default=None, choices=["offline", "online", "disabled"],
                   help="default: online if a wandb API key is configured, else offline")
    p.add_argument("--energy_model", default=None,
                   help="energy-model JSON from `python -m dl_energy_estimator calibrate` (default: analytical)")
    p.add_argument("--energy_batch_size", type=positive_int, default=None,
                   help="deployment batch size of the energy estimates (default: the energy model's, 1)")
    p.add_argument("--workers", type=nonneg_int, default=None, help="data-loader workers (default 0 for digits)")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder to continue")
    distributed.add_args(p)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast (and cudnn.benchmark on CUDA): faster on GPUs, results not bitwise "
                        "reproducible")
    p.add_argument("--threads", type=nonneg_int, default=None,
                   help="CPU threads of torch (0: torch's default; digits: 1, faster for 8x8 images and on a busy "
                        "machine)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every cell (inductor; minutes of compiling first). Measured on this project's "
                        "CPU: a cell alone 0.86x, a whole search step 1.2x (slower): try it on a GPU (bench/)")
    p.add_argument("--channels_last", choices=["auto", "on", "off"], default="auto",
                   help="memory layout of the network: auto = channels_last on CPUs (measured 1.6x faster) and "
                        "with --amp on CUDA (layout.py)")


def set_threads(device: torch.device, threads: Optional[int]) -> None:
    """`--threads` on the CPU (0 or None: torch's default). Tiny tensors: extra threads only add sync overhead."""
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)


def compile_cells(model: torch.nn.Module) -> None:
    """`torch.compile` each cell in place (`Module.compile`: state_dict keys, checkpoints and functional_call stay
    as they are). Cells, not the whole network: the stem, head and Python-side energy bookkeeping stay eager, and
    cells of one shape share one compiled graph."""
    for cell in model.cells:
        cell.compile()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled (a no-op context otherwise)."""
    if enabled and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def apply_defaults(args: argparse.Namespace, defaults: Dict[str, Dict[str, Any]]) -> None:
    """Fill flags left at None from the per-data-set defaults table (key '*' for every data set)."""
    table = {**defaults.get("*", {}), **defaults.get(args.dataset, defaults.get("other", {}))}
    for key, value in table.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------------------- seeds and device


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; deterministic kernels so CPU runs are bitwise reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str, gpu: int = 0) -> torch.device:
    """`auto` -> cuda:gpu if available else cpu; `cuda` without CUDA is a CLIError."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if name == "cuda":
            raise CLIError("--device cuda was given but no CUDA device is available; use --device cpu or auto")
        return torch.device("cpu")
    if gpu >= torch.cuda.device_count():
        raise CLIError(f"--gpu {gpu} does not exist (this machine has {torch.cuda.device_count()} CUDA devices)")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def rng_state() -> Dict[str, Any]:
    """All RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------- measuring


class AvgMeter:
    """Running average weighted by batch size."""

    def __init__(self) -> None:
        self.sum, self.n = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += float(value) * n
        self.n += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.n, 1)


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Tuple[int, ...] = (1,)):
    """Top-k accuracies in percent."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, 1, True, True).indices.t()
    correct = pred.eq(target.view(1, -1))
    return [correct[:min(k, maxk)].reshape(-1).float().sum().item() * 100.0 / target.size(0) for k in topk]


def count_params(model: torch.nn.Module, exclude: Tuple[str, ...] = ("auxiliary",)) -> int:
    """Parameters, without those of submodules whose name starts with an excluded prefix (DARTS's count)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(exclude))


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


# -------------------------------------------------------------------------------------------------- wandb


def wandb_mode(requested: Optional[str]) -> str:
    """The flag if given; otherwise online only when an API key is configured (never a login prompt)."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.expanduser("~/.netrc")
    try:
        with open(netrc, encoding="utf-8") as f:
            if "api.wandb.ai" in f.read():
                return "online"
    except OSError:
        pass
    return "offline"


class Tracker:
    """A thin wandb wrapper: does nothing when disabled, imports wandb only when used."""

    def __init__(self, mode: str, run_dir: str, config: Dict[str, Any], project: str,
                 name: str, run_id: Optional[str] = None, log: Optional[logging.Logger] = None) -> None:
        self.run = None
        self.mode = mode
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            if mode == "online":
                raise CLIError("--wandb online needs the wandb package: pip install wandb") from None
            if log:
                log.info("wandb is not installed: tracking disabled")
            self.mode = "disabled"
            return
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=run_dir, config=config, mode=mode,
                              id=run_id, resume="allow" if run_id else None, reinit="finish_previous")

    @property
    def run_id(self) -> Optional[str]:
        return self.run.id if self.run is not None else None

    def log(self, data: Dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: Dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in data.items():
                self.run.summary[k] = v

    def image(self, path: str):
        return self.wandb.Image(path) if self.run is not None else None

    def table(self, columns, rows):
        return self.wandb.Table(columns=list(columns), data=[list(r) for r in rows]) if self.run is not None else None

    def artifact(self, name: str, kind: str, files: Iterable[str]) -> None:
        if self.run is None:
            return
        art = self.wandb.Artifact(name, type=kind)
        for f in files:
            art.add_file(f)
        self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# ------------------------------------------------------------------------------------------- energy model


def load_estimator(path: Optional[str], batch_size: Optional[int]):
    """The analytical estimator, or one loaded from JSON; `batch_size` overrides the deployment batch."""
    from dl_energy_estimator import EnergyEstimator, EnergyModelError
    try:
        est = EnergyEstimator.load(path) if path else EnergyEstimator.default()
    except FileNotFoundError:
        raise CLIError(f"--energy_model {path} does not exist") from None
    except EnergyModelError as e:
        raise CLIError(str(e)) from None
    if batch_size is not None:
        est.meta["batch_size"] = int(batch_size)
    return est


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


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


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
        import signal
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def _handler(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop_requested, self.signal_number = True, signum

    def __enter__(self) -> "RunControl":
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal
        for s, h in self._previous.items():
            signal.signal(s, h)

    @staticmethod
    def check_finite(value: float, what: str, epoch: int, step: int) -> None:
        if not math.isfinite(value):
            raise NonFiniteError(f"non-finite {what} ({value}) at epoch {epoch + 1}, step {step}; the last "
                                 f"checkpoint is intact: lower the learning rate and --resume it")
