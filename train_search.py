"""Energy-aware DARTS search: `python train_search.py --dataset digits` (see README for CIFAR-10 on a GPU).

Each epoch trains the supernet's weights on one half of the training split and its alphas on the other half,
then writes to <log_dir>/<run_name>/: metrics.jsonl, alphas.json, genotype.json, checkpoint.pt, log.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import distributed
import genotypes as G
import runs
import utils
from architect import Architect
from datasets import SEARCH_DEFAULTS, TRAIN_DEFAULTS, load_dataset, search_loaders
from derived_energy import CellCosts, genotype_energy_mj
from layout import want_channels_last
from model import build_network, network_report
from model_search import Network
from operations import POOLS, is_parametric
from runs import RunControl
from search_control import BudgetController, CollapseStopper, project_to_budget
from tracker import Tracker

SCRIPT = "search"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Energy-aware DARTS search (defaults: DARTS's CIFAR-10 settings; "
                                            "digits has small defaults of its own).")
    utils.add_common_args(p)
    p.add_argument("--primitives", default="darts",
                   help=f"candidate ops: a set ({', '.join(G.PRIMITIVE_SETS)}) or a comma list of op names")
    p.add_argument("--task_weight", type=utils.nonneg_float, default=0.9, help="weight of the normalized task loss")
    p.add_argument("--energy_weight", type=utils.nonneg_float, default=0.05,
                   help="weight of the normalized expected energy (0 = plain DARTS)")
    p.add_argument("--batch_size", type=utils.positive_int)
    p.add_argument("--learning_rate", type=utils.positive_float)
    p.add_argument("--learning_rate_min", type=utils.nonneg_float)
    p.add_argument("--momentum", type=utils.unit_float)
    p.add_argument("--weight_decay", type=utils.nonneg_float)
    p.add_argument("--epochs", type=utils.positive_int)
    p.add_argument("--init_channels", type=utils.positive_int)
    p.add_argument("--layers", type=utils.positive_int)
    p.add_argument("--train_portion", type=utils.fraction)
    p.add_argument("--grad_clip", type=utils.positive_float)
    p.add_argument("--arch_learning_rate", type=utils.positive_float)
    p.add_argument("--arch_weight_decay", type=utils.nonneg_float)
    p.add_argument("--unrolled", action="store_true", help="second-order (unrolled) architecture step")
    utils.add_speed_args(p)
    p.add_argument("--partial_channels", type=utils.positive_int, default=1,
                   help="PC-DARTS: each edge computes 1/K of the channels (1 = plain DARTS)")
    p.add_argument("--eval_channels", type=utils.positive_int, default=None,
                   help="width of the network whose energy is reported (default: train.py's for the data set)")
    p.add_argument("--eval_layers", type=utils.positive_int, default=None,
                   help="depth of the network whose energy is reported (default: train.py's for the data set)")
    add_guard_args(p)
    return p


def add_guard_args(p: argparse.ArgumentParser) -> None:
    """Flags against skip/pool collapse (README, "Avoiding collapse"); all off by default (plain DARTS)."""
    g = p.add_argument_group("collapse guards and energy budget")
    g.add_argument("--warmup_epochs", type=utils.nonneg_int, default=0,
                   help="train the weights only (alphas frozen) for the first N epochs (PC-DARTS)")
    g.add_argument("--energy_ramp_epochs", type=utils.nonneg_int, default=0,
                   help="after the warm-up, ramp the energy weight in linearly over M epochs")
    g.add_argument("--max_skip", type=utils.nonneg_int, default=None,
                   help="cap skip_connects in the derived normal cell (P-DARTS: 2)")
    g.add_argument("--min_parametric", type=utils.nonneg_int, default=None,
                   help="at least K parametric ops in the derived normal cell (default 2 with --max_skip, else 0)")
    g.add_argument("--early_stop", action="store_true",
                   help="DARTS+: stop when the unguarded normal cell holds >2 skips for 2 epochs (or --patience)")
    g.add_argument("--patience", type=utils.positive_int, default=None,
                   help="with --early_stop: also stop when the ranking of ops is stable for N epochs")
    g.add_argument("--energy_budget", type=utils.positive_float, default=None,
                   help="mJ per image of the derived network: adaptive penalty on energy above it (replaces "
                        "--energy_weight); the written cell is projected to within 5 %% under it")
    g.add_argument("--budget_rate", type=utils.positive_float, default=0.02,
                   help="step of the budget's Lagrange multiplier per architecture step")


def parse_args(argv: Optional[List[str]] = None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return parser, args, utils.explicit_flags(argv)


def resolve(args: argparse.Namespace) -> None:
    """Fill data-set defaults and check what argparse cannot."""
    utils.apply_defaults(args, SEARCH_DEFAULTS)
    train_table = {**TRAIN_DEFAULTS["*"], **TRAIN_DEFAULTS.get(args.dataset, {})}
    if args.eval_channels is None:
        args.eval_channels = train_table["init_channels"]
    if args.eval_layers is None:
        args.eval_layers = train_table["layers"]
    if args.dataset == "imagenet":
        raise utils.CLIError("search on --dataset imagenet is not supported (DARTS transfers a CIFAR cell); "
                             "use imagefolder with small images")
    args.primitives = G.parse_primitives(args.primitives) if isinstance(args.primitives, str) else args.primitives
    if args.layers < 3:  # reductions sit at layers // 3 and 2 * layers // 3: fewer layers leave no normal cell
        raise utils.CLIError(f"--layers {args.layers} leaves no normal cell to search; use at least 3")
    if args.init_channels % args.partial_channels or (args.init_channels // args.partial_channels) % 2:
        raise utils.CLIError(f"--partial_channels {args.partial_channels} must divide --init_channels "
                             f"{args.init_channels} into an even width")
    if args.task_weight == 0 and args.energy_weight == 0:
        raise utils.CLIError("--task_weight and --energy_weight are both 0: the alphas would have no objective")
    if args.min_parametric is None:
        args.min_parametric = 2 if args.max_skip is not None else 0
    cells = 2 * 4  # two inputs per intermediate node
    if args.min_parametric > cells or (args.max_skip or 0) > cells:
        raise utils.CLIError(f"--max_skip / --min_parametric must be at most {cells} (ops in a normal cell)")
    if args.min_parametric and not any(is_parametric(p) for p in args.primitives if p != "none"):
        raise utils.CLIError("--min_parametric needs a parametric op among --primitives")
    if args.warmup_epochs >= args.epochs:
        raise utils.CLIError(f"--warmup_epochs {args.warmup_epochs} leaves no epoch to search the alphas "
                             f"(--epochs {args.epochs})")


def cell_stats(genotype, alphas: Dict[str, Any]) -> Dict[str, float]:
    """Counts of parametric / skip / pool ops in the derived normal cell, and the mean alpha entropy."""
    ops = [op for op, _ in genotype.normal]
    entropy = float(np.mean([-(np.asarray(row) * np.log(np.clip(row, 1e-12, None))).sum()
                             for kind in ("normal", "reduce") for row in alphas[kind]]))
    return {"normal_parametric": sum(is_parametric(op) for op in ops),
            "normal_skip": ops.count("skip_connect"),
            "normal_pool": sum(op in POOLS for op in ops),
            "alpha_entropy": entropy}


def weight_step(model, params, optimizer, x, y, grad_clip: float, check=lambda value, what: None, ddp=None):
    """One SGD step of the supernet's weights on a training batch; returns (logits, loss).

    Gradients are taken for the weights only (the alphas' gradient is not needed here, which saves backward
    work); `check(value, what)` sees the loss and the gradient norm before the step is taken. `ddp`: the model
    wrapped in DistributedDataParallel (torchrun), whose reducer averages the gradients across ranks."""
    logits, _ = (ddp or model)(x)
    loss = F.cross_entropy(logits, y)
    check(loss.item(), "training loss")
    if ddp is None:
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
    else:  # autograd.grad would bypass DDP's reducer: backward() through it instead
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for a in model.arch_parameters():
            a.grad = None  # the architect computes the alphas' own gradients
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    check(float(norm), "weight gradient")
    optimizer.step()
    return logits, loss


class Search:
    """All the state of one search run; `run()` does the epochs, checkpointing as it goes."""

    def __init__(self, args: argparse.Namespace, run_dir: str, ckpt: Optional[Dict[str, Any]], explicit: set,
                 log) -> None:
        self.args, self.run_dir, self.log = args, run_dir, log
        self.device = utils.resolve_device(args.device, distributed.gpu_index(args.gpu))
        utils.set_threads(self.device, args.threads)
        utils.set_seed(args.seed)  # the same seed on every rank: identical initial weights and alphas
        self.estimator = utils.load_estimator(args.energy_model, args.energy_batch_size)
        train_data, self.info = load_dataset(args.dataset, args.data, train=True)
        self.train_queue, self.valid_queue = search_loaders(train_data, args, self.device)
        self.model = Network(args.init_channels, self.info.num_classes, args.layers, args.primitives,
                             self.info.in_channels, self.estimator, partial_channels=args.partial_channels
                             ).to(self.device).set_channels_last(want_channels_last(args.channels_last, self.device,
                                                                                    args.amp))
        if args.compile:
            utils.compile_cells(self.model)
        self.optimizer = torch.optim.SGD(self.model.weight_parameters(), args.learning_rate,
                                         momentum=args.momentum, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, args.epochs,
                                                                    eta_min=args.learning_rate_min)
        self.architect = Architect(self.model, args.arch_learning_rate, args.arch_weight_decay, args.momentum,
                                   args.weight_decay, args.task_weight, args.energy_weight, args.unrolled,
                                   grad_hook=distributed.average_ if distributed.enabled() else None)
        self.stopper = CollapseStopper(patience=args.patience) if args.early_stop else None
        self.budget = BudgetController(args.energy_budget, args.budget_rate) if args.energy_budget else None
        self._costs: Optional[CellCosts] = None
        self.start_epoch, self.best_valid_acc, self.wandb_id, self.pending_rng = 0, 0.0, None, None
        if ckpt is not None:
            self.restore(ckpt, explicit)
        self.ddp = distributed.wrap(self.model, self.device)  # None without torchrun

    # ------------------------------------------------------------------------------------------ checkpoints
    def space(self) -> Dict[str, Any]:
        a = self.args
        return {"primitives": list(a.primitives), "layers": a.layers, "init_channels": a.init_channels,
                "partial_channels": a.partial_channels, "dataset": a.dataset}

    def state(self, epoch: int) -> Dict[str, Any]:
        return {"epoch": epoch, "space": self.space(), "args": vars(self.args),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "arch_optimizer": self.architect.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": utils.rng_state(),
                "best_valid_acc": self.best_valid_acc, "wandb_id": self.wandb_id,
                "stopper": self.stopper.state_dict() if self.stopper else None,
                "budget_lambda": self.budget.lam if self.budget else None}

    def restore(self, ckpt: Dict[str, Any], explicit: set) -> None:
        if ckpt["space"] != self.space():
            raise utils.CLIError(f"--resume: the checkpoint's search space {ckpt['space']} differs from this "
                                 f"run's {self.space()}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.architect.optimizer.load_state_dict(ckpt["arch_optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        runs.override_schedule(self.optimizer, self.scheduler, self.args, explicit)
        if explicit & {"arch_learning_rate", "arch_weight_decay"}:
            for group in self.architect.optimizer.param_groups:
                group["lr"], group["weight_decay"] = self.args.arch_learning_rate, self.args.arch_weight_decay
        self.pending_rng = ckpt["rng"]  # applied when the epochs start, after every set-up that draws numbers
        self.start_epoch = ckpt["epoch"] + 1
        self.best_valid_acc = ckpt["best_valid_acc"]
        self.wandb_id = ckpt.get("wandb_id")
        if self.stopper is not None and ckpt.get("stopper"):
            self.stopper.load_state_dict(ckpt["stopper"])
        if self.budget is not None and ckpt.get("budget_lambda") is not None:
            self.budget.lam = float(ckpt["budget_lambda"])

    # ------------------------------------------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int, lr: float, control: RunControl) -> Dict[str, float]:
        from tqdm import tqdm
        m, a = self.model, self.args
        m.train()
        loss_m, acc_m = utils.AvgMeter(), utils.AvgMeter()
        params = m.weight_parameters()
        distributed.set_epoch([self.train_queue, self.valid_queue], epoch)
        valid_iter = iter(self.valid_queue)
        bar = tqdm(self.train_queue, desc=f"search {epoch + 1}/{a.epochs}", leave=False, dynamic_ncols=True,
                   disable=None)
        for step, (x, y) in enumerate(bar):
            try:
                xv, yv = next(valid_iter)
            except StopIteration:  # a validation half smaller than the training half: start it again
                valid_iter = iter(self.valid_queue)
                xv, yv = next(valid_iter)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            xv, yv = xv.to(self.device, non_blocking=True), yv.to(self.device, non_blocking=True)
            if epoch >= a.warmup_epochs:  # warm-up: the alphas (and Adam's state) stay as they are
                if self.budget is not None:
                    self.architect.energy_weight = self.budget.update(self.cell_costs().total(self.guarded()[0]))
                arch_loss = self.architect.step(x, y, xv, yv, lr, self.optimizer)
                control.check_finite(arch_loss, "architecture loss", epoch, step)
            logits, loss = weight_step(m, params, self.optimizer, x, y, a.grad_clip,
                                       lambda value, what: control.check_finite(value, what, epoch, step),
                                       ddp=self.ddp)
            acc, = utils.accuracy(logits.detach(), y)
            loss_m.update(loss.item(), y.size(0))
            acc_m.update(acc, y.size(0))
            bar.set_postfix(loss=f"{loss_m.avg:.3f}", acc=f"{acc_m.avg:.1f}")
            if control.stop_requested:
                break
        return distributed.average_metrics({"train_loss": loss_m.avg, "train_acc": acc_m.avg}, acc_m.n)

    @torch.no_grad()
    def infer(self) -> Dict[str, float]:
        m = self.model
        m.eval()
        loss_m, acc_m = utils.AvgMeter(), utils.AvgMeter()
        energy = None
        for x, y in self.valid_queue:
            x, y = x.to(self.device), y.to(self.device)
            logits, energy = m(x)
            loss_m.update(F.cross_entropy(logits, y).item(), y.size(0))
            acc_m.update(utils.accuracy(logits, y)[0], y.size(0))
        return {**distributed.average_metrics({"valid_loss": loss_m.avg, "valid_acc": acc_m.avg}, acc_m.n),
                "expected_energy_mj": 1e3 * float(energy),
                "energy_normalized": float(self.architect.normalized_energy(energy))}

    def guarded(self):
        """The derived genotype with the guards of --max_skip / --min_parametric applied, and the guards' log."""
        actions: List[str] = []
        genotype = self.model.genotype(self.args.max_skip, self.args.min_parametric, actions)
        return genotype, actions

    def project(self, genotype, actions: List[str]):
        """The genotype this run writes: `genotype` (guarded) projected onto --energy_budget when one is set."""
        a = self.args
        if self.budget is None:
            return genotype
        costs = self.cell_costs()
        cells = project_to_budget({"normal": genotype.normal, "reduce": genotype.reduce},
                                  self.model.derivation_weights(), a.primitives, costs.cost, costs.base,
                                  a.energy_budget, a.max_skip, a.min_parametric, actions)
        return G.Genotype(cells["normal"], genotype.normal_concat, cells["reduce"], genotype.reduce_concat)

    def cell_costs(self) -> CellCosts:
        """Per-op energies of the network train.py builds (measured once; the budget prices every step with it)."""
        if self._costs is None:
            a = self.args
            self._costs = CellCosts(a.primitives, self.info, a.eval_channels, a.eval_layers, self.estimator,
                                    self.model.steps)
        return self._costs

    def energy_mj(self, genotype) -> float:
        a = self.args
        return genotype_energy_mj(genotype, self.info, a.eval_channels, a.eval_layers, self.estimator)

    def energy_scale(self, epoch: int) -> float:
        """0 during the warm-up, then a linear ramp over --energy_ramp_epochs (1 without one)."""
        a = self.args
        if epoch < a.warmup_epochs:
            return 0.0
        return min(1.0, (epoch - a.warmup_epochs + 1) / a.energy_ramp_epochs) if a.energy_ramp_epochs else 1.0

    def ranking(self):
        """Argmax (non-`none`) op per edge of both cells: what --patience watches."""
        prims = self.args.primitives
        usable = [k for k, p in enumerate(prims) if p != "none"]
        with torch.no_grad():
            return tuple(tuple(usable[int(i)] for i in alphas[:, usable].argmax(-1))
                         for alphas in (self.model.alphas_normal, self.model.alphas_reduce))

    def run(self, tracker: Tracker, control: RunControl) -> Dict[str, Any]:
        a, log = self.args, self.log
        genotype = self.project(*self.guarded())
        if self.pending_rng is not None:
            utils.set_rng_state(self.pending_rng)
        for epoch in range(self.start_epoch, a.epochs):
            t0 = time.time()
            lr = self.optimizer.param_groups[0]["lr"]  # read before scheduler.step(): no off-by-one epoch
            row: Dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            if self.budget is None:
                self.architect.energy_weight = a.energy_weight * self.energy_scale(epoch)
                row["energy_weight_now"] = self.architect.energy_weight
            with utils.autocast(self.device, a.amp):
                row.update(self.train_epoch(epoch, lr, control))
            if control.stop_requested:
                log.info(runs.stopped_message(control.signal_name, epoch, self.run_dir))
                return {"stopped": True}
            distributed.check_same(self.model.arch_parameters() + self.model.weight_parameters(),
                                   "alphas and weights")  # torchrun: a divergence of the ranks stops the run
            with utils.autocast(self.device, a.amp):
                row.update(self.infer())
            self.scheduler.step()
            unguarded = self.model.genotype()
            guarded, actions = self.guarded()
            genotype = self.project(guarded, actions)
            for line in actions:
                log.info(line)
            row["guard_actions"] = len(actions)
            row["unguarded_normal_skip"] = CollapseStopper.skips(unguarded)
            if self.budget is not None:  # where the search itself stands, before the projection onto the budget
                row["budget_lambda"] = self.budget.lam
                row["unprojected_energy_mj"] = self.cell_costs().total(guarded)
            alphas = self.model.softmaxed_alphas()
            row["genotype_energy_mj"] = self.energy_mj(genotype)
            row.update(cell_stats(genotype, alphas))
            row["epoch_s"] = time.time() - t0
            self.best_valid_acc = max(self.best_valid_acc, row["valid_acc"])
            if distributed.is_main():  # torchrun: only rank 0 writes files
                self.write_epoch(row, genotype, alphas, tracker)
                runs.save_checkpoint(os.path.join(self.run_dir, "checkpoint.pt"), SCRIPT, self.state(epoch))
            log.info(f"epoch {epoch + 1}/{a.epochs} lr {lr:.4g} train_acc {row['train_acc']:.2f} valid_acc "
                     f"{row['valid_acc']:.2f} expected_energy {row['expected_energy_mj']:.4f} mJ genotype_energy "
                     f"{row['genotype_energy_mj']:.4f} mJ | normal: {row['normal_parametric']} parametric, "
                     f"{row['normal_skip']} skip, {row['normal_pool']} pool, alpha entropy "
                     f"{row['alpha_entropy']:.3f}")
            log.info(f"genotype = {genotype}")
            if self.budget is not None:
                log.info(f"energy budget {a.energy_budget:.4f} mJ: derived {row['genotype_energy_mj']:.4f} mJ, "
                         f"lambda {self.budget.lam:.4f}")
            if self.stopper is not None:
                kept = (genotype, row)
                if self.stopper.update(epoch + 1, unguarded, kept, self.ranking()):
                    genotype, kept_row = self.stopper.result
                    log.info(self.stopper.reason)
                    if distributed.is_main():
                        self.write_genotype(genotype, {**kept_row, "early_stop": self.stopper.reason})
                    break
        return {"stopped": False, "genotype": genotype}

    def write_epoch(self, row: Dict[str, Any], genotype, alphas, tracker: Tracker) -> None:
        d = self.run_dir
        utils.append_jsonl(os.path.join(d, "metrics.jsonl"), row)
        history_path = os.path.join(d, "alphas.json")
        history = utils.read_json(history_path, default=[])
        history.append({"epoch": row["epoch"], "primitives": list(self.args.primitives), **alphas})
        utils.atomic_write_json(history_path, history)
        self.write_genotype(genotype, row)
        tracker.log({**row, **self.plot_epoch(row, genotype, alphas, tracker)}, step=row["epoch"])

    def plot_epoch(self, row: Dict[str, Any], genotype, alphas, tracker: Tracker) -> Dict[str, Any]:
        """Alpha heatmaps, curves and cell diagrams in the run folder (updated each epoch), as wandb images."""
        import plots
        import visualize
        d, a = self.run_dir, self.args
        with open(os.path.join(d, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        paths = plots.search_figures(d, rows, alphas, a.primitives, a.run_name)
        cells = visualize.render(genotype, os.path.join(d, "cells"), self.info, a.eval_channels, a.eval_layers,
                                 self.estimator, name=f"epoch {row['epoch']}")
        paths.update({f"cell_{os.path.basename(p)[:-4]}": p for p in cells if p.endswith(".png")})
        return {f"plots/{k}": tracker.image(p) for k, p in paths.items()} if tracker.run is not None else {}

    def write_genotype(self, genotype, row: Dict[str, Any]) -> None:
        """genotype.json with the epoch's metadata (also the kept genotype of an early stop)."""
        d = self.run_dir
        meta = {"dataset": self.args.dataset, "energy_mj": row["genotype_energy_mj"],
                "energy_batch_size": self.estimator.batch_size, "eval_channels": self.args.eval_channels,
                "eval_layers": self.args.eval_layers, "search_run": self.args.run_name, "seed": self.args.seed,
                "epoch": row["epoch"], "valid_acc": row["valid_acc"], "energy_weight": self.args.energy_weight,
                "task_weight": self.args.task_weight}
        for key in ("early_stop",):
            if key in row:
                meta[key] = row[key]
        if self.args.max_skip is not None or self.args.min_parametric:
            meta["guards"] = {"max_skip": self.args.max_skip, "min_parametric": self.args.min_parametric}
        if self.args.energy_budget is not None:
            meta["energy_budget_mj"] = self.args.energy_budget
        G.save(genotype, os.path.join(d, "genotype.json"), self.args.primitives, meta)


def main(argv: Optional[List[str]] = None) -> int:
    parser, args, explicit = parse_args(argv)
    return runs.guarded_main(parser, run, args, explicit)


def run(args: argparse.Namespace, explicit: set) -> int:
    ckpt, args = runs.restored_args(args, explicit, SCRIPT)
    resolve(args)
    search, run_dir, log, tracker = runs.open_run(args, explicit, SCRIPT, ckpt,
                                                   lambda d, lg: Search(args, d, ckpt, explicit, lg))
    t0 = time.time()
    result, status = runs.run_epochs(search, tracker)
    if status:
        return status
    genotype = result["genotype"]
    report = network_report(build_network(genotype, args.eval_channels, search.info.num_classes, args.eval_layers,
                                          False, search.info.in_channels, search.info.image_size),
                            search.estimator, search.info)
    log.info(f"search done in {time.time() - t0:.1f} s; derived genotype = {genotype}")
    log.info("network train.py builds from it (%d channels, %d layers):\n%s", args.eval_channels, args.eval_layers,
             report.text())
    tracker.summary({"genotype_energy_mj": report.energy_mj, "params": report.params, "macs": report.macs})
    tracker.artifact(f"genotype-{args.run_name}", "genotype", [os.path.join(run_dir, "genotype.json")])
    tracker.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
