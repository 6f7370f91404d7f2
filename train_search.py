"""Energy-aware DARTS search: `python train_search.py --dataset digits` (see README for CIFAR-10 on a GPU).

Each epoch trains the supernet's weights on one half of the training split and its alphas on the other half,
then writes to <log_dir>/<run_name>/: metrics.jsonl, alphas.json, genotype.json, checkpoint.pt, log.txt."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from plumbing import distributed
import genotypes as G
from nb201 import benchmark
from plumbing import jsonfile
from plumbing import options
from plumbing import runs
from plumbing import utils
from architect import Architect, BudgetController, arch_lr_for_steps, energy_scale
from plumbing.cliargs import CLIError, explicit_flags
from plumbing.datasets import load_dataset, search_loaders, split_meta
from derivation import CollapseStopper, cell_stats, check_guard_args, ranking
from plumbing.layout import want_channels_last
from model import network_report
from plumbing.run import Run
import spaces


def build_parser() -> argparse.ArgumentParser:
    return options.search_parser(G.PRIMITIVE_SETS)


def parse_args(argv: Optional[List[str]] = None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return parser, args, explicit_flags(argv)


def resolve(args: argparse.Namespace) -> None:
    """Fill the defaults of the data set and check what argparse cannot."""
    options.resolve_defaults(args, "search")
    evaluated = options.defaults_for("train", args.dataset, args.space)
    args.eval_channels = args.eval_channels or evaluated["init_channels"]
    args.eval_layers = args.eval_layers or evaluated["layers"]
    space = spaces.get(args.space)
    if not isinstance(args.primitives, list):
        args.primitives = space.parse_primitives(args.primitives or space.default_primitives)
    space.check(args)
    if args.benchmark and args.space != "nb201":
        raise CLIError("--benchmark looks up NB201 arch strings: it needs --space nb201")
    if args.task_weight == 0 and args.energy_weight == 0:
        raise CLIError("--task_weight and --energy_weight are both 0: the alphas would have no objective")
    check_guard_args(args, space.guarded_ops)


def weight_step(model, params, optimizer, x, y, grad_clip: float, check=lambda v, w: None, ddp=None,
                autocast=nullcontext):
    """One SGD step of the weights on a training batch; returns (logits, loss). Gradients for the weights only (less
    backward work); `check(tensor, what)` sees the loss and gradient norm (device tensors: no host sync); `ddp`: the
    model in DDP (torchrun: its reducer averages the gradients); `autocast`: the context of this forward and loss."""
    with autocast():
        logits, _ = (ddp or model)(x)
        loss = F.cross_entropy(logits, y)
    check(loss, "training loss")
    if ddp is None:
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
    else:  # autograd.grad would bypass DDP's reducer: backward() through it instead
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for a in model.arch_parameters():
            a.grad = None  # the architect computes the alphas' own gradients
    check(torch.nn.utils.clip_grad_norm_(params, grad_clip), "weight gradient")
    optimizer.step()
    return logits, loss


def build(run: Run) -> SimpleNamespace:
    """The search's parts: data (the two halves), supernet, optimizers, architect and the per-epoch controllers."""
    a, device = run.args, run.device
    train_data, info = load_dataset(a.dataset, a.data, train=True, image_size=a.image_size)
    train_queue, valid_queue = search_loaders(train_data, a, device)
    a.arch_learning_rate = a.arch_learning_rate or arch_lr_for_steps(len(train_queue), a.epochs - a.warmup_epochs)
    space = spaces.get(a.space)
    model = space.supernet(a, info, run.estimator).to(device).set_channels_last(
        want_channels_last(a.channels_last, device, a.amp))
    if a.compile:  # energies traced first, then each cell as one graph (CUDA graphs on a GPU)
        utils.compile_cells(model, (1, info.in_channels) + (info.image_size,) * 2, whole=True)
    weights = model.weight_parameters()
    optimizer = torch.optim.SGD(weights, a.learning_rate, momentum=a.momentum, weight_decay=a.weight_decay,
                                nesterov=a.nesterov)
    architect = Architect(model, arch_learning_rate=a.arch_learning_rate, arch_weight_decay=a.arch_weight_decay,
                          momentum=a.momentum, weight_decay=a.weight_decay, task_weight=a.task_weight,
                          energy_weight=a.energy_weight, unrolled=a.unrolled,
                          grad_hook=distributed.average_ if distributed.enabled() else None, autocast=run.autocast)
    s = SimpleNamespace(info=info, train_queue=train_queue, valid_queue=valid_queue, space=space, model=model,
                        weights=weights, optimizer=optimizer, architect=architect, alphas=None,
                        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, a.epochs,
                                                                             eta_min=a.learning_rate_min),
                        stopper=CollapseStopper(patience=a.patience) if a.early_stop else None,
                        budget=BudgetController(a.energy_budget, a.budget_rate) if a.energy_budget else None,
                        benchmark=benchmark.load_table(a.benchmark) if a.benchmark else None,
                        derivation_weights=utils.HostCopy())  # --energy_budget: the alphas' cell, step by step
    costs = []  # per-op energies of the network train.py builds: measured once, the budget prices every step

    def cell_costs():
        if not costs:
            costs.append(space.costs(a, info, run.estimator))
        return costs[0]
    s.costs = cell_costs
    return s


def valid_batches(queue, epoch: int, device: torch.device):
    """The validation half's batches for the alphas' steps, started again when shorter than the training half.
    Its iterator is made now, before the training half's: each draws its shuffle's seed from torch's RNG."""
    distributed.set_epoch([queue], epoch)
    batches = iter(queue)

    def cycle():
        nonlocal batches
        while True:
            for xv, yv in batches:
                yield xv.to(device, non_blocking=True), yv.to(device, non_blocking=True)
            batches = iter(queue)
    return cycle()


def search(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set) -> int:
    """DARTS's bilevel search with the energy term: each batch one step of the alphas on the validation half,
    then one of the weights on the training half; each epoch derives the cell (guards, budget) and writes it."""
    run = Run(parser, args, explicit, "search", final_file="genotype.json")  # --resume: the checkpoint's flags
    resolve(run.args)
    if run.finished():
        return 0
    with run:
        a = run.args
        s = build(run)
        run.restore(s.model, s.optimizer, s.scheduler, lambda ckpt: load_extra_state(s, a, ckpt, explicit))
        ddp = distributed.wrap(s.model, run.device)  # None without torchrun
        run.start()
        for epoch in run.epochs():
            lr = s.optimizer.param_groups[0]["lr"]  # read before scheduler.step(): no off-by-one epoch
            row: Dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            if s.budget is None:  # (with a budget, its multiplier sets the energy weight, step by step)
                s.architect.energy_weight = a.energy_weight * energy_scale(epoch, a.warmup_epochs,
                                                                           a.energy_ramp_epochs)
                row["energy_weight_now"] = s.architect.energy_weight
            valid = valid_batches(s.valid_queue, epoch, run.device)
            s.model.train()
            for x, y in run.batches(s.train_queue, epoch):
                utils.step_begin(a, run.device)
                xv, yv = next(valid)
                if epoch >= a.warmup_epochs:  # warm-up: the alphas (and Adam's state) stay as they are
                    if s.budget is not None:  # lambda from the cell of the alphas now, read without a stall
                        weights = s.derivation_weights.get()
                        s.architect.energy_weight = s.budget.update(s.costs().total(guarded(s, a, weights=weights)))
                    run.check(s.architect.step(x, y, xv, yv, lr, s.optimizer), "architecture loss")
                    if s.budget is not None:  # the next step's: queued now, on the host by then
                        s.derivation_weights.start(s.model.derivation_tensors())
                logits, loss = weight_step(s.model, s.weights, s.optimizer, x, y, a.grad_clip, run.check, ddp,
                                           run.autocast)
                run.record(logits, loss, y)
            row.update(run.end_training(s.model.arch_parameters() + s.weights))
            valid_row, energy = run.evaluate(s.model, s.valid_queue, "valid", s.info.num_classes)
            row.update(valid_row, expected_energy_mj=1e3 * float(energy),
                       energy_normalized=float(s.architect.normalized_energy(energy)))
            s.scheduler.step()
            genotype = derive(s, a, run, row)
            run.end_epoch(row, extra_state(s, a), lambda: write_epoch(s, a, run, row, genotype),
                          lambda: epoch_line(s, a, row, genotype))
        finish(s, a, run)
    return run.status


def derive(s: SimpleNamespace, a: argparse.Namespace, run: Run, row: Dict[str, Any]):
    """This epoch's cell (guarded, projected onto the budget) and its statistics in `row`; early stop."""
    actions: List[str] = []
    unguarded = s.model.genotype()
    guarded_cell = guarded(s, a, actions)
    genotype = guarded_cell if s.budget is None else s.space.project(guarded_cell, s.model, a, s.costs(), actions)
    if actions:
        run.log.info("\n".join(actions))
    row.update(guard_actions=len(actions), unguarded_normal_skip=CollapseStopper.skips(s.space.collapse_view(unguarded)))
    if s.budget is not None:  # where the search itself stands, before the projection onto the budget
        row.update(budget_lambda=s.budget.lam, unprojected_energy_mj=s.costs().total(guarded_cell))
    s.alphas = s.model.softmaxed_alphas()
    row["genotype_energy_mj"] = s.space.energy_mj(genotype, s.info, a.eval_channels, a.eval_layers, run.estimator)
    row.update(cell_stats(s.space.guarded_cell(genotype), s.alphas))
    row.update(s.benchmark.metrics(genotype) if s.benchmark else {})
    run.best_valid_acc = max(run.best_valid_acc, row["valid_acc"])
    if s.stopper is not None:
        kept = {"genotype": s.space.to_dict(genotype),
                "row": {k: v for k, v in row.items() if k in ("epoch", "valid_acc", "genotype_energy_mj")
                        or k.startswith("bench_")}}
        run.stopped_early = s.stopper.update(row["epoch"], s.space.collapse_view(unguarded), kept,
                                             ranking(s.alphas, a.primitives))
        if run.stopped_early:
            run.log.info(s.stopper.reason)
    return genotype


def guarded(s: SimpleNamespace, a: argparse.Namespace, actions: Optional[List[str]] = None,
            weights: Optional[dict] = None):
    """The derived genotype, guarded by --max_skip / --min_parametric (`weights`: the model's derivation weights,
    read already)."""
    return s.model.genotype(a.max_skip, a.min_parametric, actions, weights)


# ---------------------------------------------------------------------------------------- state and files
def search_space(a: argparse.Namespace) -> Dict[str, Any]:
    return {"space": a.space, "primitives": list(a.primitives), "layers": a.layers,
            "init_channels": a.init_channels, "partial_channels": a.partial_channels, "dataset": a.dataset}


def extra_state(s: SimpleNamespace, a: argparse.Namespace) -> Dict[str, Any]:
    """What the checkpoint holds beyond the run's common state."""
    return {"space": search_space(a), "arch_optimizer": s.architect.optimizer.state_dict(),
            "stopper": s.stopper.state_dict() if s.stopper else None,
            "budget": s.budget.state_dict() if s.budget else None}


def load_extra_state(s: SimpleNamespace, a: argparse.Namespace, ckpt: Dict[str, Any], explicit: set) -> None:
    if runs.field(ckpt, "space", dict) != search_space(a):
        raise CLIError(f"--resume: the checkpoint's search space {ckpt['space']} differs from this "
                       f"run's {search_space(a)}")
    runs.load_state(s.architect.optimizer, runs.field(ckpt, "arch_optimizer", dict), "--resume: the alphas' optimizer")
    if explicit & {"arch_learning_rate", "arch_weight_decay"}:
        s.architect.set_hyperparameters(a.arch_learning_rate, a.arch_weight_decay)
    for controller, key in ((s.stopper, "stopper"), (s.budget, "budget")):
        if controller is not None and runs.field(ckpt, key, (dict, type(None)), None):
            runs.load_state(controller, ckpt[key], f"--resume: the {key}'s state")


def write_epoch(s: SimpleNamespace, a: argparse.Namespace, run: Run, row: Dict[str, Any], genotype) -> Dict[str, Any]:
    """alphas.json, genotype.json (the kept one after an early stop) and the figures; returns them for wandb."""
    path = os.path.join(run.dir, "alphas.json")
    history = jsonfile.expect(jsonfile.read(path, "alphas file", []), list, path)
    history.append({"epoch": row["epoch"], "primitives": list(a.primitives), **s.alphas})
    utils.atomic_write_json(path, history)
    if run.stopped_early:
        kept = s.stopper.result
        write_genotype(s, a, run, s.space.from_dict(kept["genotype"]), {**kept["row"], "early_stop": s.stopper.reason})
    else:
        write_genotype(s, a, run, genotype, row)
    from plumbing import plots
    paths = plots.search_epoch_figures(run.dir, s.alphas, a.primitives, a.run_name, s.space, genotype,
                                       (s.info, a.eval_channels, a.eval_layers, run.estimator), row["epoch"])
    return {f"plots/{k}": run.tracker.image(p) for k, p in paths.items()} if run.tracker.run is not None else {}


def write_genotype(s: SimpleNamespace, a: argparse.Namespace, run: Run, genotype, row: Dict[str, Any]) -> None:
    """genotype.json with the epoch's metadata (also the kept genotype of an early stop)."""
    meta = {"dataset": a.dataset, **split_meta(a), "energy_mj": row["genotype_energy_mj"],
            "energy_batch_size": run.estimator.batch_size, "eval_channels": a.eval_channels,
            "eval_layers": a.eval_layers, "search_run": a.run_name, "seed": a.seed, "epoch": row["epoch"],
            "valid_acc": row["valid_acc"], "energy_weight": a.energy_weight, "task_weight": a.task_weight}
    meta.update({"early_stop": row["early_stop"]} if "early_stop" in row else {})
    meta.update({"guards": {"max_skip": a.max_skip, "min_parametric": a.min_parametric}}
                if a.max_skip is not None or a.min_parametric else {})
    meta.update({"energy_budget_mj": a.energy_budget} if a.energy_budget is not None else {})
    meta.update({k: v for k, v in row.items() if k.startswith("bench_")})
    s.space.save(genotype, os.path.join(run.dir, "genotype.json"), a.primitives, meta)


def epoch_line(s: SimpleNamespace, a: argparse.Namespace, row: Dict[str, Any], genotype) -> str:
    lines = [f"epoch {row['epoch']}/{a.epochs} lr {row['lr']:.4g} train_acc {row['train_acc']:.2f} valid_acc "
             f"{row['valid_acc']:.2f} expected_energy {row['expected_energy_mj']:.4f} mJ genotype_energy "
             f"{row['genotype_energy_mj']:.4f} mJ | normal: {row['normal_parametric']} parametric, "
             f"{row['normal_skip']} skip, {row['normal_pool']} pool, alpha entropy {row['alpha_entropy']:.3f}",
             f"genotype = {s.space.describe(genotype)}"]
    if s.budget is not None:
        lines.append(f"energy budget {a.energy_budget:.4f} mJ: derived {row['genotype_energy_mj']:.4f} mJ, "
                     f"lambda {s.budget.lam:.4f}")
    return "\n".join(lines)


def finish(s: SimpleNamespace, a: argparse.Namespace, run: Run) -> None:
    """The network train.py builds from the written genotype: size and energy, logged and to wandb."""
    path = os.path.join(run.dir, "genotype.json")
    genotype = s.space.from_dict(distributed.from_main(lambda: s.space.to_dict(s.space.load(path)[0])))
    report = network_report(s.space.network(genotype, a.eval_channels, s.info, a.eval_layers).eval(),
                            run.estimator, s.info)
    run.log.info(f"search done in {run.wall_s:.1f} s; derived genotype = {s.space.describe(genotype)}")
    run.log.info("network train.py builds from it (%d channels, %d layers):\n%s", a.eval_channels, a.eval_layers,
                 report.text())
    run.tracker.summary({"genotype_energy_mj": report.energy_mj, "params": report.params, "macs": report.macs})
    run.tracker.artifact(f"genotype-{a.run_name}", "genotype", [path])


def main(argv: Optional[List[str]] = None) -> int:
    parser, args, explicit = parse_args(argv)
    return runs.guarded_main(parser, lambda a, e: search(parser, a, e), args, explicit)


if __name__ == "__main__":
    sys.exit(main())
