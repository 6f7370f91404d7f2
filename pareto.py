"""The accuracy-energy trade-off: one search per energy weight and seed, then pareto.csv and pareto.png.

    python pareto.py --dataset digits --energy_weights 0,0.1,0.5 --epochs 5          # flags pass to the search
    python pareto.py --dataset digits --energy_weights 0,0.1,0.5 --train              # also train each cell
    python pareto.py --from log/run1 log/run2 --run_name mine                          # plot existing runs

A sweep is resumable: a search (or training) that finished is not run again.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

import genotypes as G
import runs
import utils
from datasets import DataInfo, known_info
from tracker import Tracker, wandb_mode

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["energy_weight", "seed", "genotype_energy_mj", "params", "macs", "valid_acc", "test_acc", "run"]


def number_list(cast, what: str):
    """argparse type: a comma list of non-negative numbers of type `cast`."""
    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {what}") from None
        if not values or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r} must list non-negative {what}")
        return values
    return parse


floats, ints = number_list(float, "numbers"), number_list(int, "integers")


def search_finished(run_dir: str) -> bool:
    """A search is finished when metrics.jsonl holds every epoch its args.json asked for."""
    args = utils.read_json(os.path.join(run_dir, "args.json"))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not args or not os.path.isfile(metrics) or not os.path.isfile(os.path.join(run_dir, "genotype.json")):
        return False
    with open(metrics, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip()) >= args["epochs"]


def run_command(cmd: List[str], log_path: str) -> int:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT).returncode


def plan(args: argparse.Namespace, passthrough: List[str], sweep_dir: str) -> List[Dict[str, Any]]:
    """One job per (weight, seed): the search command and, with --train, the training command."""
    jobs = []
    for w in args.energy_weights:
        for s in args.seeds:
            name = f"w{w:g}-s{s}"
            run_dir = os.path.join(sweep_dir, name)
            search = [sys.executable, "train_search.py", *passthrough, "--energy_weight", str(w), "--seed", str(s),
                      "--log_dir", sweep_dir, "--run_name", name, "--wandb", args.wandb]
            if args.dataset:
                search += ["--dataset", args.dataset]
            train = None
            if args.train:
                train = [sys.executable, "train.py", "--genotype", os.path.join(run_dir, "genotype.json"),
                         "--seed", str(s), "--log_dir", run_dir, "--run_name", "train", "--wandb", args.wandb,
                         *shlex.split(args.train_args)]
                if args.dataset:
                    train += ["--dataset", args.dataset]
            jobs.append({"name": name, "run_dir": run_dir, "search": search, "train": train})
    return jobs


def execute(job: Dict[str, Any], sweep_dir: str, log) -> str:
    out = os.path.join(sweep_dir, f"{job['name']}.out")
    if search_finished(job["run_dir"]):
        log(f"{job['name']}: search already finished, skipped")
    else:
        if os.path.isfile(os.path.join(job["run_dir"], "checkpoint.pt")):
            job["search"] += ["--resume", job["run_dir"]]
        if run_command(job["search"], out) != 0:
            return f"{job['name']}: search failed (see {out})"
    if job["train"]:
        if os.path.isfile(os.path.join(job["run_dir"], "train", "summary.json")):
            log(f"{job['name']}: training already finished, skipped")
        elif run_command(job["train"], out) != 0:
            return f"{job['name']}: training failed (see {out})"
    return f"{job['name']}: done"


def collect(run_dir: str, estimator) -> Dict[str, Any]:
    """One pareto.csv row from a search run folder (and its train/ subfolder when trained)."""
    from model import build_network, network_report
    args = utils.read_json(os.path.join(run_dir, "args.json")) or {}
    path = os.path.join(run_dir, "genotype.json")
    genotype, meta = G.load(path), G.load_meta(path)
    info = known_info(meta.get("dataset", args.get("dataset", "cifar10"))) or DataInfo(3, 10, 32)
    net = build_network(genotype, meta.get("eval_channels", 36), info.num_classes, meta.get("eval_layers", 20),
                        False, info.in_channels, info.image_size)
    report = network_report(net.eval(), estimator, info)
    summary = utils.read_json(os.path.join(run_dir, "train", "summary.json")) or {}
    return {"energy_weight": args.get("energy_weight", meta.get("energy_weight")),
            "seed": args.get("seed", meta.get("seed")), "genotype_energy_mj": report.energy_mj,
            "params": report.params, "macs": report.macs, "valid_acc": meta.get("valid_acc"),
            "test_acc": summary.get("test_acc"), "run": os.path.abspath(run_dir)}


def write_outputs(rows: List[Dict[str, Any]], out_dir: str, tracker: Tracker) -> Dict[str, str]:
    from plots import pareto_plot
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in sorted(rows, key=lambda r: (r["energy_weight"], r["seed"])):
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    csv_path = os.path.join(out_dir, "pareto.csv")
    utils.atomic_write_text(csv_path, buf.getvalue())
    acc = "test_acc" if rows and all(r.get("test_acc") is not None for r in rows) else "valid_acc"
    png = pareto_plot(rows, os.path.join(out_dir, "pareto.png"), acc,
                      f"{acc.replace('_', ' ')} vs estimated energy ({len(rows)} runs)")
    tracker.log({"pareto": tracker.image(png), "pareto_table": tracker.table(COLUMNS, [[r.get(k) for k in COLUMNS]
                                                                                    for r in rows])})
    return {"csv": csv_path, "png": png}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Accuracy-energy sweep over energy weights and seeds; unknown flags "
                                            "go to train_search.py.")
    p.add_argument("--energy_weights", type=floats, default=floats("0,0.02,0.05,0.1,0.2,0.5"))
    p.add_argument("--seeds", type=ints, default=ints("0,1,2"))
    p.add_argument("--dataset", default=None, help="passed to the search and the training")
    p.add_argument("--train", action="store_true", help="also train each derived genotype with train.py")
    p.add_argument("--train_args", default="", help="extra flags for train.py, quoted, e.g. \"--epochs 10\"")
    p.add_argument("--jobs", type=utils.positive_int, default=1, help="searches run in parallel processes")
    p.add_argument("--from", dest="from_runs", nargs="+", default=None, help="plot these search run folders")
    p.add_argument("--log_dir", default="./log")
    p.add_argument("--run_name", default=None, help="default pareto-<timestamp>")
    p.add_argument("--wandb", default=None, choices=["offline", "online", "disabled"])
    p.add_argument("--energy_model", default=None)
    args, passthrough = p.parse_known_args(argv)
    args.wandb = wandb_mode(args.wandb)
    args.run_name = args.run_name or f"pareto-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        if args.from_runs:
            missing = [r for r in args.from_runs if not os.path.isfile(os.path.join(r, "genotype.json"))]
            if missing:
                raise utils.CLIError(f"--from: no genotype.json in {', '.join(missing)}")
        args.dataset_for_dir = args.dataset or "sweep"
        sweep_dir = runs.make_run_dir(argparse.Namespace(log_dir=args.log_dir, run_name=args.run_name,
                                                          dataset=args.dataset_for_dir), "pareto")
        estimator = utils.load_estimator(args.energy_model, None)
    except utils.CLIError as e:
        p.print_usage(sys.stderr)
        runs.fail(str(e))
    log = runs.setup_logging(sweep_dir)
    tracker = Tracker(args.wandb, sweep_dir, {**vars(args), "passthrough": passthrough}, "energy-aware-darts",
                            args.run_name, log=log)
    if args.from_runs:
        run_dirs = args.from_runs
    else:
        jobs = plan(args, passthrough, sweep_dir)
        log.info(f"sweep {sweep_dir}: {len(jobs)} searches, {args.jobs} at a time")
        from tqdm import tqdm
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for msg in tqdm(pool.map(lambda j: execute(j, sweep_dir, log.info), jobs), total=len(jobs),
                            desc="sweep", disable=None):
                log.info(msg)
        run_dirs = [j["run_dir"] for j in jobs if os.path.isfile(os.path.join(j["run_dir"], "genotype.json"))]
    rows = [collect(d, estimator) for d in run_dirs]
    if not rows:
        runs.fail("no finished search to plot", code=1)
    out = write_outputs(rows, sweep_dir, tracker)
    tracker.finish()
    for r in sorted(rows, key=lambda r: (r["energy_weight"], r["seed"])):
        log.info(f"w={r['energy_weight']:g} seed={r['seed']} energy {r['genotype_energy_mj']:.4f} mJ "
                 f"valid_acc {r['valid_acc']} test_acc {r['test_acc']}")
    log.info(f"wrote {out['csv']} and {out['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
