"""torchrun / DDP on CPU (gloo): 2-process search and training, the alpha checksum, DDP = 1 process on the
global batch, and a killed rank ending the job. Two processes on 2 shared cores: sizes are minimal."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, *args, timeout=300, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _init(rank: int, store_path: str) -> None:
    store = torch.distributed.FileStore(store_path, 2)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2)


def _checksum_worker(rank: int, store_path: str, out_dir: str) -> None:
    from plumbing import distributed
    _init(rank, store_path)
    distributed.check_same([torch.ones(3)], "same")  # equal: no error
    try:
        distributed.check_same([torch.full((3,), float(rank))], "alphas")
        result = "no error"
    except distributed.DivergenceError as e:
        result = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(result)
    torch.distributed.destroy_process_group()


def test_checksum_mismatch_raises_on_every_rank(tmp_path):
    torch.multiprocessing.spawn(_checksum_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for r in range(2):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert "alphas of rank(s) [1] differ" in text, text


def _supernet_and_batches():
    from architect import Architect
    from dl_energy_estimator import EnergyEstimator
    from model_search import Network
    torch.manual_seed(0)
    net = Network(4, 10, 3, ["none", "skip_connect", "sep_conv_3x3", "max_pool_3x3"], 1, EnergyEstimator.default())
    net.eval()  # BatchNorm uses its (fixed) running statistics: per-rank batch statistics would differ
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    y, yv = torch.randint(0, 10, (16,), generator=g), torch.randint(0, 10, (16,), generator=g)
    opt = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    return net, opt, Architect, (x, y, xv, yv)


def _one_search_step(net, opt, Architect, batch, hook=None, ddp=None, unrolled=False):
    from train_search import weight_step
    x, y, xv, yv = batch
    if unrolled:  # a first weight step: the unrolled step then also reads a momentum buffer
        weight_step(net, net.weight_parameters(), opt, x, y, 5.0, ddp=ddp)
    arch = Architect(net, arch_learning_rate=3e-3, arch_weight_decay=1e-3, momentum=0.9, weight_decay=3e-4,
                     task_weight=0.9, energy_weight=0.05, unrolled=unrolled, grad_hook=hook)
    arch.step(x, y, xv, yv, 0.1, opt)
    state = {f"grad.{k}": p.grad.detach().clone() for k, p in zip(("normal", "reduce"), net.arch_parameters())}
    weight_step(net, net.weight_parameters(), opt, x, y, 5.0, ddp=ddp)
    return {**state, **{k: v.detach().clone() for k, v in net.named_parameters()}}


def _ddp_worker(rank: int, store_path: str, out_dir: str, unrolled: bool = False) -> None:
    from plumbing import distributed
    torch.set_num_threads(1)
    _init(rank, store_path)
    net, opt, Architect, batch = _supernet_and_batches()
    ddp = distributed.wrap(net, torch.device("cpu"))
    half = tuple(t[rank * 8:(rank + 1) * 8] for t in batch)  # each rank: its half of the global batch of 16
    state = _one_search_step(net, opt, Architect, half, hook=distributed.average_, ddp=ddp, unrolled=unrolled)
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_step_equals_one_process_on_the_global_batch(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a busy machine: more threads only spin
    try:
        _compare_with_single(tmp_path)
    finally:
        torch.set_num_threads(threads)


def test_ddp_unrolled_step_equals_one_process_on_the_global_batch(tmp_path):
    """The unrolled step averages its inner gradients (w' and the Hessian-vector product's direction) across
    ranks: its alpha gradient is the one of one process on the concatenated batch, not a mean of local ones."""
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path), True), nprocs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_with_single(tmp_path, unrolled=True)
    finally:
        torch.set_num_threads(threads)


def _compare_with_single(tmp_path, unrolled=False):
    net, opt, Architect, batch = _supernet_and_batches()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    single = _one_search_step(net, opt, Architect, batch, unrolled=unrolled)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, ref in single.items():
        for r in ranks:
            if name.startswith("grad."):  # finite differences: relative to the gradient's scale
                torch.testing.assert_close(r[name], ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item(), msg=name)
            else:
                torch.testing.assert_close(r[name], ref, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # identical on every rank, bit for bit
    assert not torch.equal(single["alphas_normal"], before["alphas_normal"])


def test_torchrun_search_writes_once(tmp_path):
    proc = _torchrun("train_search.py", "--dataset", "digits", "--layers", "3", "--init_channels", "4",
                     "--epochs", "2", "--unrolled", "--wandb", "disabled", "--log_dir", str(tmp_path),
                     "--run_name", "s", "--dist_timeout", "60")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert os.listdir(tmp_path) == ["s"]
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert len(json.loads((tmp_path / "s" / "alphas.json").read_text())) == 2
    assert json.loads((tmp_path / "s" / "genotype.json").read_text())["format"] == 1
    assert out.count("search done") == 2 and "diverged" not in out


def test_torchrun_train_reaches_90_percent(tmp_path):
    proc = _torchrun("train.py", "--dataset", "digits", "--arch", "DARTS_V2", "--layers", "4", "--init_channels",
                     "8", "--epochs", "6", "--wandb", "disabled", "--log_dir", str(tmp_path), "--run_name", "t",
                     "--dist_timeout", "60")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["test_acc"] >= 90.0, summary
    assert len((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()) == 6


def _children_with_rank(parent: int, rank: str):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            pids.append(int(pid))
    return pids


def test_killed_rank_ends_the_job(tmp_path):
    proc = _torchrun("train.py", "--dataset", "digits", "--arch", "DARTS_V2", "--layers", "2", "--init_channels",
                     "4", "--epochs", "100", "--wandb", "disabled", "--log_dir", str(tmp_path), "--run_name", "k",
                     "--dist_timeout", "20")
    deadline = time.time() + 120
    while not (tmp_path / "k" / "metrics.jsonl").exists():  # both ranks are training
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    victims = _children_with_rank(proc.pid, "1")
    assert len(victims) == 1
    t0 = time.time()
    os.kill(victims[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.time() - t0 < 60
    assert "SIGKILL" in out or "ChildFailedError" in out, out[-3000:]
