"""Small helpers the scripts share: safe file writes, seeding, devices, meters and the energy model. The shared
flags and their defaults are in `options.py`, the CLI error and argparse types in `cliargs.py`, the life of a run
(folder, log, checkpoints, resume, signals) in `runs.py` and `run.py`, wandb in `tracker.py`."""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from plumbing.cliargs import CLIError

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


def set_threads(device: torch.device, threads: Optional[int]) -> None:
    """`--threads` on the CPU (0 or None: `free_cpus()`, what the machine can give without oversubscribing it).
    Tiny tensors: extra threads only add sync overhead."""
    if device.type == "cpu":
        torch.set_num_threads(threads or free_cpus())


def free_cpus() -> int:
    """CPU threads this process can use without oversubscribing the machine: the cores it may run on (affinity,
    a cgroup CPU quota), shared among the torchrun ranks on this node, less the load other processes put on them
    (the 1-minute load average), at least 1 and at most torch's own default (the physical cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    free = int(cores - min(load, cores) + 0.5) // ranks
    return max(1, min(free, cores // ranks, _TORCH_THREADS))


_TORCH_THREADS = torch.get_num_threads()  # torch's default (physical cores), before any set_num_threads


def compile_cells(model: torch.nn.Module, input_shape: Optional[Sequence[int]] = None, whole: bool = False) -> None:
    """`torch.compile` each cell in place (`Module.compile`: state_dict keys, checkpoints and functional_call stay
    as they are). Cells, not the whole network: the stem, head and the energy table stay eager, and cells of one
    shape share one compiled graph.

    A supernet (`input_shape`: one input's shape) has its op energies traced eagerly first, since the estimator is
    Python work no graph should hold. `whole`: each cell must compile as one graph (`fullgraph=True`, a graph break
    is an error), and on CUDA it runs as CUDA graphs (`mode="reduce-overhead"`: one launch per cell instead of
    hundreds; the search's loaders then drop the last partial batch, so every step has the graph's shape). The
    alphas are inputs of the graph: changing them recompiles nothing."""
    if input_shape is not None:
        model.trace_energies(input_shape)
    cuda = any(p.is_cuda for p in model.parameters())
    options = {"fullgraph": True, "mode": "reduce-overhead" if cuda else None} if whole else {}
    for cell in model.cells:
        cell.compile(**options)


def step_begin(args, device: torch.device) -> None:
    """Call first in a search step: with `--compile` on CUDA (CUDA graphs, see `compile_cells`) it tells the graphs
    that the last step's outputs are no longer needed, so their memory can be reused."""
    if getattr(args, "compile", False) and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


class HostCopy:
    """Device tensors read on the host without stalling the step that needs them: `start(tensors)` queues their
    copies into pinned host buffers (non-blocking, an event after them) and returns at once; `get()` waits for
    that event only (long done when the GPU keeps up with the host, as in a host-bound step) and returns the copies
    as nested lists (None before the first `start`). On the CPU `start` copies at once."""

    def __init__(self) -> None:
        self._host: Dict[str, torch.Tensor] = {}
        self._event = None

    def start(self, tensors: Dict[str, torch.Tensor]) -> None:
        cuda = False
        for name, t in tensors.items():
            host = self._host.get(name)
            if host is None or host.shape != t.shape or host.dtype != t.dtype:
                host = self._host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            host.copy_(t.detach(), non_blocking=t.is_cuda)
            cuda |= t.is_cuda
        self._event = torch.cuda.Event() if cuda else None
        if self._event is not None:
            self._event.record()

    def get(self) -> Optional[Dict[str, list]]:
        if not self._host:
            return None
        if self._event is not None:
            self._event.synchronize()
        return {name: host.tolist() for name, host in self._host.items()}


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled (a no-op context otherwise). Open it around one forward and its loss,
    never around a loop: autocast caches the bf16 copy of every weight until the context exits, so a context over
    many optimizer steps keeps computing with the first step's weights."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# ----------------------------------------------------------------------------------------- seeds and device


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_deterministic(choice: str, device: torch.device) -> bool:
    """`--deterministic auto|on|off`: auto is on for CPU runs (bitwise reproducible) and off on CUDA, where
    `cudnn.benchmark` picks the fastest kernels (results then vary in the last bits from run to run). Returns
    whether deterministic kernels are on."""
    on = choice == "on" or (choice == "auto" and device.type != "cuda")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    return on


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


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch's CPU generator and that of `device` when it is a GPU), as
    tensors and plain values (loadable with weights_only=True). Under torchrun every rank calls it: the states of
    all ranks come back (on every rank) under "ranks", rank 0's also at the top level, so each rank resumes its own
    streams (augmentation, drop path). With `set_rng_state` the one pair that writes and reads the "rng" entry."""
    from plumbing import distributed
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":  # only the device in use: a resume on fewer GPUs has its state
        state["cuda"] = torch.cuda.get_rng_state(device)
    if distributed.enabled():
        ranks = distributed.all_gather_objects(state)
        state = {**ranks[0], "ranks": ranks}
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` saved: this rank's own states when the run saved one per rank (else the top level,
    e.g. a run saved by one process), and the GPU state only on a GPU. Older checkpoints held every visible GPU's
    state (a list): the one of this device's index is used, or the first when this machine has fewer."""
    from plumbing import distributed
    ranks = state.get("ranks")
    rank = distributed.rank()
    mine = ranks[rank] if isinstance(ranks, list) and rank < len(ranks) else state
    random.setstate(_tuples(mine["python"]))
    name, keys, *rest = mine["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(mine["torch"])
    cuda = device_rng(mine.get("cuda"), device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def device_rng(saved: Any, device: torch.device) -> Optional[torch.Tensor]:
    """The saved GPU generator state for `device`: None on the CPU or when none was saved; from a list of
    per-GPU states (older checkpoints) the entry of the device's index, or the first if the list is shorter."""
    if device.type != "cuda" or saved is None:
        return None
    if isinstance(saved, (list, tuple)):
        if not saved:
            return None
        index = device.index or 0
        return saved[index] if index < len(saved) else saved[0]
    return saved


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------- measuring


def correct_counts(logits: torch.Tensor, target: torch.Tensor, topk: Tuple[int, ...] = (1,)) -> torch.Tensor:
    """Top-k hits of a batch, one float per k, left on the device (no host sync)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, 1, True, True).indices.t()
    correct = pred.eq(target.view(1, -1))
    return torch.stack([correct[:min(k, maxk)].reshape(-1).float().sum() for k in topk])


class DeviceMeter:
    """Running averages weighted by batch size, summed on the device in float64 and read with one host sync
    (`read()`, at a log interval or the end of an epoch): a per-step `.item()` would stall a GPU.
    `add(values, n)`: a 1-d tensor of batch means (one per name), summed as float64 products of mean and n."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names, self.n = list(names), 0
        self.total: Optional[torch.Tensor] = None

    def add(self, values: torch.Tensor, n: int) -> None:
        v = values.detach().to(torch.float64) * n
        self.total = v if self.total is None else self.total + v
        self.n += n

    def read(self) -> Dict[str, float]:
        sums = self.total.tolist() if self.total is not None else [0.0] * len(self.names)
        return {name: value / max(self.n, 1) for name, value in zip(self.names, sums)}


class FiniteFlags:
    """Non-finite checks of a step's tensors without a host sync: `check(value, what)` folds the value into a flag
    on the device (`0 * value` is NaN exactly when the value is not finite); `bad()` reads them all at once and
    returns the first (what, value) that was not finite, or None."""

    def __init__(self) -> None:
        self.flags: Dict[str, torch.Tensor] = {}

    def check(self, value, what: str) -> None:
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        value = value.detach().reshape(())
        flag = self.flags.get(what)
        self.flags[what] = value * 0.0 if flag is None else flag.add(value, alpha=0.0)

    def bad(self) -> Optional[Tuple[str, float]]:
        if not self.flags:
            return None
        names = list(self.flags)
        values = torch.stack([self.flags[n].to(torch.float64) for n in names]).tolist()
        self.flags = {}
        return next(((n, v) for n, v in zip(names, values) if not math.isfinite(v)), None)


def count_params(model: torch.nn.Module, exclude: Tuple[str, ...] = ("auxiliary",)) -> int:
    """Parameters, without those of submodules whose name starts with an excluded prefix (DARTS's count)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(exclude))


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
    return est.with_batch_size(batch_size) if batch_size is not None else est
