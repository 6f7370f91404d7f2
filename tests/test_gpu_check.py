"""bench/gpu_check.sh, the prepared check for a GPU machine, runs end to end on the CPU as a dry run."""
import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--device", "cpu", str(out)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    status = (out / "status.txt").read_text()
    for step in ("search_step", "search_step_amp", "search_step_compile", "search_epoch", "train_step", "torchrun",
                 "zeus"):
        assert f"{step} rc=0" in status, status
    assert "aten ops" in (out / "search_step.txt").read_text()
    assert "projected 50-epoch" in (out / "search_epoch.txt").read_text()
    assert "measured" in (out / "zeus.txt").read_text()


def test_gpu_check_needs_an_output_folder():
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "OUT"}, timeout=60)
    assert r.returncode == 2 and r.stderr.count("error:") == 1
