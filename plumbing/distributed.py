"""Multi-process runs under torchrun (DistributedDataParallel): everything the scripts need in one place.

A process started without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) runs exactly as before:
every helper here is then a no-op that returns its input untouched, so single-process results stay bitwise the
same. Under torchrun, `init()` joins the process group (nccl on CUDA, gloo on CPU) with a timeout, so a dead rank
ends the job with an error instead of a hang.
"""
from __future__ import annotations

import atexit
import datetime
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as tdist
from torch.utils.data import Sampler

from plumbing.cliargs import positive_float

DEFAULT_TIMEOUT_S = 1800
T = TypeVar("T")


class DivergenceError(RuntimeError):
    """Ranks that should hold identical tensors (alphas, weights) do not: the run stops."""


def add_args(p) -> None:
    """The one flag of distributed runs (torchrun sets the rest through RANK / WORLD_SIZE / LOCAL_RANK)."""
    p.add_argument("--dist_timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                   help="under torchrun: seconds a rank waits for the others before the job fails (a dead rank)")


def world_size() -> int:
    return tdist.get_world_size() if enabled() else 1


def rank() -> int:
    return tdist.get_rank() if enabled() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if enabled() else 0


def enabled() -> bool:
    """True once init() has joined a group of more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and talks to wandb."""
    return rank() == 0


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes in the environment; False (nothing done) without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or enabled():
        return enabled()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(shutdown)
    return True


def gpu_index(requested: int) -> int:
    """The CUDA device of this process: LOCAL_RANK under torchrun, else the --gpu flag."""
    return local_rank() if enabled() else requested


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


# -------------------------------------------------------------------------------------------- collectives


def wrap(model: torch.nn.Module, device: torch.device) -> Optional[torch.nn.Module]:
    """`model` in DistributedDataParallel (None without torchrun: use the model itself)."""
    if not enabled():
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def average_(tensors: Sequence[Optional[torch.Tensor]]) -> None:
    """Average tensors (e.g. the alphas' gradients) in place across ranks; None entries are skipped."""
    if not enabled():
        return
    ws = world_size()
    for t in tensors:
        if t is not None:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t.div_(ws)


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj` (picklable, small: RNG states), in rank order, on every rank; [obj] without torchrun."""
    if not enabled():
        return [obj]
    out: List[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 only (it reads rank 0's files), its result broadcast to every rank: the other ranks
    wait for it, so none reads a file rank 0 has not written (or that is on another node's disk)."""
    if not enabled():
        return fn()
    box = [fn() if is_main() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def average_metrics(metrics: Dict[str, float], count: int) -> Dict[str, float]:
    """Means over all ranks' samples, from each rank's means over its `count` samples (weighted exactly)."""
    if not enabled():
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] * count for k in keys] + [float(count)], dtype=torch.float64, device=_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    total = max(float(t[-1]), 1.0)
    return {**metrics, **{k: float(v) / total for k, v in zip(keys, t[:-1].tolist())}}


def checksum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers that change with any value or position: the sum and a position-weighted sum."""
    flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    return torch.stack([flat.sum(), (flat * weights).sum()])


def check_same(tensors: Sequence[torch.Tensor], what: str) -> None:
    """All-gather a checksum of `tensors` and raise DivergenceError on every rank if any rank differs."""
    if not enabled():
        return
    mine = checksum(tensors).to(_device())
    gathered = [torch.empty_like(mine) for _ in range(world_size())]
    tdist.all_gather(gathered, mine)
    values = [g.cpu() for g in gathered]
    bad = [r for r, v in enumerate(values) if not torch.equal(v, values[0])]
    if bad:
        raise DivergenceError(f"the {what} of rank(s) {bad} differ from rank 0's (checksums "
                              f"{[v.tolist() for v in values]}): the ranks diverged")


# ------------------------------------------------------------------------------------------------ data


def train_sampler(dataset, seed: int):
    """A DistributedSampler (shuffled, the same number of batches on every rank) or None without torchrun."""
    if not enabled():
        return None
    from torch.utils.data.distributed import DistributedSampler
    return DistributedSampler(dataset, shuffle=True, seed=seed)


class ShardSampler(Sampler):
    """Evaluation: rank r reads samples r, r + N, ... in order, with no padding, so weighted means are exact."""

    def __init__(self, n: int) -> None:
        self.indices = list(range(rank(), n, world_size()))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def set_epoch(loaders: List, epoch: int) -> None:
    """Reshuffle DistributedSamplers for a new epoch (no-op for the single-process samplers)."""
    for loader in loaders:
        sampler = getattr(loader, "sampler", None) if loader is not None else None
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
