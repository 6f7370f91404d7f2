"""CLI: ``python -m dl_energy_estimator {calibrate,export,fit,report} ...``.

calibrate: measure a grid of layers on this machine and fit. export: write what to measure on another device
(plain-torch programs with their traced features, and a standalone runner). fit: fit an energy model to the
runner's measurements.json, or to a CSV of whole networks someone else measured. report: print a model.

The package knows ``torch.nn`` layers, not search spaces: exporting whole networks (--genotype, --arch) and
``fit --table`` need a network builder, which a project passes to :func:`main` (``networks=``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from . import bundle as B
from .estimator import EnergyEstimator
from .fitting import spearman
from .grid import build_grid, split
from .measure import ALIASES, EnergyCounterUnavailable, measure
from .runner import output_file_problem, positive_number
from .schema import EnergyModelError
from .trace import EnergyMemoryError

PROG = "python -m dl_energy_estimator"
NetworkBuilder = Callable[[str, Any, "tuple[int, ...]", int, Optional[int], Optional[int]], torch.nn.Module]
"""(space, arch, input_shape (C, H, W), num_classes, channels or None, layers or None) -> the network to price."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2 (no usage dump, no traceback)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s!r}")
    return v


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = sub.add_parser("calibrate", help="measure a grid of layers on this machine and fit an energy model")
    c.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    c.add_argument("--out", default="energy_model.json", help="energy-model JSON to write")
    c.add_argument("--force", action="store_true", help="overwrite an existing --out (never a run folder's file)")
    c.add_argument("--watts", type=positive_number, default=None,
                   help="device power while busy (W); used as latency x watts when no energy counter is readable")
    c.add_argument("--source", choices=("auto", "zeus", "latency_x_watts") + tuple(ALIASES), default="auto",
                   help="auto: Zeus if it finds a counter, else latency x --watts (nvml, rapl: the same as zeus)")
    c.add_argument("--batch_size", type=_positive_int, default=1, help="deployment batch size")
    c.add_argument("--grid", choices=("small", "default"), default="small")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--heldout", type=float, default=0.25, help="fraction of the grid held out for validation")
    c.add_argument("--window_s", type=positive_number, default=None, help="measurement window per repeat (s)")
    c.add_argument("--threads", type=_positive_int, default=1, help="CPU threads while measuring (default 1)")
    c.add_argument("--no_progress", action="store_true")
    r = sub.add_parser("report", help="print an energy model's metadata and fit table")
    r.add_argument("path")

    e = sub.add_parser("export", help="write a bundle to measure on the deployment device (programs, features, "
                                      "run.py)")
    e.add_argument("--out", required=True, help="bundle folder to create (must not exist or be empty)")
    e.add_argument("--grid", choices=("small", "default"), default=None, help="the calibration grid of layers")
    e.add_argument("--genotype", nargs="+", default=[], metavar="G.json", help="genotype files of whole networks")
    e.add_argument("--arch", nargs="+", default=[], help="named genotypes (darts) or NB201 arch strings")
    e.add_argument("--program", choices=tuple(B.PROGRAMS), default="export",
                   help="export: torch.export .pt2 (the device's torch at least the exporting one); torchscript: "
                        ".pt files older torch versions load")
    _network_flags(e)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no_progress", action="store_true")

    f = sub.add_parser("fit", help="fit an energy model to measurements.json, or to a table of measured networks")
    f.add_argument("measurements", nargs="?", default=None, help="measurements.json written by a bundle's run.py")
    f.add_argument("--out", default="energy_model.json", help="energy-model JSON to write")
    f.add_argument("--force", action="store_true", help="overwrite an existing --out (never a run folder's file)")
    f.add_argument("--table", default=None, help="CSV of whole networks measured elsewhere (one row each)")
    f.add_argument("--column", default=None, help="the table's column of measured values (per image)")
    f.add_argument("--unit", default="mJ", help="unit of --column: J, mJ, uJ, nJ; or s, ms, us with --watts")
    f.add_argument("--watts", type=positive_number, default=None, help="power while busy, for a latency --unit")
    f.add_argument("--arch_column", default=None,
                   help="the table's architecture column (default: arch_str for nb201, genotype for darts: a "
                        "genotype.json object or a named genotype)")
    f.add_argument("--device_name", default=None, help="device name for the model's metadata")
    _network_flags(f)
    f.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    f.add_argument("--prior", default=None, metavar="auto|NAME",
                   help="start from the prior bank: 'auto' (the entry that explains the measurements best), an "
                        "entry's name (dl_energy_estimator/priors.json) or 'analytical'; default: the analytical model")
    f.add_argument("--no_progress", action="store_true")
    return p


def _network_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default="darts", help="search space of the networks (the network builder's names)")
    p.add_argument("--input_shape", default="3x32x32", help="C x H x W of one image (default 3x32x32)")
    p.add_argument("--batch_size", type=_positive_int, default=1, help="deployment batch size")
    p.add_argument("--num_classes", type=_positive_int, default=10)
    p.add_argument("--channels", type=_positive_int, default=None, help="network width (default: the space's)")
    p.add_argument("--layers", type=_positive_int, default=None, help="network depth (default: the space's)")
    p.add_argument("--run_as", choices=("auto", "derived", "reference"), default="auto",
                   help="how the networks ran where they were measured: derived (this project's networks; NB201's "
                        "`none` edges left out) or reference (the space's reference code: NAS-Bench-201's runs "
                        "`none` edges and sums every edge, as HELP, HW-NAS-Bench and the NAS-Bench-201 API "
                        "measured); auto: reference for fit --table of nb201 networks (published tables of arch "
                        "strings were measured with that code), derived otherwise (a bundle runs this project's)")


def _kfold_predictions(est0: EnergyEstimator, feats: list, y: np.ndarray, k: int, seed: int) -> np.ndarray:
    n = len(y)
    order = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    for f in range(k):
        test = order[f::k]
        train = np.setdiff1d(order, test)
        m = est0.fit_features([feats[i] for i in train], y[train], seed=seed, constant=False)
        pred[test] = [m.predict_features(feats[i]) for i in test]
    return pred


def _rel(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(pred - y) / y


def calibrate(args: argparse.Namespace) -> int:
    if not 0 < args.heldout < 1:
        print("calibrate: error: --heldout must be between 0 and 1", file=sys.stderr)
        return 2
    problem = output_file_problem(args.out, "--out", args.force)
    if problem:
        print(f"calibrate: error: {problem}", file=sys.stderr)
        return 2
    items = build_grid(args.grid, args.batch_size, args.seed)
    try:
        meas = measure([(it.module, it.shape) for it in items], device=args.device, watts=args.watts,
                       batch_size=args.batch_size, source=args.source, window_s=args.window_s,
                       progress=not args.no_progress, seed=args.seed,
                       threads=args.threads)
    except (EnergyCounterUnavailable, EnergyMemoryError, ValueError) as e:
        print(f"calibrate: error: {e}", file=sys.stderr)
        return 2
    y = np.asarray(meas, dtype=float)
    est0 = EnergyEstimator.default(batch_size=args.batch_size)
    feats = [est0.family_features(it.module, it.shape) for it in items]
    tr, te = split(items, args.heldout, args.seed)
    date = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    meta = {"name": f"{meas.source}-{meas.meta['device']}-b{args.batch_size}-{date[:10]}",
            "device": meas.meta["device"], "driver": meas.meta["driver"], "torch": torch.__version__,
            "dtype": "float32", "batch_size": args.batch_size, "source": meas.source, "date": date,
            "idle_w": meas.meta["idle_w"], "watts": args.watts}
    fitted = est0.fit_features([feats[i] for i in tr], y[tr], meta=meta, seed=args.seed, constant=False)
    ytr = y[tr]
    cv = _kfold_predictions(est0, [feats[i] for i in tr], ytr, 5, args.seed)
    pred_tr = np.array([fitted.predict_features(feats[i]) for i in tr])
    table = []
    for fam in sorted({it.family for it in items}):
        idx = [j for j, i in enumerate(tr) if items[i].family == fam]
        if not idx:
            continue
        table.append({"family": fam, "n": len(idx), "measured_mj": 1e3 * float(np.median(ytr[idx])),
                      "predicted_mj": 1e3 * float(np.median(pred_tr[idx])),
                      "cv_median_rel_error": float(np.median(_rel(cv[idx], ytr[idx])))})
    yte = y[te]
    pte = np.array([fitted.predict_features(feats[i]) for i in te])
    rho = float(spearmanr(pte, yte).statistic) if len(te) > 2 else float("nan")
    flops = np.array([feats[i].get("conv", np.zeros(3))[0] + feats[i].get("conv_pw", np.zeros(3))[0]
                      + feats[i].get("conv_dw", np.zeros(3))[0] + feats[i].get("linear", np.zeros(3))[0]
                      for i in te])
    rho_flops = float(spearmanr(flops, yte).statistic) if len(te) > 2 else float("nan")
    heldout = {"n": len(te), "spearman": rho, "spearman_macs_only": rho_flops,
               "median_rel_error": float(np.median(_rel(pte, yte))) if len(te) else float("nan"),
               "items": [{"name": items[i].name, "family": items[i].family, "measured_mj": 1e3 * float(y[i]),
                          "predicted_mj": 1e3 * float(p)} for i, p in zip(te, pte)]}
    stats = dict(fitted.fit_stats)
    stats.update({"grid": args.grid, "seed": args.seed, "n_grid": len(items), "n_train": len(tr),
                  "cv_folds": 5, "cv_median_rel_error": float(np.median(_rel(cv, ytr))),
                  "table": table, "heldout": heldout, "measurement": meas.meta})
    final = EnergyEstimator(fitted.coefficients, fitted.meta, stats)
    try:
        final.save(args.out)
    except OSError as e:
        print(f"calibrate: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(format_report(final))
    print(f"wrote {args.out} (sha256 {final.sha256()[:16]})")
    return 0


def _f(v, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def format_report(est: EnergyEstimator) -> str:
    m, fit = est.meta, est.fit_stats
    lines = [f"energy model {est.name}  (source {m['source']}, device {m['device']}, batch_size {m['batch_size']},"
             f" torch {m['torch']}, {m['date']})"]
    if m.get("idle_w") is not None and m["source"] in ("nvml", "rapl", "zeus", "counter_file", "power_file"):
        lines.append(f"idle power subtracted: {m['idle_w']:.2f} W")
    if fit.get("method") == "evidence":
        lines.append(f"prior {fit.get('prior')}; fit by the evidence on {fit.get('n_samples')} samples: "
                     f"{fit.get('why')}")
    cands = fit.get("candidates") or []
    if cands:
        lines.append(f"model chosen by {fit.get('cv_folds')}-fold cross-validation (x{fit.get('cv_repeats')}, seed "
                     f"{fit.get('seed')}) on {fit.get('n_samples')} samples: {fit.get('chosen')}  (* chosen; gain: "
                     f"CV Spearman over the scaled prior; z: gain / its bootstrap standard deviation)")
        lines.append(f"  {'candidate':<24} {'cv_spearman':>11} {'cv_med_rel_err':>14} {'gain':>7} {'z':>6}")
        for r in sorted(cands, key=lambda r: -(r.get("cv_spearman") or -2.0)):
            gain, sd = r.get("gain"), r.get("gain_sd")
            z = "n/a" if gain is None or not sd else f"{gain / sd:+.1f}"
            lines.append(f"{'*' if r.get('name') == fit.get('chosen') else ' '} {r.get('name', '?'):<24} "
                         f"{_f(r.get('cv_spearman'), '11.4f')} {_f(r.get('cv_median_rel_error'), '13.1%'):>14} "
                         f"{_f(gain, '+7.4f')} {z:>6}")
    if fit.get("intercept_mj"):
        lines.append(f"constant per forward pass (not in the per-layer model): {fit['intercept_mj']:.5f} mJ")
    if fit.get("n_samples") is not None and not fit.get("table"):
        lines.append(f"fitted on {fit.get('n_samples')} samples: median rel err {_f(fit.get('median_rel_error'), '.1%')}"
                     f", global scale {_f(fit.get('global_scale'), '.3g')}")
    if not fit.get("table"):
        if m["source"] == "analytical":
            lines.append("no fit statistics (analytical model)")
        return "\n".join(lines)
    lines.append(f"{'family':<12} {'n':>3} {'measured_mj':>12} {'predicted_mj':>13} {'cv_med_rel_err':>15}")
    for r in fit["table"]:
        lines.append(f"{r.get('family', '?'):<12} {_f(r.get('n'), '>3')} {_f(r.get('measured_mj'), '12.5f')} "
                     f"{_f(r.get('predicted_mj'), '13.5f')} {_f(r.get('cv_median_rel_error'), '14.1%'):>15}")
    lines.append(f"train: n={fit.get('n_train')} median rel err {_f(fit.get('median_rel_error'), '.1%')}, "
                 f"{fit.get('cv_folds')}-fold CV median rel err {_f(fit.get('cv_median_rel_error'), '.1%')}, "
                 f"global scale {_f(fit.get('global_scale'), '.3g')}")
    h = fit.get("heldout") or {}
    lines.append(f"held-out: n={h.get('n')} Spearman {_f(h.get('spearman'), '.3f')} (MACs only "
                 f"{_f(h.get('spearman_macs_only'), '.3f')}), median rel err {_f(h.get('median_rel_error'), '.1%')}")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
    try:
        est = EnergyEstimator.load(args.path)
    except EnergyModelError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(format_report(est))
    print(f"sha256 {est.sha256()}")
    return 0


# ------------------------------------------------------------------------------------------------ export / fit
def _need_networks(networks: Optional[NetworkBuilder], what: str, cmd: str) -> NetworkBuilder:
    if networks is None:
        raise B.BundleError(f"{what} needs a network builder (this package builds no search space's networks): run "
                            f"`python energy.py {cmd} ...` from the project root, or pass networks= to "
                            f"dl_energy_estimator.cli.main")
    return networks


def run_as(args: argparse.Namespace) -> str:
    """--run_as resolved: ``auto`` is ``reference`` for fit --table of nb201 networks, ``derived`` otherwise."""
    if args.run_as != "auto":
        return args.run_as
    return "reference" if getattr(args, "table", None) and args.space == "nb201" else "derived"


def _network(networks: NetworkBuilder, space: str, arch: Any, shape: tuple[int, ...], args: argparse.Namespace):
    try:
        # `reference` only when it resolves so (asked, or auto for an nb201 table): another project's builder need
        # not know the keyword
        extra = {"reference": True} if run_as(args) == "reference" else {}
        return networks(space, arch, shape, args.num_classes, args.channels, args.layers, **extra)
    except Exception as e:  # noqa: BLE001 - the builder's own error (bad genotype, bad shape): one line
        raise B.BundleError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _read_genotype(path: str) -> Any:
    doc = B.read_json(path, "a genotype file", B.BundleError)
    if not isinstance(doc, (dict, str)):
        raise B.BundleError(f"{path}: a genotype file holds a JSON object")
    return doc


def _check_out_dir(path: str, is_dir: bool, force: bool = False, inputs=()) -> None:
    """--out before any work: a bundle folder that is new or empty, or a file `output_file_problem` allows."""
    if not is_dir:
        problem = output_file_problem(path, "--out", force, inputs)
        if problem:
            raise B.BundleError(problem)
        return
    if not path or not path.strip():
        raise B.BundleError("--out is empty; name the bundle folder to create")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise B.BundleError(f"--out {path} exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise B.BundleError(f"output folder {parent} does not exist")


def export_cmd(args: argparse.Namespace, networks: Optional[NetworkBuilder] = None) -> int:
    """The bundle of --grid's layers (standalone) and of --genotype / --arch's networks (built by `networks`)."""
    if not (args.grid or args.genotype or args.arch):
        raise B.BundleError("nothing to export: give --grid, --genotype or --arch")
    if args.genotype or args.arch:
        networks = _need_networks(networks, "--genotype/--arch", "export")
    _check_out_dir(args.out, True)
    shape = B.parse_shape(args.input_shape)
    items = []
    if args.grid:
        for it in build_grid(args.grid, args.batch_size, args.seed):
            items.append(B.Item(it.name, "layer", it.family, it.module, it.shape))
    nets = [(os.path.splitext(os.path.basename(g))[0], _read_genotype(g), {"genotype_file": g})
            for g in args.genotype] + [(a if len(a) <= 40 else f"arch{i}", a, {"arch": a})
                                       for i, a in enumerate(args.arch)]
    for name, arch, extra in nets:
        try:
            module = _network(networks, args.space, arch, shape, args)
        except B.BundleError as e:
            raise B.BundleError(f"{extra.get('genotype_file') or extra.get('arch')}: {e}") from None
        extra = {**extra, "space": args.space, "genotype": arch if isinstance(arch, (dict, str)) else None}
        items.append(B.Item(name, "network", "network", module, (args.batch_size,) + shape, extra))
    est = EnergyEstimator.default(batch_size=args.batch_size)
    feats = [est.family_features(it.module, it.shape) for it in items]
    manifest = B.export(items, args.out, feats, args.program, args.batch_size, progress=not args.no_progress)
    print(f"wrote {len(manifest['items'])} {manifest['program']} programs to {args.out} (torch {manifest['producer']['torch']});"
          f" on the device: python {os.path.join(args.out, 'run.py')} --watts W (or --energy_file / --power_file),"
          f" then: python -m dl_energy_estimator fit measurements.json --out energy_model.json")
    return 0


def _table_features(args: argparse.Namespace, est: EnergyEstimator,
                    networks: NetworkBuilder) -> tuple[list, np.ndarray, dict]:
    arch_col = args.arch_column or ("arch_str" if args.space == "nb201" else "genotype")
    rows = B.read_table(args.table, arch_col, args.column, args.unit, args.watts, B.parse_shape(args.input_shape),
                        json_arch=args.space == "darts")
    cache: dict = {}
    feats = []
    it = rows
    if not args.no_progress:
        from tqdm import tqdm
        it = tqdm(rows, desc="tracing networks", unit="net")
    for r in it:
        key = (json.dumps(r.arch, sort_keys=True), r.shape)
        if key not in cache:
            try:
                net = _network(networks, args.space, r.arch, r.shape, args)
            except B.BundleError as e:
                raise B.BundleError(f"{args.table} line {r.line}: {e}") from None
            cache[key] = est.family_features(net, (args.batch_size,) + r.shape)
        feats.append(cache[key])
    meta = {"source": "external", "device": args.device_name or f"measured elsewhere ({os.path.basename(args.table)})",
            "driver": "unknown", "torch": "unknown", "table": os.path.basename(args.table), "column": args.column,
            "unit": args.unit, "space": args.space, "run_as": run_as(args)}
    return feats, np.array([r.joules for r in rows]), meta


def fit_cmd(args: argparse.Namespace, networks: Optional[NetworkBuilder] = None) -> int:
    """Fit to a bundle's measurements.json (standalone) or to --table's networks (built by `networks`)."""
    if (args.measurements is None) == (args.table is None):
        raise B.BundleError("give either a measurements.json or --table CSV (with --column)")
    if args.table and not args.column:
        raise B.BundleError("--table needs --column (the measured values)")
    if args.table:
        networks = _need_networks(networks, "--table", "fit")
    _check_out_dir(args.out, False, args.force, [args.measurements, args.table])
    if args.measurements:
        feats, y, doc = B.read_measurements(args.measurements)
        batch = doc["batch_size"]
        dev = doc["device"]
        meta = {"source": doc["source"], "device": args.device_name or dev.get("name", "unknown"),
                "driver": dev.get("platform", "unknown"), "torch": dev.get("torch", "unknown"),
                "dtype": doc.get("dtype", "float32")}
        if doc["source"] not in ("counter_file", "power_file", "latency_x_watts"):
            raise B.BundleError(f"{args.measurements}: unknown source {doc['source']!r}")
    else:
        batch = args.batch_size
        feats, y, meta = _table_features(args, EnergyEstimator.default(batch_size=batch), networks)
    feats, y, note = B.merge_repeats(feats, y)
    if note:
        print(f"fit: note: {note}", file=sys.stderr)
    est0 = EnergyEstimator.default(batch_size=batch)
    date = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    meta.update({"name": f"{meta['source']}-{meta['device']}-b{batch}-{date[:10]}", "batch_size": batch, "date": date})
    fitted = est0.fit_features(feats, y, meta=meta, seed=args.seed, prior=args.prior)
    pred = np.array([fitted.predict_features(f) for f in feats])
    stats = dict(fitted.fit_stats)
    stats["spearman_in_sample"] = spearman(pred, y)
    stats["spearman_default"] = spearman([est0.predict_features(f) for f in feats], y)
    final = EnergyEstimator(fitted.coefficients, fitted.meta, stats)
    try:
        final.save(args.out)
    except OSError as e:
        raise B.BundleError(f"cannot write {args.out}: {e.strerror or e}") from None
    print(format_report(final))
    print(f"Spearman on the {len(y)} measured samples: fitted {_f(stats['spearman_in_sample'], '.3f')}, "
          f"default {_f(stats['spearman_default'], '.3f')}")
    print(f"wrote {args.out} (sha256 {final.sha256()[:16]})")
    return 0


def main(argv: Sequence[str] | None = None, networks: Optional[NetworkBuilder] = None,
         prog: str = PROG) -> int:
    """Run one command; exit status 0, or 2 with one error line. `networks` builds the networks of export
    --genotype/--arch and fit --table (without it those exit 2); calibrate, report, fit measurements.json and
    export --grid need none."""
    args = build_parser(prog).parse_args(argv)
    if args.cmd == "calibrate":
        return calibrate(args)
    if args.cmd == "report":
        return report(args)
    try:
        return export_cmd(args, networks) if args.cmd == "export" else fit_cmd(args, networks)
    except (B.BundleError, EnergyModelError, EnergyMemoryError) as e:
        print(f"{args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.cmd}: error: interrupted; --out {args.out} was not written", file=sys.stderr)
        return 130
