"""pareto.py --launcher: submitit's local executor gives the same pareto.csv as the local pool, a killed sweep
resumes its search from the checkpoint on the next run, bad SLURM flags are refused before anything is submitted,
and the SLURM submission (one job array per phase) is built from the flags."""
import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from plumbing import launchers
import pareto
from conftest import ROOT, run_script
from test_run_safety import one_error_line

# Tiny on purpose (4 candidate ops, 3 layers, 4 channels, 2 epochs, one thread): the sweep, not the search, is tested.
SWEEP = ["pareto.py", "--dataset", "digits", "--energy_weights", "0,0.5", "--seeds", "0", "--epochs", "2",
         "--layers", "3", "--init_channels", "4", "--batch_size", "96", "--eval_channels", "4", "--eval_layers", "3",
         "--primitives", "none,max_pool_3x3,skip_connect,sep_conv_3x3", "--threads", "1", "--wandb", "disabled",
         "--jobs", "2", "--train", "--train_args", "--epochs 1 --batch_size 256 --threads 1"]


def pareto_rows(sweep_dir):
    """pareto.csv's rows with the run folder as its name (the sweeps live in different folders)."""
    with open(os.path.join(sweep_dir, "pareto.csv")) as f:
        return [{**r, "run": os.path.basename(r["run"])} for r in csv.DictReader(f)]


def run_files(run_dir):
    """What a search run wrote that must not depend on the launcher: its genotype and metric rows (timing aside)."""
    rows = [{k: v for k, v in json.loads(line).items() if k not in ("epoch_s", "wall_s")}
            for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return json.load(open(os.path.join(run_dir, "genotype.json"))), rows


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    log = tmp_path_factory.mktemp("sweeps")
    res = run_script(*SWEEP, "--log_dir", str(log), "--run_name", "local", "--launcher", "local", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return log, pareto_rows(log / "local")


@pytest.mark.slow
def test_submitit_local_gives_the_local_launchers_rows(local_sweep):
    log, rows = local_sweep
    res = run_script(*SWEEP, "--log_dir", str(log), "--run_name", "sub", "--launcher", "submitit-local",
                     timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(rows) == 2 and rows[0]["energy_weight"] == "0.0" and float(rows[0]["genotype_energy_mj"]) > 0
    assert all(float(r["test_acc"]) > 0 for r in rows)  # trained: the second phase ran too
    assert pareto_rows(log / "sub") == rows
    for run in ("w0-s0", "w0.5-s0"):
        assert run_files(log / "sub" / run) == run_files(log / "local" / run)
    jobs = os.listdir(log / "sub" / "submitit")
    assert sum(name.endswith("_result.pkl") for name in jobs) == 4  # one submitit job per search and training
    assert os.path.getsize(log / "sub" / "pareto.png") > 5000
    # Run again: every search is finished, nothing is submitted, the same rows.
    res = run_script(*SWEEP, "--log_dir", str(log), "--run_name", "sub", "--launcher", "submitit-local")
    assert res.returncode == 0 and res.stdout.count("search already finished, skipped") == 2
    assert res.stdout.count("training already finished, skipped") == 2
    assert sorted(os.listdir(log / "sub" / "submitit")) == sorted(jobs)
    assert pareto_rows(log / "sub") == rows


@pytest.mark.slow
def test_a_killed_submitit_job_resumes_on_the_next_run(local_sweep):
    log, rows = local_sweep
    cmd = [("0" if a == "0,0.5" else a) for a in SWEEP] + ["--log_dir", str(log), "--run_name", "killed",
                                                            "--launcher", "submitit-local"]
    run = log / "killed" / "w0-s0"
    # The sweep and its jobs (submitit's controller, the job, the search) share one process group: kill them all
    # once the search has written the checkpoint of epoch 1, as a dead node or a lost session would.
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not os.path.exists(run / "checkpoint.pt"):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 600, "timed out waiting for the first checkpoint"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(log / "killed" / "pareto.csv")
    res = run_script(*cmd, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = open(log / "killed" / "w0-s0.out").read()
    assert f"--resume {run}" in out and "no overrides (exact resume)" in open(run / "log.txt").read()
    assert len(open(run / "metrics.jsonl").read().splitlines()) == 2  # no epoch lost, none run twice
    assert pareto_rows(log / "killed") == rows[:1]  # the resumed search is the uninterrupted one


BAD_SLURM = [(["--launcher", "slurm", "--slurm_time", "3 days"], "--slurm_time"),
             (["--launcher", "slurm", "--slurm_time", "0:00"], "above zero"),
             (["--launcher", "slurm", "--slurm_partition", "gpu; rm -rf ~"], "--slurm_partition"),
             (["--launcher", "slurm", "--slurm_account", ""], "--slurm_account"),
             (["--launcher", "slurm", "--slurm_mem_gb", "-4"], "slurm_mem_gb"),
             (["--launcher", "slurm", "--gpus_per_job", "two"], "gpus_per_job"),
             (["--launcher", "slurm", "--slurm_extra", "exclude"], "--slurm_extra"),
             (["--launcher", "slurm", "--slurm_setup", ""], "--slurm_setup"),
             (["--launcher", "slurm"], "sbatch"),  # no cluster here: refused, not a traceback at submission
             (["--launcher", "submitit-local", "--slurm_partition", "gpu"], "need --launcher slurm"),
             (["--launcher", "lsf"], "launcher")]


@pytest.mark.parametrize("argv,word", BAD_SLURM)
def test_bad_slurm_flags_are_refused_before_anything_is_submitted(tmp_path, capsys, argv, word):
    with pytest.raises(SystemExit) as exc:
        pareto.main(["--dataset", "digits", "--log_dir", str(tmp_path), "--run_name", "p", "--wandb", "disabled",
                     *argv])
    assert exc.value.code == 2
    one_error_line(capsys.readouterr().err, word)
    assert not os.path.exists(tmp_path / "p")  # no sweep folder, no submitit folder, no job


@pytest.mark.parametrize("text,minutes", [("90", 90), ("30:30", 31), ("4:00:00", 240), ("1-12", 2160),
                                          ("2-00:30", 2910), ("1-00:00:01", 1441)])
def test_slurm_time_limits_in_minutes(text, minutes):
    assert launchers.slurm_minutes(text) == minutes


def fake_slurm(tmp_path, monkeypatch):
    """sbatch/srun stand-ins on PATH: sbatch keeps the script it is given and answers with a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 4242\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        os.chmod(bin_dir / tool, 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_submission_is_one_array_built_from_the_flags(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch)
    args, _ = pareto.build_parser().parse_known_args(
        ["--launcher", "slurm", "--slurm_partition", "gpu", "--slurm_account", "lab", "--slurm_time", "1-00:00:00",
         "--gpus_per_job", "2", "--slurm_mem_gb", "64", "--jobs", "2", "--slurm_setup", "source ~/venv/bin/activate",
         "--slurm_extra", "exclude=node12"])
    launchers.check(args)
    executor = launchers.executor_for(args, str(tmp_path / "submitit"))
    steps = [launchers.Step(f"w{w}-s0", "search", [sys.executable, "train_search.py"], str(tmp_path / f"w{w}"),
                            str(tmp_path / f"w{w}.out"), procs=2) for w in (0, 1, 2)]
    with executor.batch():
        jobs = [executor.submit(launchers.SubmititStep(s)) for s in steps]
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2"]
    script = open(tmp_path / "submitted.sh").read()
    for line in ("--partition=gpu", "--account=lab", "--time=1440", "--gpus-per-node=2", "--mem=64GB",
                 "--cpus-per-task=16", "--array=0-2%2", "--exclude=node12", "--signal=USR2@90", "--open-mode=append",
                 "source ~/venv/bin/activate"):
        assert line in script, (line, script)
    assert steps[0].argv()[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_sbatch_refusing_the_array_is_one_line(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch)
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpux' >&2\n"
                                             "exit 1\n")
    with pytest.raises(SystemExit) as exc:
        pareto.main(["--dataset", "digits", "--energy_weights", "0", "--seeds", "0", "--log_dir", str(tmp_path),
                     "--run_name", "p", "--wandb", "disabled", "--launcher", "slurm", "--slurm_partition", "gpux"])
    assert exc.value.code == 2
    one_error_line(capsys.readouterr().err, "invalid partition specified: gpux")
    assert not os.path.exists(tmp_path / "p" / "submitit" / "jobs.json")


def test_a_step_resumes_from_its_checkpoint(tmp_path):
    step = launchers.Step("w0-s0", "search", ["python", "train_search.py", "--seed", "0"], str(tmp_path),
                          str(tmp_path / "w0-s0.out"))
    assert step.argv() == ["python", "train_search.py", "--seed", "0"]
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert step.argv()[-2:] == ["--resume", str(tmp_path)]
    args = argparse.Namespace(launcher="local", jobs=None, gpus_per_job=None,
                              **{k: None for k in ("slurm_partition", "slurm_account", "slurm_qos",
                                                   "slurm_constraint", "slurm_time", "slurm_mem_gb",
                                                   "slurm_cpus_per_gpu", "slurm_setup", "slurm_extra")})
    launchers.check(args)
    assert args.jobs == 1 and args.gpus_per_job == 0


def test_a_rerun_waits_for_the_slurm_jobs_still_running(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch)
    (tmp_path / "bin" / "sacct").write_text("#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242_0|RUNNING|n1\\n"
                                            "4242_1|COMPLETED|n2\\n4242_2|CANCELLED by 7|n3\\n'\n")
    os.chmod(tmp_path / "bin" / "sacct", 0o755)
    folder = tmp_path / "submitit"
    folder.mkdir()
    steps = [launchers.Step(f"w{w}-s0", "search", ["python"], str(tmp_path), "out") for w in (0, 1, 2, 3)]
    launchers.remember(str(folder), steps[:3], [argparse.Namespace(job_id=f"4242_{i}") for i in range(3)])
    assert list(launchers.still_running(str(folder), steps)) == ["w0-s0/search"]  # the others are submitted again


@pytest.mark.slow
def test_a_multi_process_job_runs_its_search_under_torchrun(tmp_path):
    # --gpus_per_job 2 on a CPU machine: torchrun inside the submitit job, two gloo processes, one search.
    argv = [("0.5" if a == "0,0.5" else a) for a in SWEEP[:SWEEP.index("--train")]]
    res = run_script(*argv, "--log_dir", str(tmp_path), "--run_name", "tr", "--launcher", "submitit-local",
                     "--gpus_per_job", "2", "--device", "cpu", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = open(tmp_path / "tr" / "w0.5-s0.out").read()
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 train_search.py" in out
    assert len(pareto_rows(tmp_path / "tr")) == 1


def test_a_failed_submitit_job_is_one_line_naming_its_log_and_skips_its_training(tmp_path):
    args = pareto.build_parser().parse_known_args(["--launcher", "submitit-local", "--jobs", "2"])[0]
    launchers.check(args)
    code = {"ok": "print('searched')", "bad": "import sys; sys.exit(3)"}
    jobs = [{"name": name} for name in code]
    asked = []

    def step_of(job, phase):
        asked.append((job["name"], phase))
        return launchers.Step(job["name"], phase, [sys.executable, "-c", code[job["name"]]], str(tmp_path),
                              str(tmp_path / f"{job['name']}.out"))

    lines = list(launchers.run(args, jobs, step_of, str(tmp_path), print))
    assert lines == ["ok: done", f"bad: search failed (see {tmp_path / 'bad.out'})"]
    assert asked == [("ok", "search"), ("bad", "search"), ("ok", "training")]  # no training for a failed search
    assert open(tmp_path / "ok.out").read().count("\nsearched\n") == 2  # its search and its training ran


def test_preemption_stops_the_script_cleanly_and_requeues_the_same_step(tmp_path):
    """What submitit does on SLURM's USR2 (preemption, time limit): call checkpoint(), requeue what it returns."""
    import threading
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('stopped cleanly', flush=True), sys.exit(143)))\n"
              "print('ready', flush=True)\ntime.sleep(60)\n")
    step = launchers.Step("w0-s0", "search", [sys.executable, "-c", script], str(tmp_path), str(tmp_path / "w.out"))
    job = launchers.SubmititStep(step)
    codes = []
    runner = threading.Thread(target=lambda: codes.append(job()))
    runner.start()
    t0 = time.time()
    while "\nready\n" not in (open(step.log).read() if os.path.exists(step.log) else ""):
        assert time.time() - t0 < 60
        time.sleep(0.05)
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # the run's last epoch checkpoint
    requeued = job.checkpoint()
    runner.join(timeout=60)
    assert codes == [143] and "\nstopped cleanly\n" in open(step.log).read()
    assert isinstance(requeued.function, launchers.SubmititStep) and requeued.function.step == step
    assert requeued.function.step.argv()[-2:] == ["--resume", str(tmp_path)]  # the requeued job continues the run
