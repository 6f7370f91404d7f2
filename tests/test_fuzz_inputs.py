"""Seeded mutations of each input kind a user hands in (a checkpoint, a bundle manifest, a measurements file, a
benchmark table): every one ends in exit 0 or 2 with at most one error line, never a traceback, and no file is
lost (the input stays, nothing half-written appears)."""
import json
import os
import random

import pytest
import torch

from nb201 import benchmark
import train
from test_door_checks import ARCH, ARCH2, measurements, run_bundle, tiny_bundle
from test_run_safety import TINY_TRAIN, mutations


ODD_TENSORS = [None, -1, 2 ** 40, 1e308, "x", [], {}, torch.zeros(0), torch.zeros(3, dtype=torch.uint8),
               torch.full((2,), float("nan")), torch.ones(5000, dtype=torch.uint8), [torch.zeros(0)]]


def one_line_or_none(err: str, code) -> None:
    assert "Traceback" not in err, err[-2000:]
    if code:
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
        assert len(lines) == 1 and "error:" in lines[0], err[-2000:]


def test_fuzzed_checkpoints_resume_or_fail_with_one_line(tmp_path, capsys):
    assert train.main(TINY_TRAIN + ["--log_dir", str(tmp_path), "--run_name", "good"]) == 0
    good = torch.load(tmp_path / "good" / "checkpoint.pt", weights_only=True)
    rng = random.Random(23)
    capsys.readouterr()
    for i, m in enumerate(mutations(good, rng, 12, ODD_TENSORS)):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        torch.save(m, folder / "checkpoint.pt")
        try:
            code = train.main(["--resume", str(folder), "--epochs", "2"])
        except SystemExit as e:
            code = e.code
        one_line_or_none(capsys.readouterr().err, code)
        assert code in (0, 2), (i, code)
        assert (folder / "checkpoint.pt").exists() and not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_fuzzed_bundle_manifests_run_or_fail_with_one_line(tmp_path, capsys):
    b = tiny_bundle(tmp_path / "b")
    good = json.loads((b / "manifest.json").read_text())
    rng = random.Random(7)
    for i, m in enumerate(mutations(good, rng, 30)):
        (b / "manifest.json").write_text(json.dumps(m))
        out = tmp_path / f"m{i}.json"
        code, _ = run_bundle(b, capsys, "--watts", "5", "--out", str(out))
        assert os.path.isfile(b / "manifest.json") and all(os.path.isfile(b / it["file"]) for it in good["items"])
        assert out.exists() == (code == 0)


def test_fuzzed_measurements_fit_or_fail_with_one_line(tmp_path, capsys):
    from dl_energy_estimator.cli import main
    doc = measurements(tmp_path, capsys)
    rng = random.Random(11)
    for i, m in enumerate(mutations(doc, rng, 40)):
        path, out = tmp_path / f"x{i}.json", tmp_path / f"e{i}.json"
        path.write_text(json.dumps(m))
        capsys.readouterr()
        code = main(["fit", str(path), "--out", str(out)])
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err, (i, err)
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(errors) == (code == 2) and path.exists() and out.exists() == (code == 0), (i, err)


def table_mutations(rng, n):
    """CSV texts: cells replaced by blanks, text, signs, overflowing or huge numbers, broken arch strings,
    quotes; rows and columns added or dropped."""
    header, rows = ["arch_str", "energy_mj", "latency_ms", "valid_acc"], [[ARCH, "1.5", "2.0", "91.0"],
                                                                          [ARCH2, "0.7", "1.1", "88.5"]]
    odd = ["", "abc", "-1", "1e400", "nan", "inf", "9" * 400, "|bad~9|", '"', "1,2", "\x00", " 3 ", "+4"]
    out = []
    for _ in range(n):
        h, r = list(header), [list(x) for x in rows]
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.6:
                row = rng.choice(r + [h])
                row[rng.randrange(len(row))] = rng.choice(odd)
            elif roll < 0.75:
                r.append(list(rng.choice(r)))
            elif roll < 0.9:
                rng.choice(r).pop()
            else:
                h.append(rng.choice(h))
        out.append("\n".join(",".join(x) for x in [h] + r) + "\n")
    return out


def test_fuzzed_benchmark_tables_load_or_fail_with_one_line(tmp_path):
    for i, text in enumerate(table_mutations(random.Random(5), 60)):
        path = tmp_path / f"t{i}.csv"
        path.write_text(text)
        try:
            table = benchmark.load_table(str(path))
        except benchmark.BenchmarkError as e:
            assert "\n" not in str(e) and str(path) in str(e), (i, text)
            continue
        for arch in table.rows:  # what loads is usable: numbers are finite, measured ones not negative
            for column, value in table.rows[arch].items():
                if isinstance(value, float):
                    assert value == value and abs(value) != float("inf")
                if isinstance(value, (int, float)) and benchmark.NON_NEGATIVE.search(column):
                    assert value >= 0, (i, text)
