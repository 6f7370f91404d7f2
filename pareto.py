"""The accuracy-energy trade-off: one search per energy weight and seed, then pareto.csv and pareto.png.

    python pareto.py --dataset digits --energy_weights 0,0.1,0.5 --epochs 5          # flags pass to the search
    python pareto.py --dataset digits --energy_weights 0,0.1,0.5 --train              # also train each cell
    python pareto.py --from log/run1 log/run2 --run_name mine                          # plot existing runs
    python pareto.py --launcher slurm --slurm_partition gpu --dataset cifar10 ...      # one SLURM job per search

How the searches run (a local pool, submitit's local executor, SLURM job arrays) is launchers.py's business.

A sweep is resumable: a search (or training) that finished is not run again.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional

from plumbing import jsonfile
from plumbing import launchers
from plumbing import options
from plumbing import runs
import spaces
from plumbing import utils
from plumbing.cliargs import CLIError, check, fail, positive_int
from plumbing.tracker import Tracker, wandb_mode

COLUMNS = ["energy_weight", "seed", "genotype_energy_mj", "params", "macs", "valid_acc", "test_acc", "run"]


def number_list(cast, what: str, kind: str):
    """argparse type: a comma list of numbers of type `cast` within `cliargs.LIMITS[kind]`, each listed once (a
    repeat would run, and list, the same search twice)."""
    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a comma list of {what}") from None
        if not values or any(not math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"{text[:60]!r} must list finite {what}")
        try:
            for v in values:
                check(kind, v, what[:-1])
        except CLIError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return list(dict.fromkeys(v + 0 for v in values))  # + 0: -0.0 is 0.0, one run named w0
    return parse


floats, ints = number_list(float, "weights", "weight"), number_list(int, "seeds", "seed")


def search_finished(run_dir: str) -> bool:
    """A search is finished when its genotype.json says it stopped early, or metrics.jsonl holds every epoch its
    args.json asked for. Damaged files are one CLIError naming them."""
    args_path, metrics = os.path.join(run_dir, "args.json"), os.path.join(run_dir, "metrics.jsonl")
    genotype = os.path.join(run_dir, "genotype.json")
    if not all(os.path.isfile(p) for p in (args_path, metrics, genotype)):
        return False
    args = read_args(run_dir)
    space = spaces.get(jsonfile.get(args, "space", str, args_path, "darts"))
    if space.load(genotype)[1].get("early_stop"):
        return True
    epochs = jsonfile.positive(jsonfile.get(args, "epochs", int, args_path), f"{args_path}: 'epochs'")
    return len(jsonfile.read_lines(metrics, "metrics file")) >= epochs


def read_args(run_dir: str) -> dict:
    """A run folder's args.json as an object ({} when the folder has none)."""
    path = os.path.join(run_dir, "args.json")
    return jsonfile.expect(jsonfile.read(path, "args file", {}), dict, f"args file {path}")


def plan(args: argparse.Namespace, passthrough: List[str], sweep_dir: str) -> List[Dict[str, Any]]:
    """One job per (weight, seed): the search command and, with --train, the training command."""
    jobs = []
    for w in args.energy_weights:
        for s in args.seeds:
            name = f"w{w:g}-s{s}"
            run_dir = os.path.join(sweep_dir, name)
            common = (["--dataset", args.dataset] if args.dataset else []) + ["--space", args.space]
            search = [sys.executable, "train_search.py", *passthrough, "--energy_weight", str(w), "--seed", str(s),
                      "--log_dir", sweep_dir, "--run_name", name, "--wandb", args.wandb, *common]
            if args.benchmark:
                search += ["--benchmark", args.benchmark]
            train = None
            if args.train:
                train = [sys.executable, "train.py", "--genotype", os.path.join(run_dir, "genotype.json"),
                         "--seed", str(s), "--log_dir", run_dir, "--run_name", "train", "--wandb", args.wandb,
                         *shlex.split(args.train_args), *common]
            jobs.append({"name": name, "run_dir": run_dir, "search": search, "train": train})
    return jobs


def next_step(job: Dict[str, Any], phase: str, sweep_dir: str, log) -> Optional[launchers.Step]:
    """What `job` still has to run in `phase` ("search" or "training"); None when that is finished (logged as
    skipped) or not asked for. A launcher runs it, with --resume when its run folder holds a checkpoint."""
    out = os.path.join(sweep_dir, f"{job['name']}.out")
    if phase == "search":
        if search_finished(job["run_dir"]):
            log(f"{job['name']}: search already finished, skipped")
            return None
        return launchers.Step(job["name"], phase, job["search"], job["run_dir"], out)
    if not job["train"]:
        return None
    train_dir = os.path.join(job["run_dir"], "train")
    if os.path.isfile(os.path.join(train_dir, "summary.json")):
        log(f"{job['name']}: training already finished, skipped")
        return None
    return launchers.Step(job["name"], phase, job["train"], train_dir, out)


def collect(run_dir: str, estimator) -> Dict[str, Any]:
    """One pareto.csv row from a search run folder (and its train/ subfolder when trained)."""
    from model import network_report
    args = read_args(run_dir)
    space = spaces.get(jsonfile.get(args, "space", str, f"args file of {run_dir}", "darts"))
    genotype, meta = space.load(os.path.join(run_dir, "genotype.json"))
    _, info, channels, layers = options.evaluation_network(meta, space=space.name)
    report = network_report(space.network(genotype, channels, info, layers).eval(), estimator, info)
    summary_path = os.path.join(run_dir, "train", "summary.json")
    summary = jsonfile.expect(jsonfile.read(summary_path, "summary file", {}), dict, summary_path)
    where = f"run {run_dir}"
    return {"energy_weight": jsonfile.expect(args.get("energy_weight", meta.get("energy_weight")), (int, float),
                                             f"{where}: energy_weight"),
            "seed": jsonfile.expect(args.get("seed", meta.get("seed")), (int, type(None)), f"{where}: seed"),
            "genotype_energy_mj": report.energy_mj, "params": report.params, "macs": report.macs,
            "valid_acc": meta.get("valid_acc"),
            "test_acc": jsonfile.get(summary, "test_acc", (int, float), summary_path, None),
            "run": os.path.abspath(run_dir), "arch": space.describe(genotype)}


def write_outputs(rows: List[Dict[str, Any]], out_dir: str, tracker: Tracker) -> Dict[str, str]:
    from plumbing.plots import pareto_plot
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


OWN_FLAGS = ("--energy_weight", "--seed", "--log_dir", "--run_name", "--wandb", "--resume", "--space", "--benchmark")


def check_passthrough(args: argparse.Namespace, passthrough: List[str]) -> None:
    """Dry-parse what goes to train_search.py (and --train_args to train.py) before launching anything: an
    unknown flag or a bad value is one CLIError here, not a failed search later."""
    import train
    import train_search
    clash = [f for f in passthrough if f.split("=", 1)[0] in OWN_FLAGS]
    if clash:
        raise CLIError(f"{', '.join(clash)}: pareto.py sets these for each search itself")
    try:
        train_args = shlex.split(args.train_args)
    except ValueError as e:
        raise CLIError(f"--train_args {args.train_args!r}: {e}") from None
    dataset = (["--dataset", args.dataset] if args.dataset else []) + ["--space", args.space]
    for w in args.energy_weights:
        search_args = dry_parse(train_search.build_parser(), "train_search.py", passthrough + dataset +
                                ["--energy_weight", str(w)])
        train_search.resolve(search_args)
    if args.train:
        train.resolve(dry_parse(train.build_parser(), "train.py", train_args + dataset + ["--genotype", "g.json"]))


def dry_parse(parser: argparse.ArgumentParser, script: str, argv: List[str]) -> argparse.Namespace:
    def error(message: str):
        raise CLIError(f"flags for {script}: {message}")
    parser.error = error
    return parser.parse_args(argv)


def check_benchmark(args: argparse.Namespace):
    """The --benchmark table (None without one), its --x / --y columns checked before anything runs."""
    if not args.benchmark:
        if args.x or args.y:
            raise CLIError("--x / --y name columns of a --benchmark table: give one")
        return None
    from nb201 import benchmark
    if args.space != "nb201":
        raise CLIError("--benchmark looks up NB201 arch strings: it needs --space nb201")
    if bool(args.x) != bool(args.y):
        raise CLIError("--x and --y go together: the two columns of the benchmark plot")
    table = benchmark.load_table(args.benchmark)
    if args.x:
        table.check_columns([args.x, args.y])
    return table


def benchmark_figure(args: argparse.Namespace, table, rows: List[Dict[str, Any]], sweep_dir: str, tracker,
                     log) -> str:
    """The sweep's cells on the benchmark's --x / --y columns over the table's cloud and front (benchmark.png)."""
    from nb201 import benchmark
    cells = [(f"w={r['energy_weight']:g} s={r['seed']}", r["arch"]) for r in rows]
    path, missing = benchmark.plot_sweep(table, cells, args.x, args.y, os.path.join(sweep_dir, "benchmark.png"),
                                         benchmark.default_better(args.x), benchmark.default_better(args.y),
                                         f"sweep cells on {os.path.basename(args.benchmark)}")
    if missing:
        log.info(f"not in {args.benchmark} (left out of {path}): {', '.join(missing)}")
    tracker.log({"benchmark": tracker.image(path)})
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description="Accuracy-energy sweep over energy weights and seeds; unknown flags "
                                            "go to train_search.py.")
    p.add_argument("--energy_weights", type=floats, default=floats("0,0.02,0.05,0.1,0.2,0.5"))
    p.add_argument("--seeds", type=ints, default=ints("0,1,2"))
    p.add_argument("--dataset", default=None, help="passed to the search and the training")
    p.add_argument("--space", default="darts", choices=spaces.SPACE_NAMES, help="passed to the search and the training")
    p.add_argument("--benchmark", default=None,
                   help="--space nb201: a table with an arch_str column (NAS-Bench-201, HW-NAS-Bench); passed to the "
                        "searches, and with --x/--y the sweep's cells are plotted on two of its columns")
    p.add_argument("--x", default=None, help="with --benchmark: the column on the plot's x axis (e.g. an energy)")
    p.add_argument("--y", default=None, help="with --benchmark: the column on the plot's y axis (e.g. an accuracy)")
    p.add_argument("--train", action="store_true", help="also train each derived genotype with train.py")
    p.add_argument("--train_args", default="", help="extra flags for train.py, quoted, e.g. \"--epochs 10\"")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="searches (and trainings) running at once (default 1; --launcher slurm: all)")
    p.add_argument("--from", dest="from_runs", nargs="+", default=None, help="plot these search run folders")
    p.add_argument("--log_dir", default="./log")
    p.add_argument("--force", action="store_true", help="with --from: replace the pareto.csv of an existing sweep")
    p.add_argument("--run_name", default=None, help="default pareto-<timestamp>")
    p.add_argument("--wandb", default=None, choices=["offline", "online", "disabled"])
    p.add_argument("--energy_model", default=None)
    launchers.add_args(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args, passthrough = p.parse_known_args(argv)
    args.wandb = wandb_mode(args.wandb)
    args.run_name = args.run_name or f"pareto-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        check_sweep_folder(args)
        if args.from_runs:
            args.from_runs = list(dict.fromkeys(os.path.realpath(r) for r in args.from_runs))  # each run once
            missing = [r for r in args.from_runs if not os.path.isfile(os.path.join(r, "genotype.json"))]
            if missing:
                raise CLIError(f"--from: no genotype.json in {', '.join(missing)}")
        else:
            check_passthrough(args, passthrough)
        launchers.check(args)
        table = check_benchmark(args)
        estimator = utils.load_estimator(args.energy_model, None)
        with runs.RunFolder(argparse.Namespace(log_dir=args.log_dir, run_name=args.run_name,
                                               dataset=args.dataset or "sweep"), "pareto", reuse=True) as folder:
            return sweep(args, passthrough, folder.path, estimator, table)
    except CLIError as e:
        p.print_usage(sys.stderr)
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; finished searches keep their folders, run the same command again to continue", code=130)


def check_sweep_folder(args: argparse.Namespace) -> None:
    """`--log_dir` / `--run_name` name a sweep folder: never a search's or a training's run folder, and with
    --from never an existing sweep's (its pareto.csv would be replaced by one of other runs) unless --force."""
    runs.check_log_dir(args.log_dir)
    runs.check_run_name(args.run_name)
    folder = os.path.join(args.log_dir, args.run_name)
    work = [f for f in runs.WORK_FILES if os.path.exists(os.path.join(folder, f))]
    if work:
        raise CLIError(f"--run_name {args.run_name}: {folder} is the run folder of a search or training "
                       f"({', '.join(work)}), not a sweep; choose another --run_name")
    if args.from_runs and not args.force and os.path.isfile(os.path.join(folder, "pareto.csv")):
        raise CLIError(f"--run_name {args.run_name}: {folder} already holds a sweep's pareto.csv, which --from "
                       f"would replace; choose a new --run_name, or add --force to replace it")


def sweep(args: argparse.Namespace, passthrough: List[str], sweep_dir: str, estimator, table=None) -> int:
    """Run (or resume) the searches of the sweep, then write pareto.csv and pareto.png."""
    log = runs.setup_logging(sweep_dir)
    tracker = Tracker(args.wandb, sweep_dir, {**vars(args), "passthrough": passthrough}, "energy-aware-darts",
                      args.run_name, log=log)
    if args.from_runs:
        run_dirs = args.from_runs
    else:
        jobs = plan(args, passthrough, sweep_dir)
        log.info(f"sweep {sweep_dir}: {len(jobs)} searches, {args.jobs or 'all'} at a time ({args.launcher})")
        for msg in launchers.run(args, jobs, lambda j, phase: next_step(j, phase, sweep_dir, log.info), sweep_dir,
                                 log.info):
            log.info(msg)
        run_dirs = [j["run_dir"] for j in jobs if os.path.isfile(os.path.join(j["run_dir"], "genotype.json"))]
    rows = [collect(d, estimator) for d in run_dirs]
    if not rows:
        tracker.finish()
        fail("no finished search to plot", code=1)
    out = write_outputs(rows, sweep_dir, tracker)
    if table is not None and args.x:
        out["png"] += " and " + benchmark_figure(args, table, rows, sweep_dir, tracker, log)
    tracker.finish()
    for r in sorted(rows, key=lambda r: (r["energy_weight"], r["seed"] or 0)):
        log.info(f"w={r['energy_weight']:g} seed={r['seed']} energy {r['genotype_energy_mj']:.4f} mJ "
                 f"valid_acc {r['valid_acc']} test_acc {r['test_acc']}")
    log.info(f"wrote {out['csv']} and {out['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
