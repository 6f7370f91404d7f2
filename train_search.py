"""Energy-aware DARTS search: `python train_search.py --dataset digits` (see README for CIFAR-10 on a GPU).

Each epoch trains the supernet's weights on one half of the training split and its alphas on the other half,
then writes to <log_dir>/<run_name>/: metrics.jsonl, alphas.json, genotype.json, checkpoint.pt, log.txt."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

import distributed
import benchmark
import jsonfile
import options
import runs
import utils
from architect import Architect, arch_lr_for_steps
from cliargs import CLIError, explicit_flags
from datasets import load_dataset, search_loaders, split_meta
from derivation import cell_stats, ranking
from layout import want_channels_last
from model import network_report
from runner import EpochRunner, launch
import search_control
import spaces


build_parser = options.search_parser  # the flags (options.py holds both scripts' tables)


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
    search_control.check_args(args, space.guarded_ops)


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


class Search(EpochRunner):
    """DARTS's bilevel search with the energy term: each batch one step of the alphas on the validation half,
    then one of the weights on the training half; each epoch derives the cell (guards, budget) and writes it."""

    script = "search"
    final_file = "genotype.json"

    def build(self) -> None:
        a = self.args
        train_data, self.info = load_dataset(a.dataset, a.data, train=True, image_size=a.image_size)
        self.train_queue, self.valid_queue = search_loaders(train_data, a, self.device)
        a.arch_learning_rate = a.arch_learning_rate or arch_lr_for_steps(len(self.train_queue),
                                                                         a.epochs - a.warmup_epochs)
        self.space = spaces.get(a.space)
        self.model = self.space.supernet(a, self.info, self.estimator).to(self.device).set_channels_last(
            want_channels_last(a.channels_last, self.device, a.amp))
        if a.compile:  # energies traced first, then each cell as one graph (CUDA graphs on a GPU)
            utils.compile_cells(self.model, (1, self.info.in_channels) + (self.info.image_size,) * 2, whole=True)
        self.weights = self.model.weight_parameters()
        self.optimizer = torch.optim.SGD(self.weights, a.learning_rate, momentum=a.momentum,
                                         weight_decay=a.weight_decay, nesterov=a.nesterov)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, a.epochs,
                                                                    eta_min=a.learning_rate_min)
        self.architect = Architect(self.model, a.arch_learning_rate, a.arch_weight_decay, a.momentum,
                                   a.weight_decay, a.task_weight, a.energy_weight, a.unrolled,
                                   grad_hook=distributed.average_ if distributed.enabled() else None,
                                   autocast=self.autocast)
        self.stopper = search_control.CollapseStopper(patience=a.patience) if a.early_stop else None
        self.budget = search_control.BudgetController(a.energy_budget, a.budget_rate) if a.energy_budget else None
        self._costs = None
        self.benchmark = benchmark.load_table(a.benchmark) if a.benchmark else None

    # -------------------------------------------------------------------------------------- the algorithm
    def before_epoch(self, epoch: int) -> Dict[str, Any]:
        if self.budget is not None:  # the budget's multiplier sets the energy weight, step by step
            return {}
        self.architect.energy_weight = self.args.energy_weight * self.energy_scale(epoch)
        return {"energy_weight_now": self.architect.energy_weight}

    def train_epoch(self, epoch: int, lr: float, control: runs.RunControl) -> Dict[str, float]:
        distributed.set_epoch([self.valid_queue], epoch)
        self.valid_iter = iter(self.valid_queue)
        return super().train_epoch(epoch, lr, control)

    def train_step(self, x, y, epoch: int, lr: float, check):
        """The alphas' step on a validation batch (not during the warm-up), then the weights' step on `x`."""
        utils.step_begin(self.args, self.device)
        xv, yv = self.next_valid()
        if epoch >= self.args.warmup_epochs:  # warm-up: the alphas (and Adam's state) stay as they are
            if self.budget is not None:
                self.architect.energy_weight = self.budget.update(self.cell_costs().total(self.guarded()))
            check(self.architect.step(x, y, xv, yv, lr, self.optimizer), "architecture loss")
        return weight_step(self.model, self.weights, self.optimizer, x, y, self.args.grad_clip, check, self.ddp,
                           self.autocast)

    def next_valid(self):
        try:
            xv, yv = next(self.valid_iter)
        except StopIteration:  # a validation half smaller than the training half: start it again
            self.valid_iter = iter(self.valid_queue)
            xv, yv = next(self.valid_iter)
        return xv.to(self.device, non_blocking=True), yv.to(self.device, non_blocking=True)

    def evaluate(self) -> Dict[str, float]:
        row, energy = self.evaluate_queue(self.valid_queue, "valid")
        return {**row, "expected_energy_mj": 1e3 * float(energy),
                "energy_normalized": float(self.architect.normalized_energy(energy))}

    def after_epoch(self, epoch: int, row: Dict[str, Any]) -> bool:
        """Derive this epoch's cell (guarded, projected onto the budget), its statistics, and early stop."""
        a, actions = self.args, []
        unguarded = self.model.genotype()
        guarded = self.guarded(actions)
        self.epoch_genotype = self.project(guarded, actions)
        self.log.info("\n".join(actions)) if actions else None
        row.update(guard_actions=len(actions),
                   unguarded_normal_skip=search_control.CollapseStopper.skips(self.space.collapse_view(unguarded)))
        if self.budget is not None:  # where the search itself stands, before the projection onto the budget
            row.update(budget_lambda=self.budget.lam, unprojected_energy_mj=self.cell_costs().total(guarded))
        self.alphas = self.model.softmaxed_alphas()
        row["genotype_energy_mj"] = self.space.energy_mj(self.epoch_genotype, self.info, a.eval_channels,
                                                         a.eval_layers, self.estimator)
        row.update(cell_stats(self.space.guarded_cell(self.epoch_genotype), self.alphas))
        row.update(self.benchmark.metrics(self.epoch_genotype) if self.benchmark else {})
        self.best_valid_acc = max(self.best_valid_acc, row["valid_acc"])
        if self.stopper is None:
            return False
        kept = {"genotype": self.space.to_dict(self.epoch_genotype),
                "row": {k: v for k, v in row.items() if k in ("epoch", "valid_acc", "genotype_energy_mj")
                        or k.startswith("bench_")}}
        if stop := self.stopper.update(epoch + 1, self.space.collapse_view(unguarded), kept,
                                       ranking(self.alphas, a.primitives)):
            self.log.info(self.stopper.reason)
        return stop

    def guarded(self, actions: Optional[List[str]] = None):
        """The derived genotype, guarded by --max_skip / --min_parametric."""
        return self.model.genotype(self.args.max_skip, self.args.min_parametric, actions)

    def project(self, genotype, actions: List[str]):
        """The genotype this run writes: `genotype` projected onto --energy_budget when one is set."""
        if self.budget is None:
            return genotype
        return self.space.project(genotype, self.model, self.args, self.cell_costs(), actions)

    def cell_costs(self):
        """Per-op energies of the network train.py builds (measured once; the budget prices every step with it)."""
        if self._costs is None:
            self._costs = self.space.costs(self.args, self.info, self.estimator)
        return self._costs

    def energy_scale(self, epoch: int) -> float:
        return search_control.energy_scale(epoch, self.args.warmup_epochs, self.args.energy_ramp_epochs)

    def checked_tensors(self) -> List[torch.Tensor]:  # what torchrun's ranks must agree on
        return self.model.arch_parameters() + self.weights

    # ------------------------------------------------------------------------------------ state and files
    def search_space(self) -> Dict[str, Any]:
        a = self.args
        return {"space": a.space, "primitives": list(a.primitives), "layers": a.layers,
                "init_channels": a.init_channels, "partial_channels": a.partial_channels, "dataset": a.dataset}

    def extra_state(self) -> Dict[str, Any]:
        return {"space": self.search_space(), "arch_optimizer": self.architect.optimizer.state_dict(),
                "stopper": self.stopper.state_dict() if self.stopper else None,
                "budget": self.budget.state_dict() if self.budget else None}

    def load_extra_state(self, ckpt: Dict[str, Any], explicit: set) -> None:
        if runs.field(ckpt, "space", dict) != self.search_space():
            raise CLIError(f"--resume: the checkpoint's search space {ckpt['space']} differs from this "
                           f"run's {self.search_space()}")
        runs.load_state(self.architect.optimizer, runs.field(ckpt, "arch_optimizer", dict),
                        "--resume: the alphas' optimizer")
        if explicit & {"arch_learning_rate", "arch_weight_decay"}:
            self.architect.set_hyperparameters(self.args.arch_learning_rate, self.args.arch_weight_decay)
        for controller, key in ((self.stopper, "stopper"), (self.budget, "budget")):
            if controller is not None and runs.field(ckpt, key, (dict, type(None)), None):
                runs.load_state(controller, ckpt[key], f"--resume: the {key}'s state")

    def write_epoch(self, row: Dict[str, Any]) -> Dict[str, Any]:
        """alphas.json, genotype.json (the kept one after an early stop) and the figures; wandb gets the figures."""
        path = os.path.join(self.run_dir, "alphas.json")
        history = jsonfile.expect(jsonfile.read(path, "alphas file", []), list, path)
        history.append({"epoch": row["epoch"], "primitives": list(self.args.primitives), **self.alphas})
        utils.atomic_write_json(path, history)
        if self.stopped_early:
            kept = self.stopper.result
            self.write_genotype(self.space.from_dict(kept["genotype"]), {**kept["row"],
                                                                         "early_stop": self.stopper.reason})
        else:
            self.write_genotype(self.epoch_genotype, row)
        return self.plot_epoch(row)

    def plot_epoch(self, row: Dict[str, Any]) -> Dict[str, Any]:
        """The run folder's figures (updated each epoch), as wandb images."""
        import plots
        a, tracker = self.args, self.tracker
        paths = plots.search_epoch_figures(self.run_dir, self.alphas, a.primitives, a.run_name, self.space,
                                           self.epoch_genotype, (self.info, a.eval_channels, a.eval_layers,
                                                                 self.estimator), row["epoch"])
        return {f"plots/{k}": tracker.image(p) for k, p in paths.items()} if tracker.run is not None else {}

    def write_genotype(self, genotype, row: Dict[str, Any]) -> None:
        """genotype.json with the epoch's metadata (also the kept genotype of an early stop)."""
        a = self.args
        meta = {"dataset": a.dataset, **split_meta(a), "energy_mj": row["genotype_energy_mj"],
                "energy_batch_size": self.estimator.batch_size, "eval_channels": a.eval_channels,
                "eval_layers": a.eval_layers, "search_run": a.run_name, "seed": a.seed, "epoch": row["epoch"],
                "valid_acc": row["valid_acc"], "energy_weight": a.energy_weight, "task_weight": a.task_weight}
        meta.update({"early_stop": row["early_stop"]} if "early_stop" in row else {})
        meta.update({"guards": {"max_skip": a.max_skip, "min_parametric": a.min_parametric}}
                    if a.max_skip is not None or a.min_parametric else {})
        meta.update({"energy_budget_mj": a.energy_budget} if a.energy_budget is not None else {})
        meta.update({k: v for k, v in row.items() if k.startswith("bench_")})
        self.space.save(genotype, os.path.join(self.run_dir, "genotype.json"), a.primitives, meta)

    def epoch_line(self, row: Dict[str, Any]) -> str:
        a = self.args
        lines = [f"epoch {row['epoch']}/{a.epochs} lr {row['lr']:.4g} train_acc {row['train_acc']:.2f} valid_acc "
                 f"{row['valid_acc']:.2f} expected_energy {row['expected_energy_mj']:.4f} mJ genotype_energy "
                 f"{row['genotype_energy_mj']:.4f} mJ | normal: {row['normal_parametric']} parametric, "
                 f"{row['normal_skip']} skip, {row['normal_pool']} pool, alpha entropy {row['alpha_entropy']:.3f}",
                 f"genotype = {self.space.describe(self.epoch_genotype)}"]
        if self.budget is not None:
            lines.append(f"energy budget {a.energy_budget:.4f} mJ: derived {row['genotype_energy_mj']:.4f} mJ, "
                         f"lambda {self.budget.lam:.4f}")
        return "\n".join(lines)

    def finish(self, tracker) -> None:
        """The network train.py builds from the written genotype: size and energy, logged and to wandb."""
        a, info = self.args, self.info
        path = os.path.join(self.run_dir, "genotype.json")
        genotype = self.space.from_dict(distributed.from_main(lambda: self.space.to_dict(self.space.load(path)[0])))
        report = network_report(self.space.network(genotype, a.eval_channels, info, a.eval_layers).eval(),
                                self.estimator, info)
        self.log.info(f"search done in {self.wall_s:.1f} s; derived genotype = {self.space.describe(genotype)}")
        self.log.info("network train.py builds from it (%d channels, %d layers):\n%s", a.eval_channels,
                      a.eval_layers, report.text())
        tracker.summary({"genotype_energy_mj": report.energy_mj, "params": report.params, "macs": report.macs})
        tracker.artifact(f"genotype-{a.run_name}", "genotype", [path])


def main(argv: Optional[List[str]] = None) -> int:
    parser, args, explicit = parse_args(argv)
    return runs.guarded_main(parser, lambda a, e: run(parser, a, e), args, explicit)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set) -> int:
    ckpt, args = runs.restored_args(parser, args, explicit, Search.script)
    resolve(args)
    return launch(Search, args, explicit, ckpt)


if __name__ == "__main__":
    sys.exit(main())
