"""Behaviour kept through refactors, on any x86 CPU: a digits search (seed 0, 3 epochs, 2 threads) and the training
of the stored cell, against the files recorded in tests/golden/.

Bitwise equality holds on one machine only (`bench/compare_commits.py` checks it, old commit against new): the
kernels torch picks for the CPU (ATen's AVX-512 / AVX2 / default code, oneDNN's and MKL's own dispatch) and the
thread count change the rounding, and 3 epochs carry it into every metric. So here what is discrete or analytic
must be equal (keys, epochs, the learning-rate and energy-weight schedules, genotype format, primitives and
structure, the parameters, MACs and energy of the stored cell to 1e-6), and the float metrics must stay within
tolerances that hold the spread measured over CPU capabilities and thread counts with a margin (TOLERANCE).
The training runs the *stored* genotype: the search's alphas sit within 1e-5..1e-4 of a tie on some edges, so its
derived cell may change with the CPU, and the training figures must not depend on that.
"""
import json
import math
import os

import pytest

from conftest import ROOT, run_script

GOLDEN = os.path.join(ROOT, "tests", "golden")
WALL_CLOCK = {"epoch_s", "wall_s"}
ANALYTIC = 1e-6  # relative: schedules, MACs, energies of a fixed cell (room for libm rounding, far below any change)

# (relative, absolute) tolerance of the CPU-dependent floats, as math.isclose takes them (relative to the larger
# value: rel 0.5 is a factor of 2). Widest spread measured against these files on this AMD EPYC (Zen 4, AVX-512)
# with torch's threads 1 instead of 2 and ATEN_CPU_CAPABILITY avx2 / default (issue 21): losses 0.51 (search
# valid_loss epoch 3: 0.345 vs 0.170), accuracies in the last epoch 4.0 points (search valid_acc: 91.1 vs 95.1 %),
# held-out accuracy before it 16.7 (search epoch 2: 53.1 vs 69.8 %, a network far from settled), the expected
# energy 2.2e-3 relative. Tolerances: losses a factor of 4, accuracies 10 points (35 before the last epoch),
# energies 5e-3: they catch a run that learns or prices differently, not a small change (compare_commits.py does).
TOLERANCE = {
    "train_loss": (0.75, 0.0), "valid_loss": (0.75, 0.0), "test_loss": (0.75, 0.0),
    "train_acc": (0.0, 10.0), "valid_acc": (0.0, 10.0), "test_acc": (0.0, 10.0),
    "expected_energy_mj": (5e-3, 0.0), "energy_normalized": (5e-3, 0.0),
}
EARLY = dict(TOLERANCE, valid_acc=(0.0, 35.0), test_acc=(0.0, 35.0))  # the epochs before the last
# The alphas' move away from uniform, per epoch, against the recorded one: the ratio of the norms (measured 1.24)
# and the cosine (measured down to 0.82). A 2x arch learning rate, frozen alphas or another direction fall outside.
MOVED, ALIGNED = (0.6, 1.67), 0.5
# alpha_entropy is within 4e-4 of log(8): its distance to log(8) is compared, as a ratio, within MOVED squared.
MAX_ENTROPY = math.log(8)  # 8 primitives
# Fields of the cell derived each epoch: they follow the near-tied alphas, so only their range is checked.
DERIVED = {"unguarded_normal_skip", "normal_parametric", "normal_skip", "normal_pool", "genotype_energy_mj"}


def read(path: str):
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def close(golden, value, key: str, where: str, tolerance=None) -> None:
    """`value` equals `golden`: exactly for non-floats, to tolerance[key] (TOLERANCE) or ANALYTIC for floats."""
    if isinstance(golden, float):
        rel, abs_ = (TOLERANCE if tolerance is None else tolerance).get(key, (ANALYTIC, 0.0))
        assert isinstance(value, float) and math.isclose(golden, value, rel_tol=rel, abs_tol=abs_), \
            f"{where}.{key}: {value!r}, recorded {golden!r} (tolerance rel {rel}, abs {abs_})"
    else:
        assert value == golden, f"{where}.{key}: {value!r}, recorded {golden!r}"


def check_rows(golden_rows, rows, name: str) -> None:
    """metrics.jsonl: the same epochs and keys; every field as `close`, the derived cell's fields in range."""
    assert len(rows) == len(golden_rows), f"{name}: {len(rows)} epochs, recorded {len(golden_rows)}"
    for g, r in zip(golden_rows, rows):
        where, tolerance = f"{name} epoch {g['epoch']}", TOLERANCE if g is golden_rows[-1] else EARLY
        assert set(r) - WALL_CLOCK == set(g) - WALL_CLOCK, f"{where}: keys {sorted(set(r) ^ set(g))} differ"
        for key in set(g) - WALL_CLOCK - DERIVED - {"alpha_entropy"}:
            close(g[key], r[key], key, where, tolerance)
        if "alpha_entropy" in g:
            ratio = (MAX_ENTROPY - r["alpha_entropy"]) / (MAX_ENTROPY - g["alpha_entropy"])
            assert MOVED[0] ** 2 <= ratio <= MOVED[1] ** 2, f"{where}: alpha_entropy {r['alpha_entropy']!r} is " \
                f"{ratio:.3f} times as far from uniform as recorded ({g['alpha_entropy']!r})"
        for key in DERIVED & set(g):
            assert type(r[key]) is type(g[key]) and r[key] >= 0, f"{where}.{key}: {r[key]!r}"
        if "normal_parametric" in g:
            assert r["normal_parametric"] + r["normal_skip"] + r["normal_pool"] == 8, f"{where}: not 8 edges"


def check_search_genotype(golden, genotype, last_row) -> None:
    """Format, primitives and structure as recorded; the ops may differ (near-tied alphas); meta as the run."""
    for key in ("format", "primitives", "normal_concat", "reduce_concat"):
        assert genotype[key] == golden[key], f"genotype.json: {key} {genotype[key]!r}, recorded {golden[key]!r}"
    for kind in ("normal", "reduce"):
        assert len(genotype[kind]) == len(golden[kind]), f"genotype.json: {kind} has {len(genotype[kind])} edges"
        for pos, (op, src) in enumerate(genotype[kind]):
            assert op in golden["primitives"] and op != "none" and 0 <= src < 2 + pos // 2, \
                f"genotype.json: {kind}[{pos}] = {[op, src]}"
    meta, gmeta = genotype["meta"], golden["meta"]
    assert set(meta) == set(gmeta), f"genotype.json: meta keys {sorted(set(meta) ^ set(gmeta))} differ"
    for key in set(gmeta) - {"energy_mj", "valid_acc"}:
        close(gmeta[key], meta[key], key, "genotype.json meta")
    assert meta["energy_mj"] == last_row["genotype_energy_mj"] and meta["valid_acc"] == last_row["valid_acc"], \
        "genotype.json: meta differs from the last metrics row"


def deviation(epoch_alphas) -> list:
    """One epoch's softmaxed alphas less the uniform distribution, all cells' edges and ops in one vector."""
    return [x - 1.0 / len(row) for kind in ("normal", "reduce") for row in epoch_alphas[kind] for x in row]


def check_alphas(golden, alphas) -> None:
    """alphas.json: the same epochs, primitives and (edges x ops) shapes, each row a distribution; per epoch the
    alphas moved away from uniform as far as recorded (MOVED, the ratio of the norms of the deviations) and the
    same way (ALIGNED, their cosine). Single weights are not compared: they sit within 1e-2 of 1/8."""
    assert len(alphas) == len(golden), f"alphas.json: {len(alphas)} epochs, recorded {len(golden)}"
    for g, a in zip(golden, alphas):
        where = f"alphas.json epoch {g['epoch']}"
        assert set(a) == set(g) and a["epoch"] == g["epoch"] and a["primitives"] == g["primitives"], where
        for kind in ("normal", "reduce"):
            assert [len(row) for row in a[kind]] == [len(row) for row in g[kind]], f"{where}: {kind} shape"
            assert all(math.isclose(sum(row), 1.0, abs_tol=1e-5) for row in a[kind]), f"{where}: {kind} sums"
        u, v = deviation(g), deviation(a)
        norm_u, norm_v = math.hypot(*u), math.hypot(*v)
        moved, cosine = norm_v / norm_u, sum(x * y for x, y in zip(u, v)) / (norm_u * norm_v)
        assert MOVED[0] <= moved <= MOVED[1], f"{where}: alphas moved {moved:.3f} times as far as recorded"
        assert cosine >= ALIGNED, f"{where}: cosine {cosine:.3f} with the recorded move (at least {ALIGNED})"


def check_summary(golden, summary) -> None:
    """summary.json of the stored cell: all exact (params, MACs, genotype) or analytic (energy), test_acc within
    tolerance."""
    assert set(summary) - WALL_CLOCK == set(golden) - WALL_CLOCK, "summary.json: keys differ"
    for key in set(golden) - WALL_CLOCK:
        close(golden[key], summary[key], key, "summary.json")


@pytest.mark.slow
def test_search_and_training_reproduce_the_golden_run(tmp_path):
    log = str(tmp_path)
    r = run_script("train_search.py", "--dataset", "digits", "--seed", "0", "--epochs", "3", "--log_dir", log,
                   "--run_name", "search", "--wandb", "disabled", "--threads", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("train.py", "--dataset", "digits", "--seed", "0", "--epochs", "3", "--genotype",
                   os.path.join(GOLDEN, "genotype.json"), "--log_dir", log, "--run_name", "train",
                   "--wandb", "disabled")
    assert r.returncode == 0, r.stderr[-2000:]
    search_rows = read(os.path.join(log, "search", "metrics.jsonl"))
    check_rows(read(os.path.join(GOLDEN, "search_metrics.jsonl")), search_rows, "search metrics.jsonl")
    check_search_genotype(read(os.path.join(GOLDEN, "genotype.json")),
                          read(os.path.join(log, "search", "genotype.json")), search_rows[-1])
    check_alphas(read(os.path.join(GOLDEN, "alphas.json")), read(os.path.join(log, "search", "alphas.json")))
    check_rows(read(os.path.join(GOLDEN, "train_metrics.jsonl")), read(os.path.join(log, "train", "metrics.jsonl")),
               "train metrics.jsonl")
    check_summary(read(os.path.join(GOLDEN, "summary.json")), read(os.path.join(log, "train", "summary.json")))
