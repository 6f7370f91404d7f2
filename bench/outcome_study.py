"""The search's outcome on Fashion-MNIST: does an energy weight (or budget) buy a cheaper cell at the same accuracy
of the trained network? One command runs (or resumes) every search and every training, then writes the table.

    python bench/outcome_study.py                     # everything; resumable (finished runs are not redone)
    python bench/outcome_study.py --report            # only the tables and pareto.png from what has finished
    python bench/outcome_study.py --report --readme   # ... and the table into README.md and bench/README.md
    python bench/outcome_study.py --jobs 2 --seeds 0,1,2 --out log/outcome

Protocol (constants below, sized for 2 shared CPU cores): Fashion-MNIST resized to 14x14 (area averaging); the arch
learning rate of every search from its length (architect.arch_lr_for_steps). NB201: supernet 8 channels, N=1,
a stratified 2,000-image subset (1,000 for the weights, 1,000 for the alphas), 10 epochs (160 arch steps, lr
0.037). DARTS: supernet 4 channels, 3 cells, its 8 primitives, a 1,000-image subset, batch 128, 8 epochs (32 arch
steps, lr 0.18: the supernet's step costs the same at any batch this small, so fewer, larger batches). Every derived cell is trained from scratch under one protocol per space (NB201 16 channels N=1; DARTS 8
channels 5 cells; a stratified 5,000-image subset of the training split, 6 epochs, batch 128, the full 10,000-image
test split, final epoch reported) and priced by the analytical estimator at that network's size (the searches price
their cells at the same size: --eval_channels/--eval_layers); NB201 cells also get the measured latencies of
`../shared/measurements/nb201_latency_ms.csv` through `--benchmark`.

Writes into --out: one folder per run (`<space>/<config>-s<seed>/`, its training in `train/`), `runs.csv` (one row
per run), `table.md` (mean and sd over seeds per configuration, ratios against weight 0), `pareto.png`.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from plumbing import jsonfile  # noqa: E402
import pareto  # noqa: E402
from plumbing import utils  # noqa: E402

LATENCIES = os.path.join(ROOT, "..", "shared", "measurements", "nb201_latency_ms.csv")
DATA = ["--dataset", "fashion_mnist", "--image_size", "14", "--threads", "1", "--wandb", "disabled"]
TRAIN = ["--subset", "5000", "--epochs", "6", "--batch_size", "128", "--drop_path_prob", "0"]
SPACES = {  # space -> (search flags, train flags, configurations: label -> flags)
    "nb201": (["--space", "nb201", "--subset", "2000", "--epochs", "10", "--init_channels", "8", "--layers", "1",
               "--eval_channels", "16", "--eval_layers", "1"],
              ["--space", "nb201", "--init_channels", "16", "--layers", "1"],
              {"w0": ["--energy_weight", "0"], "w0.05": ["--energy_weight", "0.05"],
               "w0.2": ["--energy_weight", "0.2"], "w0.5": ["--energy_weight", "0.5"],
               "budget0.08": ["--energy_budget", "0.08"]}),
    "darts": (["--subset", "1000", "--epochs", "8", "--batch_size", "128", "--init_channels", "4", "--layers", "3", "--eval_channels", "8",
               "--eval_layers", "5"],
              ["--init_channels", "8", "--layers", "5", "--learning_rate", "0.05"],
              {"w0": ["--energy_weight", "0"], "w0.05": ["--energy_weight", "0.05"],
               "w0.5": ["--energy_weight", "0.5"]}),
}
DEVICES = ["1080ti_1", "titan_rtx_256", "gold_6226", "pixel2"]  # latency columns shown in the table (all in runs.csv)


def jobs(seeds: List[int], spaces: List[str], out: str) -> List[Dict[str, Any]]:
    """Space by space (in --spaces order), seed-major within one, so a study stopped part-way has every
    configuration of the first space at its first seeds."""
    todo = []
    for space in spaces:
        for seed in seeds:
            search_flags, train_flags, configs = SPACES[space]
            for label, flags in configs.items():
                name = f"{label}-s{seed}"
                run_dir = os.path.join(out, space, name)
                bench = ["--benchmark", LATENCIES] if space == "nb201" else []
                search = [sys.executable, "train_search.py", *DATA, *search_flags, *flags, *bench,
                          "--seed", str(seed), "--log_dir", os.path.join(out, space), "--run_name", name]
                train = [sys.executable, "train.py", *DATA, *TRAIN, *train_flags, "--genotype",
                         os.path.join(run_dir, "genotype.json"), "--seed", str(seed), "--log_dir", run_dir,
                         "--run_name", "train"]
                todo.append({"name": f"{space}/{name}", "run_dir": run_dir, "search": search, "train": train})
    return todo


def collect(run_dir: str, space: str, label: str) -> Optional[Dict[str, Any]]:
    """One row of runs.csv from a finished search (and its training when finished)."""
    if not pareto.search_finished(run_dir):
        return None
    args = pareto.read_args(run_dir)
    genotype = jsonfile.read(os.path.join(run_dir, "genotype.json"), "genotype file")
    meta = genotype["meta"]
    metrics = jsonfile.read_lines(os.path.join(run_dir, "metrics.jsonl"), "metrics file")
    summary = jsonfile.read(os.path.join(run_dir, "train", "summary.json"), "summary file", {})
    row = {"space": space, "config": label, "seed": args["seed"], "energy_weight": args["energy_weight"],
           "energy_budget_mj": args.get("energy_budget"), "arch_learning_rate": args["arch_learning_rate"],
           "expected_energy_first_mj": metrics[0]["expected_energy_mj"],
           "expected_energy_last_mj": metrics[-1]["expected_energy_mj"],
           "alpha_entropy_last": metrics[-1].get("alpha_entropy"), "search_valid_acc": meta.get("valid_acc"),
           "energy_mj": summary.get("energy_mj", meta.get("energy_mj")), "params": summary.get("params"),
           "test_acc": summary.get("test_acc"), "arch": describe(genotype, space)}
    row.update({k[len("bench_"):]: v for k, v in meta.items() if k.startswith("bench_")})
    return row


def describe(genotype: Dict[str, Any], space: str) -> str:
    if space == "nb201":
        return genotype.get("arch_str") or genotype.get("arch") or str(genotype.get("normal"))
    return ";".join(f"{op}~{i}" for op, i in genotype["normal"]) + " | " + \
        ";".join(f"{op}~{i}" for op, i in genotype["reduce"])


def mean_sd(values: List[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def table(rows: List[Dict[str, Any]]) -> str:
    """Mean ± sd over seeds per configuration; energy and accuracy also against weight 0 of the same space."""
    out = ["| space | config | seeds | test acc (%) | Δ acc vs w0 | est. energy (mJ) | vs w0 | ≥30 % cheaper, ≤1 pt "
           "lower | expected energy 1st → last epoch (mJ) | " + " | ".join(f"{d} (ms)" for d in DEVICES) + " |",
           "|" + "---|" * (9 + len(DEVICES))]
    for space in SPACES:
        base = [r for r in rows if r["space"] == space and r["config"] == "w0" and r["test_acc"] is not None]
        base_e = statistics.mean(r["energy_mj"] for r in base) if base else None
        base_a = statistics.mean(r["test_acc"] for r in base) if base else None
        for label in SPACES[space][2]:
            rs = [r for r in rows if r["space"] == space and r["config"] == label]
            trained = [r for r in rs if r["test_acc"] is not None]
            if not rs:
                continue
            e = statistics.mean(r["energy_mj"] for r in trained) if trained else None
            a = statistics.mean(r["test_acc"] for r in trained) if trained else None
            ratio = f"{100 * (e / base_e - 1):+.0f} %" if e is not None and base_e else "-"
            delta = f"{a - base_a:+.2f}" if a is not None and base_a is not None else "-"
            bar = "-" if label == "w0" or ratio == "-" or delta == "-" else \
                ("yes" if e <= 0.7 * base_e and a >= base_a - 1.0 else "no")
            expected = (f"{statistics.mean(r['expected_energy_first_mj'] for r in rs):.4f} → "
                        f"{statistics.mean(r['expected_energy_last_mj'] for r in rs):.4f}")
            lat = [mean_sd([r.get(d) for r in rs]) if space == "nb201" else "-" for d in DEVICES]
            out.append(f"| {space} | {label} | {len(trained)}/{len(rs)} | {mean_sd([r['test_acc'] for r in trained])}"
                       f" | {delta} | {mean_sd([r['energy_mj'] for r in trained])} | {ratio} | {bar} | {expected} | "
                       + " | ".join(lat) + " |")
    return "\n".join(out)


def plot(rows: List[Dict[str, Any]], path: str) -> str:
    """Test accuracy vs estimated energy, one panel per space: runs as dots, mean ± sd per configuration."""
    from plumbing.plots import _plt
    plt = _plt()
    spaces = [s for s in SPACES if any(r["space"] == s and r["test_acc"] is not None for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(spaces)), figsize=(6.5 * max(1, len(spaces)), 4.8), squeeze=False)
    for ax, space in zip(axes[0], spaces):
        labels = list(SPACES[space][2])
        cmap = plt.get_cmap("viridis")
        for k, label in enumerate(labels):
            pts = [(r["energy_mj"], r["test_acc"]) for r in rows if r["space"] == space and r["config"] == label
                   and r["test_acc"] is not None]
            if not pts:
                continue
            color = cmap(0.85 * k / max(1, len(labels) - 1))
            e, a = zip(*pts)
            ax.scatter(e, a, color=color, alpha=0.35, s=25)
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            ax.errorbar(statistics.mean(e), statistics.mean(a), xerr=sd(e), yerr=sd(a), fmt="o", ms=8, color=color,
                        capsize=4, label=f"{label} (n={len(pts)})")
        ax.set_xlabel("estimated energy of the trained network (mJ per image)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{space}: Fashion-MNIST 14x14, cells trained from scratch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_job(job: Dict[str, Any], log) -> str:
    """The search (resumed from its checkpoint if one is there), then the training; finished parts are skipped."""
    out = job["run_dir"] + ".out"
    os.makedirs(os.path.dirname(job["run_dir"]), exist_ok=True)
    if not pareto.search_finished(job["run_dir"]):
        cmd = job["search"] + (["--resume", job["run_dir"]]
                               if os.path.isfile(os.path.join(job["run_dir"], "checkpoint.pt")) else [])
        if pareto.run_command(cmd, out) != 0:
            return f"{job['name']}: search failed (see {out})"
    train_dir = os.path.join(job["run_dir"], "train")
    if not os.path.isfile(os.path.join(train_dir, "summary.json")):
        cmd = job["train"] + (["--resume", train_dir]
                              if os.path.isfile(os.path.join(train_dir, "checkpoint.pt")) else [])
        if pareto.run_command(cmd, out) != 0:
            return f"{job['name']}: training failed (see {out})"
    return f"{job['name']}: done"


def report(out: str, seeds: List[int], spaces: List[str]) -> str:
    rows = []
    for job in jobs(seeds, spaces, out):
        space, name = job["name"].split("/")
        row = collect(job["run_dir"], space, name.rsplit("-s", 1)[0])
        if row is not None:
            rows.append(row)
    if not rows:
        return "no finished search yet"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in keys} for r in rows)
    utils.atomic_write_text(os.path.join(out, "runs.csv"), buf.getvalue())
    text = table(rows)
    utils.atomic_write_text(os.path.join(out, "table.md"), text + "\n")
    if any(r["test_acc"] is not None for r in rows):
        plot(rows, os.path.join(out, "pareto.png"))
    return text


MARK, END = "<!-- outcome-table -->", "<!-- /outcome-table -->"


def write_readmes(out: str, text: str) -> None:
    """The table between the markers of README.md and bench/README.md; pareto.png as bench/outcome_pareto.png."""
    import shutil
    for path in (os.path.join(ROOT, "README.md"), os.path.join(HERE, "README.md")):
        doc = open(path, encoding="utf-8").read()
        if MARK in doc and END in doc:
            head, rest = doc.split(MARK, 1)
            utils.atomic_write_text(path, head + MARK + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    if os.path.isfile(os.path.join(out, "pareto.png")):
        shutil.copyfile(os.path.join(out, "pareto.png"), os.path.join(HERE, "outcome_pareto.png"))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "log", "outcome"), help="the study's folder")
    p.add_argument("--seeds", type=pareto.ints, default=pareto.ints("0,1,2"))
    p.add_argument("--spaces", default="nb201,darts", help="comma list of nb201, darts")
    p.add_argument("--jobs", type=int, default=3, help="runs at a time")
    p.add_argument("--report", action="store_true", help="only write the tables from what has finished")
    p.add_argument("--readme", action="store_true",
                   help="also put the table into README.md and bench/README.md, the figure into bench/")
    args = p.parse_args(argv)
    spaces = [s for s in args.spaces.split(",") if s]
    if any(s not in SPACES for s in spaces) or not spaces:
        p.error(f"--spaces: a comma list of {', '.join(SPACES)}")
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        from tqdm import tqdm
        todo = jobs(args.seeds, spaces, args.out)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for msg in tqdm(pool.map(lambda j: run_job(j, print), todo), total=len(todo), desc="study"):
                print(msg, flush=True)
                report(args.out, args.seeds, spaces)  # the table grows as runs finish
    text = report(args.out, args.seeds, spaces)
    print(text)
    if args.readme:
        write_readmes(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
