"""How a sweep's jobs run: `--launcher local` (a pool of subprocesses on this machine), `submitit-local` (submitit's
local executor) or `slurm` (one submitit job per search and per training, one SLURM array per phase).

Every launcher runs the same commands, with the same `--resume` rule (a command whose run folder holds a
checkpoint.pt continues it) and the same output file per job, so nothing a sweep writes depends on the launcher.
A preempted or timed-out SLURM job is requeued by submitit (`SubmititStep` is Checkpointable) and resumes from its
checkpoint; a job that died for good is resumed by running the sweep again.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import submitit

from plumbing import jsonfile
from plumbing.cliargs import CLIError, nonneg_int, positive_float, positive_int

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the scripts a sweep runs live there
LAUNCHERS = ("local", "submitit-local", "slurm")
PHASES = ("search", "training")
SLURM_DEFAULTS = {"slurm_time": "24:00:00", "slurm_mem_gb": 32.0, "slurm_cpus_per_gpu": 8}
REQUEUE_GRACE_S = 120
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # submitit's local executor kills a job after timeout_min: no limit here
NAME = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")  # partition, account, qos: comma lists of plain names
CONSTRAINT = re.compile(r"[A-Za-z0-9_.\-&|,:*\[\]()!]+")


@dataclasses.dataclass
class Step:
    """One command of a sweep job (its search or its training), resumable from its run folder."""
    name: str             # the job, e.g. w0.1-s0
    phase: str            # "search" or "training"
    cmd: List[str]        # python script.py ... (without --resume)
    run_dir: str          # the run folder the command writes; its checkpoint.pt means "continue it"
    log: str              # the job's output file (<sweep>/<name>.out), appended to by every attempt
    procs: int = 1        # > 1: the command runs under torchrun with this many processes (one per GPU)

    def argv(self) -> List[str]:
        """The command to run now: under torchrun when procs > 1, with --resume when a checkpoint exists."""
        cmd = list(self.cmd)
        if self.procs > 1:
            cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.procs),
                   *cmd[1:]]
        if os.path.isfile(os.path.join(self.run_dir, "checkpoint.pt")):  # stopped part-way: continue it
            cmd += ["--resume", self.run_dir]
        return cmd

    @property
    def key(self) -> str:
        return f"{self.name}/{self.phase}"

    def failed(self, log: Optional[str] = None) -> str:
        return f"{self.name}: {self.phase} failed (see {log or self.log})"


_RUNNING: Dict[str, subprocess.Popen] = {}  # the command a job process runs now (to stop it on preemption)


def run_step(step: Step) -> int:
    """Run `step` (resuming it when it has a checkpoint), output appended to its log; returns the exit status."""
    cmd = step.argv()
    with open(step.log, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _RUNNING[step.log] = proc
        try:
            return proc.wait()
        finally:
            _RUNNING.pop(step.log, None)


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM: the scripts stop after the current step with their last checkpoint whole; SIGKILL if they hang."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SubmititStep(submitit.helpers.Checkpointable):
    """A submitit job running one Step. On preemption or timeout submitit calls `checkpoint`: the command is
    stopped cleanly and the same Step is requeued; it then starts with --resume from the run's checkpoint."""

    def __init__(self, step: Step) -> None:
        self.step = step

    def __call__(self) -> int:
        code = run_step(self.step)
        if (code < 0 or code == 128 + signal.SIGTERM) and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # The script was stopped by a signal: on SLURM a preemption or the coming time limit, which also
            # signals this process; submitit's handler (or SLURM's own requeue) ends it within moments. Wait for
            # that instead of reporting an interruption as a failure (if nothing comes, the status stands).
            time.sleep(REQUEUE_GRACE_S)
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        proc = _RUNNING.get(self.step.log)
        if proc is not None:
            _stop(proc)
        return submitit.helpers.DelayedSubmission(SubmititStep(self.step))


# --------------------------------------------------------------------------------------------------- flags


def add_args(p: argparse.ArgumentParser) -> None:
    """pareto.py's launcher flags."""
    g = p.add_argument_group("launcher", "how the searches and trainings run (see README, 'Sweeps on a cluster')")
    g.add_argument("--launcher", default="local", choices=LAUNCHERS,
                   help="local: subprocesses on this machine; submitit-local: submitit's local executor; slurm: "
                        "one SLURM job per search and per training (one job array per phase)")
    g.add_argument("--gpus_per_job", type=nonneg_int, default=None,
                   help="GPUs per search/training; above 1 the job runs torchrun with one process per GPU "
                        "(default: slurm 1, submitit-local 1 when CUDA is there else 0, local 1 process)")
    g.add_argument("--slurm_partition", default=None, help="slurm: partition(s), comma list (default: the cluster's)")
    g.add_argument("--slurm_account", default=None, help="slurm: account charged for the jobs")
    g.add_argument("--slurm_qos", default=None, help="slurm: quality of service")
    g.add_argument("--slurm_constraint", default=None, help="slurm: node features, e.g. 'a100|h100'")
    g.add_argument("--slurm_time", default=None,
                   help=f"slurm: time limit per job, minutes or [D-]HH:MM[:SS] (default {SLURM_DEFAULTS['slurm_time']}"
                        "; a job that reaches it is requeued and resumes from its checkpoint, up to 3 times)")
    g.add_argument("--slurm_mem_gb", type=positive_float, default=None,
                   help=f"slurm: memory per job in GB (default {SLURM_DEFAULTS['slurm_mem_gb']:g})")
    g.add_argument("--slurm_cpus_per_gpu", type=positive_int, default=None,
                   help=f"slurm: CPU cores per GPU (per job when it has none; default "
                        f"{SLURM_DEFAULTS['slurm_cpus_per_gpu']})")
    g.add_argument("--slurm_setup", action="append", default=None, metavar="LINE",
                   help="slurm: a shell line run before each job (repeatable), e.g. 'source ~/venv/bin/activate'")
    g.add_argument("--slurm_extra", action="append", default=None, metavar="KEY=VALUE",
                   help="slurm: any other #SBATCH option (repeatable), e.g. exclude=node12 or mail-type=FAIL")


def slurm_minutes(text: str) -> int:
    """A SLURM time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes (> 0)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise CLIError(f"--slurm_time {text!r}: give minutes or [D-]HH:MM[:SS], e.g. 240 or 1-12:00:00")
    days, a, b, c = (int(v) if v is not None else None for v in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:   # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:   # MM:SS
        seconds = a * 60 + b
    else:                 # minutes
        seconds = a * 60
    if seconds <= 0:
        raise CLIError(f"--slurm_time {text!r}: the time limit must be above zero")
    return math.ceil(seconds / 60)


def slurm_flags_given(args: argparse.Namespace) -> List[str]:
    return [f"--{k}" for k, v in vars(args).items() if k.startswith("slurm_") and v is not None]


def check(args: argparse.Namespace) -> None:
    """Check the launcher flags before anything is submitted (one CLIError naming the flag), and fill in the
    defaults: --jobs (local launchers: 1; slurm: all at once) and --gpus_per_job."""
    given = slurm_flags_given(args)
    if given and args.launcher != "slurm":
        raise CLIError(f"{', '.join(given)}: SLURM flags need --launcher slurm (this sweep uses {args.launcher})")
    for flag in ("slurm_partition", "slurm_account", "slurm_qos"):
        value = getattr(args, flag, None)
        if value is not None and not NAME.fullmatch(value):
            raise CLIError(f"--{flag} {value!r}: give a name (letters, digits, '_', '-', '.') or a comma list")
    if args.slurm_constraint is not None and not CONSTRAINT.fullmatch(args.slurm_constraint):
        raise CLIError(f"--slurm_constraint {args.slurm_constraint!r}: give features joined by & or |, no spaces")
    if args.slurm_time is not None:
        slurm_minutes(args.slurm_time)
    for line in args.slurm_setup or []:
        if not line.strip() or "\n" in line:
            raise CLIError(f"--slurm_setup {line!r}: give one non-empty shell line per flag")
    slurm_extra(args.slurm_extra)
    if args.launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise CLIError("--launcher slurm: sbatch/srun not found; run on a SLURM login node, or use --launcher "
                       "submitit-local on this machine")
    if args.gpus_per_job is None:
        args.gpus_per_job = {"slurm": 1, "submitit-local": int(_cuda_count() > 0)}.get(args.launcher, 0)
    if args.launcher == "submitit-local" and 0 < _cuda_count() < args.gpus_per_job:
        raise CLIError(f"--gpus_per_job {args.gpus_per_job}: this machine has {_cuda_count()} GPU(s)")
    if args.jobs is None:
        args.jobs = 0 if args.launcher == "slurm" else 1  # 0: no limit, the scheduler decides


def slurm_extra(items: Optional[Sequence[str]]) -> Dict[str, str]:
    """--slurm_extra KEY=VALUE items as submitit's slurm_additional_parameters."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_-]*", key) or not value.strip() or "\n" in value:
            raise CLIError(f"--slurm_extra {item!r}: give KEY=VALUE with a lowercase sbatch option name, e.g. "
                           "exclude=node12")
        out[key.replace("-", "_")] = value
    return out


def _cuda_count() -> int:
    import torch  # here: the job processes import this module and need no torch to start
    return torch.cuda.device_count()


# --------------------------------------------------------------------------------------------------- launch


NextStep = Callable[[dict, str], Optional[Step]]


def run(args: argparse.Namespace, jobs: List[dict], next_step: NextStep, sweep_dir: str, log) -> Iterator[str]:
    """Run every job's phases with the chosen launcher; yields one line per job ("<name>: done" or "<name>: <phase>
    failed (see <log>)"), in the order of `jobs`. `next_step(job, phase)` gives the Step to run, or None when
    that phase has nothing to do (finished already, or no training asked)."""
    procs = max(args.gpus_per_job or 1, 1)

    def step_of(job: dict, phase: str) -> Optional[Step]:
        step = next_step(job, phase)
        return dataclasses.replace(step, procs=procs) if step is not None else None

    if args.launcher == "local":
        return run_local(jobs, step_of, args.jobs)
    return iter(run_submitit(args, jobs, step_of, sweep_dir, log))


def run_local(jobs: List[dict], step_of: NextStep, workers: int) -> Iterator[str]:
    """Today's pool: each job runs its search then its training in one of `workers` threads."""
    from tqdm import tqdm

    def one(job: dict) -> str:
        for phase in PHASES:
            step = step_of(job, phase)
            if step is not None and run_step(step) != 0:
                return step.failed()
        return f"{job['name']}: done"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from tqdm(pool.map(one, jobs), total=len(jobs), desc="sweep", disable=None)


def executor_for(args: argparse.Namespace, folder: str) -> submitit.Executor:
    """The submitit executor of the sweep (its pickles and logs in `folder`), parameters from the flags."""
    gpus = args.gpus_per_job
    if args.launcher != "slurm":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=gpus, tasks_per_node=1)
        return executor
    d = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SLURM_DEFAULTS.items()}
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        name="pareto", timeout_min=slurm_minutes(d["slurm_time"]), mem_gb=d["slurm_mem_gb"], nodes=1,
        tasks_per_node=1, gpus_per_node=gpus or None, cpus_per_task=d["slurm_cpus_per_gpu"] * max(gpus, 1),
        slurm_partition=args.slurm_partition, slurm_account=args.slurm_account, slurm_qos=args.slurm_qos,
        slurm_constraint=args.slurm_constraint, slurm_setup=args.slurm_setup,
        slurm_additional_parameters=slurm_extra(args.slurm_extra) or None,
        slurm_array_parallelism=args.jobs or 256)
    return executor


def run_submitit(args: argparse.Namespace, jobs: List[dict], step_of: NextStep, sweep_dir: str, log) -> List[str]:
    """Phase by phase: every pending search as one submission (a SLURM array), waited for with a progress bar;
    then every pending training of a search that finished. A job that fails is left out of later phases."""
    folder = os.path.join(os.path.abspath(sweep_dir), "submitit")
    executor = executor_for(args, folder)
    failed: Dict[str, str] = {}
    for phase in PHASES:
        steps = [s for s in (step_of(j, phase) for j in jobs if j["name"] not in failed) if s is not None]
        if not steps:
            continue
        log(f"{phase}: {len(steps)} job(s) through submitit ({args.launcher}), logs in {folder}")
        for step, job in wait(executor, steps, args, phase):
            try:
                code = job.result()
            except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
                log(f"{step.name}: submitit job {job.job_id} ended without a result: "
                    f"{(str(e).splitlines() or [type(e).__name__])[0]}")
                failed[step.name] = step.failed(str(job.paths.stderr))
                continue
            if code != 0:
                failed[step.name] = step.failed()
    return [failed.get(j["name"], f"{j['name']}: done") for j in jobs]


def local_slots(args: argparse.Namespace) -> List[Tuple[int, ...]]:
    """The GPUs of each job that may run at once on this machine: --jobs slots, each with its own
    --gpus_per_job GPUs (fewer slots when the GPUs run out); no GPU: --jobs empty slots."""
    gpus, count = args.gpus_per_job, _cuda_count()
    if not gpus or not count:
        return [()] * max(args.jobs, 1)
    return [tuple(range(k * gpus, (k + 1) * gpus)) for k in range(min(max(args.jobs, 1), count // gpus))]


ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING",
          "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}  # SLURM job states of a job that is not over


def record_path(folder: str) -> str:
    return os.path.join(folder, "jobs.json")


def still_running(folder: str, steps: List[Step]) -> Dict[str, submitit.Job]:
    """SLURM: the jobs an earlier run of this sweep submitted that are still queued or running (by Step key), so
    that running the sweep again waits for them instead of submitting a second job on the same run folder."""
    record = jsonfile.expect(jsonfile.read(record_path(folder), "submitit job record", {}), dict, record_path(folder))
    out = {}
    for step in steps:
        job_id = record.get(step.key)
        if isinstance(job_id, str):
            job = submitit.SlurmJob(folder, job_id)
            if job.state.split()[0] in ACTIVE:
                out[step.key] = job
    return out


def remember(folder: str, steps: List[Step], jobs: List[submitit.Job]) -> None:
    from plumbing import utils  # here, not at the top: the job processes import this module and need no torch
    record = jsonfile.expect(jsonfile.read(record_path(folder), "submitit job record", {}), dict, record_path(folder))
    utils.atomic_write_json(record_path(folder), {**record, **{s.key: j.job_id for s, j in zip(steps, jobs)}})


def submit_array(executor: submitit.Executor, steps: List[Step], phase: str) -> List[submitit.Job]:
    """One SLURM job array of `steps`; sbatch refusing it (a partition or account the cluster does not know) is
    one CLIError with sbatch's own words."""
    try:
        with executor.batch():
            return [executor.submit(SubmititStep(s)) for s in steps]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        said = [re.sub(r"^sbatch: error:\s*", "", line) for line in str(e).splitlines() if line.strip()]
        raise CLIError(f"sbatch refused the {phase} jobs: {said[-1] if said else type(e).__name__}") from None


def wait(executor: submitit.Executor, steps: List[Step], args: argparse.Namespace,
         phase: str) -> Iterator[Tuple[Step, submitit.Job]]:
    """Submit `steps` and yield (step, job) as each job ends, with a tqdm bar. SLURM: one job array (the
    scheduler keeps at most --jobs running), jobs of an earlier run still queued or running are waited for, not
    submitted again. Local: one job per free slot, the next submitted as one ends."""
    from tqdm import tqdm
    # The jobs unpickle SubmititStep from this module: put the project on their path, wherever pareto.py runs.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    slurm = args.launcher == "slurm"
    slots = [()] if slurm else local_slots(args)
    queue, running = list(steps), {}
    if slurm:
        earlier = still_running(str(executor.folder), queue)
        running.update({id(j): (s, j, ()) for s in queue for k, j in earlier.items() if k == s.key})
        queue = [s for s in queue if s.key not in earlier]
    with tqdm(total=len(steps), desc=phase, disable=None) as bar:
        while queue or running:
            with submitit.helpers.environment_variables(**env):
                if slurm and queue:  # everything at once, as one array
                    jobs = submit_array(executor, queue, phase)
                    remember(str(executor.folder), queue, jobs)
                    running.update({id(j): (s, j, ()) for s, j in zip(queue, jobs)})
                    queue = []
                while queue and slots:
                    gpus = slots.pop(0)
                    executor.update_parameters(visible_gpus=gpus)
                    step = queue.pop(0)
                    job = executor.submit(SubmititStep(step))
                    running[id(job)] = (step, job, gpus)
            for job in submitit.helpers.as_completed([j for _, j, _ in running.values()],
                                                     poll_frequency=15.0 if slurm else 0.5):
                step, _, gpus = running.pop(id(job))
                slots.append(gpus)
                bar.update(1)
                yield step, job
                if queue:
                    break  # a slot is free: submit the next one
