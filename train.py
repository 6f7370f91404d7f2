"""Train a genotype from scratch (DARTS's evaluation protocol), or report its size and energy.

    python train.py --dataset digits --arch DARTS_V2
    python train.py --genotype log/<search-run>/genotype.json --dataset cifar10 --auxiliary --cutout
    python train.py --arch DARTS_V2 --report [--json report.json] [--measure_energy --watts 65]

Reports the FINAL epoch's test accuracy (never a best-on-test pick); `--valid_portion p` holds out a validation
split of the training set that chooses the best checkpoint (`best_weights.pt`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

import distributed
import genotypes as G
import options
import runs
import spaces
import utils
from cliargs import CLIError, explicit_flags
from datasets import DataInfo, eval_loaders, load_dataset
from layout import want_channels_last
from model import network_report
from runner import EpochRunner, launch


def build_parser() -> argparse.ArgumentParser:
    return options.train_parser()


def resolve(args: argparse.Namespace) -> None:
    if spaces.space_of_genotype(args.genotype) == "nb201":  # an NB201 cell names its space itself
        args.space = "nb201"
    options.resolve_defaults(args, "train")
    if not args.genotype and not args.arch:
        raise CLIError("give the architecture: --genotype path/to/genotype.json or --arch NAME "
                             f"({', '.join(G.NAMED_GENOTYPES)})")
    if (args.json is not None or args.measure_energy) and not args.report:
        raise CLIError("--json and --measure_energy go with --report")
    if args.json is not None:
        runs.check_output_file(args.json, "--json", args.force, [args.genotype, args.energy_model, args.weights])
    elif args.force:
        raise CLIError("--force goes with --report --json (it lets the report overwrite an existing file)")
    if args.weights and not args.measure_energy:
        raise CLIError("--weights go with --report --measure_energy (the estimate does not depend on weights)")


def load_genotype(args: argparse.Namespace):
    """The genotype of --genotype / --arch in --space."""
    return spaces.get(args.space).resolve(args.genotype, args.arch)[0]


def dataset_info(args: argparse.Namespace) -> DataInfo:
    """The data set's shape without loading it when possible (reports need no data)."""
    from datasets import known_info
    info = known_info(args.dataset, args.image_size)
    if info is None:
        _, info = load_dataset(args.dataset, args.data, train=False, image_size=args.image_size)
    elif args.image_size:
        info = dataclasses.replace(info, image_size=args.image_size)
    return info


def make_model(genotype, args: argparse.Namespace, info: DataInfo) -> nn.Module:
    return spaces.get(args.space).network(genotype, args.init_channels, info, args.layers, args.auxiliary,
                                          imagenet=args.dataset == "imagenet")


def report(args: argparse.Namespace) -> int:
    """`--report`: params, MACs, estimated energy and its breakdown; optionally measured energy too."""
    genotype = load_genotype(args)
    info = dataset_info(args)
    estimator = utils.load_estimator(args.energy_model, args.energy_batch_size)
    model = make_model(genotype, args, info).eval()
    rep = network_report(model, estimator, info)
    out = {**rep.to_dict(), "test_acc": None, "seed": args.seed, "wall_s": None}
    if args.measure_energy:  # before printing anything: a missing counter is one error line, not half a report
        out.update(measure_energy(model, args, info, estimator.batch_size))
    print(f"{args.genotype or args.arch} at {args.init_channels} channels, {args.layers} layers, {args.dataset} "
          f"({info.in_channels}x{info.image_size}x{info.image_size}, batch {estimator.batch_size}):")
    print(rep.text())
    if args.measure_energy:
        measured = out["measured_energy_mj"]
        print(f"measured {measured:.4f} mJ per image ({out['measurement_source']}) vs estimated "
              f"{rep.energy_mj:.4f} mJ (ratio {measured / rep.energy_mj:.2f})")
    if args.json is not None:
        utils.atomic_write_json(args.json, out)
    return 0


def measure_energy(model: nn.Module, args, info: DataInfo, batch: int) -> Dict[str, Any]:
    """Measure the real inference energy per image (NVML, RAPL or latency x --watts) at the deployment batch."""
    from dl_energy_estimator import EnergyCounterUnavailable, measure
    if args.weights:
        state = load_weights(args.weights)
        if getattr(model, "auxiliary_head", None) is None:  # trained with --auxiliary: the head never deploys
            state = {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CLIError(f"--weights {args.weights} do not fit this network (same genotype, "
                                 f"--init_channels, --layers, --dataset?): {str(e).splitlines()[0]}") from None
    device = utils.resolve_device(args.device, args.gpu)
    try:
        m = measure([(model, (batch, info.in_channels, info.image_size, info.image_size))], device=device.type,
                    watts=args.watts, batch_size=batch)
    except EnergyCounterUnavailable as e:
        raise CLIError(str(e)) from None
    return {"measured_energy_mj": 1e3 * m.joules[0], "measurement_source": m.source}


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a weights file (weights.pt / best_weights.pt, or a bare state dict): names to tensors."""
    if os.path.isdir(path):
        raise CLIError(f"--weights {path} is a folder; give its weights.pt")
    if os.path.exists(path) and not os.path.isfile(path):  # a device or a pipe: torch.load would never end
        raise CLIError(f"--weights {path} is not a regular file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"--weights {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CLIError(f"--weights {path} is not a readable weights file ({type(e).__name__})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in state.items()):
        raise CLIError(f"--weights {path} is not a state dict (names to tensors), nor a weights.pt holding one")
    return state


class Trainer(EpochRunner):
    """One training run: the genotype's network, SGD with a cosine (or exponential) schedule, train/valid/test
    loaders; the epochs, checkpoints and resume are the runner's."""

    script = "train"
    final_file = "summary.json"

    def build(self) -> None:
        args = self.args
        self.space = spaces.get(args.space)
        self.genotype = self.space.from_dict(runs.field(self.ckpt, "genotype", dict), "--resume checkpoint") \
            if self.ckpt else load_genotype(args)
        cutout = args.cutout_length if args.cutout else 0
        size = args.image_size
        train_data, self.info = load_dataset(args.dataset, args.data, train=True, cutout=cutout, image_size=size)
        test_data, _ = load_dataset(args.dataset, args.data, train=False, image_size=size)
        plain_train = load_dataset(args.dataset, args.data, train=True, augment=False, image_size=size)[0] \
            if args.valid_portion else None
        self.train_queue, self.valid_queue, self.test_queue = eval_loaders(train_data, plain_train, test_data,
                                                                           args, self.device)
        self.model = make_model(self.genotype, args, self.info).to(self.device).set_channels_last(
            want_channels_last(args.channels_last, self.device, args.amp))
        if args.compile:
            utils.compile_cells(self.model)
        self.report = network_report(make_model(self.genotype, args, self.info).eval(), self.estimator, self.info)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.optimizer = torch.optim.SGD(self.model.parameters(), args.learning_rate, momentum=args.momentum,
                                         weight_decay=args.weight_decay, nesterov=args.nesterov)
        if args.lr_schedule == "exponential":  # DARTS's ImageNet protocol: x0.97 per epoch
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=args.gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, args.epochs)

    def after_setup(self) -> None:
        self.log.info(f"genotype = {self.space.describe(self.genotype)}\n{self.report.text()}")
        if distributed.enabled() and self.ckpt is None:  # same initial weights, then per-rank augmentation/drop path
            utils.set_seed(self.args.seed + distributed.rank())

    def extra_state(self) -> Dict[str, Any]:
        return {"genotype": self.space.to_dict(self.genotype)}

    def before_epoch(self, epoch: int) -> Dict[str, Any]:
        self.model.drop_path_prob = self.args.drop_path_prob * epoch / self.args.epochs
        return {}

    def train_step(self, x, y, epoch: int, lr: float, check):
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():  # --amp: this forward and its loss only (backward and step outside it)
            logits, logits_aux = (self.ddp or self.model)(x)  # DDP averages the gradients across ranks (torchrun)
            loss = self.criterion(logits, y)
            if logits_aux is not None:
                loss = loss + self.args.auxiliary_weight * self.criterion(logits_aux, y)
        check(loss, "training loss")
        loss.backward()
        clip = self.args.grad_clip or math.inf  # NB201's protocol does not clip: the norm is still checked
        check(nn.utils.clip_grad_norm_(self.model.parameters(), clip), "gradient")
        self.optimizer.step()
        return logits, loss

    def evaluate(self) -> Dict[str, float]:
        row: Dict[str, float] = {}
        for queue, prefix in ((self.valid_queue, "valid"), (self.test_queue, "test")):
            if queue is not None:
                row.update(self.evaluate_queue(queue, prefix)[0])
        return row

    def write_epoch(self, row: Dict[str, Any]) -> Dict[str, Any]:
        weights = {"model": self.model.state_dict(), "genotype": self.space.to_dict(self.genotype)}
        utils.atomic_torch_save(weights, os.path.join(self.run_dir, "weights.pt"))
        if self.valid_queue is not None and row["valid_acc"] > self.best_valid_acc:
            self.best_valid_acc = row["valid_acc"]
            utils.atomic_torch_save({**weights, "epoch": row["epoch"], "valid_acc": row["valid_acc"]},
                                    os.path.join(self.run_dir, "best_weights.pt"))
        return {}

    def epoch_line(self, row: Dict[str, Any]) -> str:
        return (f"epoch {row['epoch']}/{self.args.epochs} lr {row['lr']:.4g} train_acc {row['train_acc']:.2f} "
                + (f"valid_acc {row['valid_acc']:.2f} " if "valid_acc" in row else "")
                + f"test_acc {row['test_acc']:.2f} ({row['epoch_s']:.1f} s)")

    def finish(self, tracker) -> None:
        args, rep = self.args, self.report
        last = distributed.from_main(lambda: runs.last_row(self.run_dir))  # torchrun: rank 0's file, sent to all
        summary = {"params": rep.params, "macs": rep.macs, "energy_mj": rep.energy_mj,
                   "test_acc": last.get("test_acc"), "seed": args.seed, "wall_s": self.wall_s,
                   "epochs": args.epochs, "genotype": self.space.to_dict(self.genotype),
                   "best_valid_acc": self.best_valid_acc if args.valid_portion else None}
        if distributed.is_main():
            utils.atomic_write_json(os.path.join(self.run_dir, "summary.json"), summary)
        tracker.summary({k: v for k, v in summary.items() if k != "genotype"})
        self.log.info(f"final test_acc {summary['test_acc']:.2f} %, params {rep.params:,}, energy "
                      f"{rep.energy_mj:.4f} mJ per image, {self.wall_s:.1f} s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return runs.guarded_main(parser, lambda a, e: run(parser, a, e), args, explicit_flags(argv))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set) -> int:
    ckpt, args = runs.restored_args(parser, args, explicit, Trainer.script)
    resolve(args)
    if args.report:
        return report(args)
    return launch(Trainer, args, explicit, ckpt)


if __name__ == "__main__":
    sys.exit(main())
