"""Checked at the door: output paths a user names (never a run folder's file, an existing file only with --force,
never empty), numbers from flags and checkpoints (one table of bounds), measurements and benchmark tables taken
at face value no more, the thread count, and genotypes that only look valid. Each refusal is one line, exit 2."""
import copy
import json
import os

import pytest
import torch
from torch import nn

from nb201 import benchmark
import genotypes as G
import pareto
from plumbing import runs
import train
import train_search
from plumbing import utils
import visualize
from test_run_safety import TINY_TRAIN, exits_2, snapshot

REPORT = ["--dataset", "digits", "--arch", "DARTS_V2", "--report", "--init_channels", "4", "--layers", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    log = tmp_path_factory.mktemp("door")
    assert train.main(TINY_TRAIN + ["--log_dir", str(log), "--run_name", "t"]) == 0
    return log / "t"


# ------------------------------------------------------------------------------------------------ output paths
def test_report_json_never_overwrites_a_run_or_an_existing_file(trained, tmp_path, capsys):
    before = snapshot(trained)
    for target in ("summary.json", "new.json"):  # a run folder's file, or a new one in it: both refused
        exits_2(train.main, REPORT + ["--json", str(trained / target), "--force"], capsys, "run folder")
    assert snapshot(trained) == before
    exits_2(train.main, REPORT + ["--json", ""], capsys, "empty")
    (tmp_path / "mine.json").write_text("keep me")
    exits_2(train.main, REPORT + ["--json", str(tmp_path / "mine.json")], capsys, "--force")
    assert (tmp_path / "mine.json").read_text() == "keep me"
    assert train.main(REPORT + ["--json", str(tmp_path / "mine.json"), "--force"]) == 0
    assert "energy_mj" in json.loads((tmp_path / "mine.json").read_text())
    exits_2(train.main, REPORT + ["--json", str(tmp_path / "no" / "r.json")], capsys, "does not exist")


def test_fit_out_never_overwrites_a_checkpoint(trained, tmp_path, capsys):
    from energy import main
    before = open(trained / "checkpoint.pt", "rb").read()
    table = tmp_path / "t.csv"
    table.write_text("genotype,energy_mj\nDARTS_V2,1.0\n")
    capsys.readouterr()
    assert main(["fit", "--table", str(table), "--column", "energy_mj", "--out", str(trained / "checkpoint.pt"),
                 "--force", "--no_progress"]) == 2
    assert "run folder" in capsys.readouterr().err
    assert open(trained / "checkpoint.pt", "rb").read() == before


def test_an_empty_log_dir_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exits_2(train.main, TINY_TRAIN + ["--log_dir", "", "--run_name", "x"], capsys, "--log_dir")
    (tmp_path / "f").write_text("")
    exits_2(train.main, TINY_TRAIN + ["--log_dir", "f", "--run_name", "x"], capsys, "is a file")
    assert os.listdir(tmp_path) == ["f"]


def search_folder(path, weight=0.1, seed=0):
    path.mkdir(parents=True)
    G.save(G.DARTS_V2, str(path / "genotype.json"), G.PRIMITIVES,
           {"dataset": "digits", "eval_channels": 4, "eval_layers": 3, "energy_weight": weight, "seed": seed})
    return path


def test_pareto_lists_a_run_once_and_never_replaces_a_sweep(tmp_path, capsys):
    r = search_folder(tmp_path / "r")
    flags = ["--log_dir", str(tmp_path / "out"), "--run_name", "p", "--wandb", "disabled"]
    assert pareto.main(["--from", str(r), str(r), str(tmp_path / "r") + "/", *flags]) == 0
    csv_path = tmp_path / "out" / "p" / "pareto.csv"
    assert len(csv_path.read_text().splitlines()) == 2
    before = csv_path.read_text()
    other = search_folder(tmp_path / "o", weight=0.5)
    exits_2(pareto.main, ["--from", str(other), *flags], capsys, "--force")
    assert csv_path.read_text() == before
    assert pareto.main(["--from", str(other), *flags, "--force"]) == 0
    exits_2(pareto.main, ["--from", str(other), "--log_dir", str(tmp_path), "--run_name", "r", "--force"], capsys,
            "not a sweep")  # a search's own folder is never a sweep folder (genotype.json)
    exits_2(pareto.main, ["--from", str(other), "--log_dir", "", "--run_name", "q"], capsys, "--log_dir")


def test_pareto_lists_each_weight_and_seed_once():
    assert pareto.floats("0.1,0.10,0,0.1") == [0.1, 0.0] and pareto.ints("1,1,2") == [1, 2]
    for bad in ("1e308", "-1", "nan"):
        with pytest.raises(Exception):
            pareto.floats(bad)
    with pytest.raises(Exception):
        pareto.ints(str(2 ** 32))


def test_visualize_out_a_file_or_existing_figures_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    exits_2(visualize.main, ["--arch", "DARTS_V2", "--out", str(tmp_path / "f")], capsys, "is a file")
    assert visualize.main(["--arch", "DARTS_V2", "--out", str(tmp_path / "v"), "--backend", "matplotlib"]) == 0
    before = snapshot(tmp_path / "v")
    exits_2(visualize.main, ["--arch", "DARTS_V2", "--out", str(tmp_path / "v")], capsys, "--force")
    assert snapshot(tmp_path / "v") == before and sorted(os.listdir(tmp_path / "v")) == sorted(before)


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("flags,word", [(["--energy_batch_size", str(2 ** 40)], "energy_batch_size"),
                                        (["--energy_batch_size", str(2 ** 63 - 1)], "energy_batch_size"),
                                        (["--energy_batch_size", "1e30"], "energy_batch_size"),
                                        (["--seed", str(2 ** 32)], "32-bit"),
                                        (["--energy_weight", "1e308"], "energy_weight"),
                                        (["--epochs", "1000000"], "epochs"),
                                        (["--batch_size", str(2 ** 62)], "batch_size")])
def test_numbers_out_of_bounds_are_one_line(tmp_path, capsys, flags, word):
    exits_2(train_search.main, ["--dataset", "digits", "--log_dir", str(tmp_path), *flags], capsys, word)
    assert not os.listdir(tmp_path)


def damaged(trained, tmp_path, name, mutate):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    mutate(ckpt)
    folder = tmp_path / name
    folder.mkdir()
    torch.save(ckpt, folder / "checkpoint.pt")
    return folder


@pytest.mark.parametrize("name,mutate,word", [
    ("rng-empty", lambda c: c.__setitem__("rng", {}), "RNG"),
    ("rng-torch-short", lambda c: c["rng"].__setitem__("torch", torch.zeros(7, dtype=torch.uint8)), "RNG"),
    ("rng-numpy-empty", lambda c: c["rng"]["numpy"].__setitem__(1, torch.zeros(0, dtype=torch.int64)), "RNG"),
    ("rng-python", lambda c: c["rng"].__setitem__("python", [3, [1, 2], None]), "RNG"),
    ("nan-weights", lambda c: next(v for v in c["model"].values() if v.is_floating_point()).fill_(float("nan")),
     "NaN"),
    ("epoch-1e6", lambda c: c.__setitem__("epoch", 999_999), "epoch"),
    ("epoch-beyond-run", lambda c: c.__setitem__("epoch", 5), "epoch 6 of a run of 1"),
])
def test_damaged_checkpoint_contents_are_refused(trained, tmp_path, capsys, name, mutate, word):
    folder = damaged(trained, tmp_path, name, mutate)
    line = exits_2(train.main, ["--resume", str(folder), "--epochs", "2"], capsys, word)
    assert "damaged" in line and "finished" not in line
    assert os.listdir(folder) == ["checkpoint.pt"]


def test_the_non_finite_message_names_the_cause_it_sees():
    msg = runs.nonfinite_message("training loss", float("nan"), 3, 0, {"resumed": "log/r/checkpoint.pt",
                                                                      "start_epoch": 3, "weights": {}})
    assert "damaged" in msg and "--resume" not in msg.split("damaged")[1].split(";")[0]
    msg = runs.nonfinite_message("architecture loss", float("inf"), 0, 5, {"weights": {"energy_weight": 5000.0}})
    assert "--energy_weight 5000" in msg and "learning rate" not in msg
    assert "learning rate" in runs.nonfinite_message("gradient", float("nan"), 2, 7, {"weights": {"w": 1.0}})


# ------------------------------------------------------------------------------------------------ measurements
def tiny_bundle(folder, batch=1):
    from dl_energy_estimator import bundle as B
    from dl_energy_estimator import EnergyEstimator
    items = [B.Item(f"conv{c}", "layer", "conv", nn.Conv2d(c, c, 3, padding=1), (batch, c, 8, 8)) for c in (2, 4)]
    est = EnergyEstimator.default(batch_size=batch)
    B.export(items, str(folder), [est.family_features(it.module, it.shape) for it in items], "torchscript", batch)
    return folder


def run_bundle(folder, capsys, *flags):
    from dl_energy_estimator import runner
    capsys.readouterr()
    code = runner.main(["--bundle", str(folder), "--window_s", "0.002", "--repeats", "2", "--warmup_s", "0",
                        "--idle_s", "0", *flags])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code in (0, 2) and len(err) == (code != 0), err
    assert "Traceback" not in "".join(err)
    return code, (err[0] if err else "")


def test_the_bundle_runner_refuses_what_it_cannot_measure(tmp_path, capsys):
    b = tiny_bundle(tmp_path / "b")
    counter = tmp_path / "energy_uj"
    counter.write_text("12345\n")  # a counter that never moves
    code, line = run_bundle(b, capsys, "--energy_file", str(counter), "--out", str(tmp_path / "m.json"))
    assert code == 2 and "did not change" in line and not (tmp_path / "m.json").exists()
    code, line = run_bundle(b, capsys, "--watts", "5", "--out", str(tmp_path / "no" / "m.json"))
    assert code == 2 and "does not exist" in line
    manifest = json.loads((b / "manifest.json").read_text())
    for name, doc, word in [("negative batch", {**manifest, "batch_size": -4}, "batch_size"),
                            ("negative shape", {**manifest, "items": [{**manifest["items"][0],
                                                                       "input_shape": [-1, 2, 8, 8]}]}, "input_shape"),
                            ("escaping file", {**manifest, "items": [{**manifest["items"][0], "file": "../x.pt"}]},
                             "inside the bundle")]:
        (b / "manifest.json").write_text(json.dumps(doc))
        code, line = run_bundle(b, capsys, "--watts", "5", "--out", str(tmp_path / "m.json"))
        assert code == 2 and word in line, name
    (b / "manifest.json").write_text("[" * 50000 + "]" * 50000)
    assert "nested" in run_bundle(b, capsys, "--watts", "5", "--out", str(tmp_path / "m.json"))[1]
    (b / "manifest.json").write_text(json.dumps(manifest))
    (b / manifest["items"][0]["file"]).write_bytes(b"not a program")
    code, line = run_bundle(b, capsys, "--watts", "5", "--out", str(tmp_path / "m.json"))
    assert code == 2 and "damaged" in line and "PytorchStreamReader" not in line


def measurements(tmp_path, capsys):
    b = tiny_bundle(tmp_path / "mb")
    assert run_bundle(b, capsys, "--watts", "5", "--out", str(tmp_path / "m.json"))[0] == 0
    return json.loads((tmp_path / "m.json").read_text())


def test_fit_refuses_absurd_energies_and_merges_repeated_networks(tmp_path, capsys):
    from dl_energy_estimator.cli import main
    doc = measurements(tmp_path, capsys)
    huge = copy.deepcopy(doc)
    huge["items"][0]["joules"] = 1e300
    (tmp_path / "huge.json").write_text(json.dumps(huge))
    assert main(["fit", str(tmp_path / "huge.json"), "--out", str(tmp_path / "e1.json")]) == 2
    assert "absurd" in capsys.readouterr().err
    copies = copy.deepcopy(doc)
    copies["items"] = [copy.deepcopy(doc["items"][0]) for _ in range(20)]
    (tmp_path / "copies.json").write_text(json.dumps(copies))
    assert main(["fit", str(tmp_path / "copies.json"), "--out", str(tmp_path / "e2.json")]) == 0
    err = capsys.readouterr().err
    assert "19 of 20 samples repeat" in err and len(err.strip().splitlines()) == 1
    from dl_energy_estimator import EnergyEstimator
    assert EnergyEstimator.load(str(tmp_path / "e2.json")).fit_stats["n_samples"] == 1


ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ARCH2 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"


@pytest.mark.parametrize("text,word", [
    (f"arch_str,energy_mj\n{ARCH},-0.5\n", "negative"),
    (f"arch_str,latency\n{ARCH},fast\n{ARCH2},3.0\n", "text 'fast'"),
    (f"arch_str,latency\n{ARCH},3.0\n{ARCH2},n/a\n", "text 'n/a'"),
    ("arch_str," + ",".join(f"c{i}" for i in range(200_000)) + f"\n{ARCH}," + ",".join(["1"] * 200_000) + "\n",
     "columns"),
])
def test_benchmark_tables_with_bad_values_are_one_line(tmp_path, text, word):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(benchmark.BenchmarkError) as e:
        benchmark.load_table(str(path))
    assert word in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ threads
def test_the_default_thread_count_respects_affinity_and_load(monkeypatch):
    monkeypatch.setattr(utils, "_TORCH_THREADS", 16)
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (_ for _ in ()).throw(OSError()) if "cgroup" in str(p)
                        else real_open(p, *a, **k))
    assert utils.free_cpus() == 8
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (6.0, 0.0, 0.0))
    assert utils.free_cpus() == 2
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (40.0, 0.0, 0.0))  # a loaded 2-core box: one thread
    assert utils.free_cpus() == 1
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert utils.free_cpus() == 2


# ------------------------------------------------------------------------------------------------ genotypes
@pytest.mark.parametrize("change,word", [
    (lambda d: d.__setitem__("normal_concat", [2, 2, 3, 4]), "repeats a node"),
    (lambda d: d.__setitem__("primitives", ["none", "max_pool_3x3"]), "do not list"),
    (lambda d: (d.__setitem__("normal", [["sep_conv_3x3", 0], ["skip_connect", 1]] * 1000),
                d.__setitem__("normal_concat", list(range(2, 1002)))), "at most"),
])
def test_genotypes_that_only_look_valid_are_refused(tmp_path, capsys, change, word):
    d = G.to_dict(G.DARTS_V2, G.PRIMITIVES, {})
    change(d)
    (tmp_path / "g.json").write_text(json.dumps(d))
    with pytest.raises(G.GenotypeError, match=word):
        G.load_with_meta(str(tmp_path / "g.json"))
    exits_2(visualize.main, [str(tmp_path / "g.json"), "--out", str(tmp_path / "v")], capsys, word)
    assert not (tmp_path / "v").exists() or not [f for f in os.listdir(tmp_path / "v") if not f.startswith(".")]


def test_loading_a_long_table_answers_a_signal_at_once(tmp_path, monkeypatch):
    """A table loads during a search's set-up: a SIGTERM there stops the load within the row it arrives in."""
    import signal
    rows = [ARCH, ARCH2] * 2000
    (tmp_path / "t.csv").write_text("arch_str,energy_mj\n" + "".join(f"{a},{len(a)}\n" for a in rows))
    real, calls = benchmark.normalize_arch, []

    def arch(*a, **k):
        calls.append(1)
        if len(calls) == 100:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(benchmark, "normalize_arch", arch)
    with pytest.raises(runs.StoppedBySignal), runs.RunControl():
        benchmark.load_table(str(tmp_path / "t.csv"))
    assert len(calls) < 110


def test_fit_refuses_a_wide_table_and_its_own_input_as_out(tmp_path, capsys):
    from energy import main
    wide = tmp_path / "wide.csv"
    wide.write_text("genotype,energy_mj," + ",".join(f"c{i}" for i in range(5000)) + "\nDARTS_V2,1.0,"
                    + ",".join(["1"] * 5000) + "\n")
    capsys.readouterr()
    assert main(["fit", "--table", str(wide), "--column", "energy_mj", "--out", str(tmp_path / "m.json"),
                 "--no_progress"]) == 2
    assert "columns" in capsys.readouterr().err
    before = wide.read_bytes()
    assert main(["fit", "--table", str(wide), "--column", "energy_mj", "--out", str(wide), "--force"]) == 2
    assert "input" in capsys.readouterr().err and wide.read_bytes() == before


def test_pipes_and_devices_as_inputs_are_one_line_not_a_hang(tmp_path, capsys):
    from energy import main
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for flags in (["--genotype", str(fifo), "--report"], ["--arch", "DARTS_V2", "--report", "--energy_model", str(fifo)],
                  ["--arch", "DARTS_V2", "--report", "--measure_energy", "--watts", "5", "--weights", str(fifo)]):
        exits_2(train.main, ["--dataset", "digits", *flags], capsys, "regular file")
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(benchmark.BenchmarkError):
            benchmark.load_table(path)
    capsys.readouterr()
    assert main(["fit", str(fifo), "--out", str(tmp_path / "m.json")]) == 2
    assert main(["fit", "--table", str(fifo), "--column", "e", "--out", str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr().err.count("regular file") == 2
