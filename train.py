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
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

import distributed
import genotypes as G
import runs
import utils
from datasets import TRAIN_DEFAULTS, DataInfo, eval_loaders, load_dataset
from layout import want_channels_last
from model import build_network, network_report
from runs import RunControl
from tracker import Tracker

SCRIPT = "train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a searched cell from scratch (defaults: DARTS's CIFAR-10 "
                                            "protocol; digits and imagenet have defaults of their own).")
    utils.add_common_args(p)
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--genotype", help="genotype.json written by train_search.py")
    arch.add_argument("--arch", help=f"a named genotype: {', '.join(G.NAMED_GENOTYPES)}")
    p.add_argument("--batch_size", type=utils.positive_int)
    p.add_argument("--learning_rate", type=utils.positive_float)
    p.add_argument("--momentum", type=utils.unit_float)
    p.add_argument("--weight_decay", type=utils.nonneg_float)
    p.add_argument("--epochs", type=utils.positive_int)
    p.add_argument("--init_channels", type=utils.positive_int)
    p.add_argument("--layers", type=utils.positive_int)
    p.add_argument("--auxiliary", action="store_true", help="auxiliary tower at 2/3 depth")
    p.add_argument("--auxiliary_weight", type=utils.nonneg_float)
    p.add_argument("--cutout", action="store_true", help="cutout augmentation")
    p.add_argument("--cutout_length", type=utils.positive_int)
    p.add_argument("--drop_path_prob", type=utils.unit_float)
    p.add_argument("--grad_clip", type=utils.positive_float)
    p.add_argument("--label_smoothing", type=utils.unit_float)
    p.add_argument("--image_size", type=utils.positive_int, default=None,
                   help="imagenet/imagefolder: side of the square input (default 224 / 32)")
    utils.add_speed_args(p)
    p.add_argument("--valid_portion", type=utils.fraction, default=None,
                   help="hold out this part of the training split to choose the best checkpoint")
    p.add_argument("--report", action="store_true", help="print params, MACs and energy, then exit")
    p.add_argument("--json", default=None, help="with --report: also write the report as JSON here")
    p.add_argument("--measure_energy", action="store_true",
                   help="with --report: measure the real inference energy on this device beside the estimate")
    p.add_argument("--weights", default=None, help="with --measure_energy: weights to load (a weights .pt)")
    p.add_argument("--watts", type=utils.positive_float, default=None,
                   help="with --measure_energy and no energy counter: the device's power draw in W")
    return p


def resolve(args: argparse.Namespace) -> None:
    utils.apply_defaults(args, TRAIN_DEFAULTS)
    if not args.genotype and not args.arch:
        raise utils.CLIError("give the architecture: --genotype path/to/genotype.json or --arch NAME "
                             f"({', '.join(G.NAMED_GENOTYPES)})")
    if args.image_size and args.dataset not in ("imagenet", "imagefolder"):
        raise utils.CLIError(f"--image_size applies to imagenet and imagefolder; {args.dataset} has a fixed size")
    if (args.json or args.measure_energy) and not args.report:
        raise utils.CLIError("--json and --measure_energy go with --report")


def load_genotype(args: argparse.Namespace) -> G.Genotype:
    return G.load(args.genotype) if args.genotype else G.named_genotype(args.arch)


def dataset_info(args: argparse.Namespace) -> DataInfo:
    """The data set's shape without loading it when possible (reports need no data)."""
    from datasets import known_info
    info = known_info(args.dataset)
    if info is None:
        _, info = load_dataset(args.dataset, args.data, train=False, image_size=args.image_size)
    elif args.image_size:
        info = dataclasses.replace(info, image_size=args.image_size)
    return info


def make_model(genotype: G.Genotype, args: argparse.Namespace, info: DataInfo) -> nn.Module:
    return build_network(genotype, args.init_channels, info.num_classes, args.layers, args.auxiliary,
                         info.in_channels, info.image_size, imagenet=args.dataset == "imagenet")


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
    if args.json:
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
            raise utils.CLIError(f"--weights {args.weights} do not fit this network (same genotype, "
                                 f"--init_channels, --layers, --dataset?): {str(e).splitlines()[0]}") from None
    device = utils.resolve_device(args.device, args.gpu)
    try:
        m = measure([(model, (batch, info.in_channels, info.image_size, info.image_size))], device=device.type,
                    watts=args.watts, batch_size=batch)
    except EnergyCounterUnavailable as e:
        raise utils.CLIError(str(e)) from None
    return {"measured_energy_mj": 1e3 * m.joules[0], "measurement_source": m.source}


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise utils.CLIError(f"--weights {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise utils.CLIError(f"--weights {path} is not a readable weights file ({type(e).__name__})") from None
    return state.get("model", state) if isinstance(state, dict) else state


class Trainer:
    """One training run: model, optimizer, schedule, loaders; `run()` does the epochs with checkpoints."""

    def __init__(self, args: argparse.Namespace, run_dir: str, ckpt: Optional[Dict[str, Any]], explicit: set,
                 log) -> None:
        self.args, self.run_dir, self.log = args, run_dir, log
        self.device = utils.resolve_device(args.device, distributed.gpu_index(args.gpu))
        utils.set_threads(self.device, args.threads)
        utils.set_seed(args.seed)
        self.genotype = G.from_dict(ckpt["genotype"]) if ckpt else load_genotype(args)
        self.estimator = utils.load_estimator(args.energy_model, args.energy_batch_size)
        cutout = args.cutout_length if args.cutout else 0
        size = args.image_size
        train_data, self.info = load_dataset(args.dataset, args.data, train=True, cutout=cutout, image_size=size)
        test_data, _ = load_dataset(args.dataset, args.data, train=False, image_size=size)
        plain_train = load_dataset(args.dataset, args.data, train=True, augment=False, image_size=size)[0] \
            if args.valid_portion \
            else None
        self.train_queue, self.valid_queue, self.test_queue = eval_loaders(train_data, plain_train, test_data,
                                                                           args, self.device)
        self.model = make_model(self.genotype, args, self.info).to(self.device).set_channels_last(
            want_channels_last(args.channels_last, self.device, args.amp))
        if args.compile:
            utils.compile_cells(self.model)
        self.report = network_report(make_model(self.genotype, args, self.info).eval(), self.estimator, self.info)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.optimizer = torch.optim.SGD(self.model.parameters(), args.learning_rate, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        if args.lr_schedule == "exponential":  # DARTS's ImageNet protocol: x0.97 per epoch
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=args.gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, args.epochs)
        self.start_epoch, self.best_valid_acc, self.wandb_id, self.wall_s, self.pending_rng = 0, -1.0, None, 0.0, None
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            runs.override_schedule(self.optimizer, self.scheduler, args, explicit)
            self.start_epoch, self.best_valid_acc = ckpt["epoch"] + 1, ckpt["best_valid_acc"]
            self.wandb_id, self.wall_s, self.pending_rng = ckpt.get("wandb_id"), ckpt["wall_s"], ckpt["rng"]
        self.ddp = distributed.wrap(self.model, self.device)  # None without torchrun
        if distributed.enabled() and ckpt is None:  # same initial weights, then per-rank augmentation/drop path
            utils.set_seed(args.seed + distributed.rank())

    def state(self, epoch: int) -> Dict[str, Any]:
        return {"epoch": epoch, "args": vars(self.args), "genotype": G.to_dict(self.genotype),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": utils.rng_state(),
                "best_valid_acc": self.best_valid_acc, "wandb_id": self.wandb_id, "wall_s": self.wall_s}

    def train_epoch(self, epoch: int, control: RunControl) -> Dict[str, float]:
        from tqdm import tqdm
        a, m = self.args, self.model
        m.train()
        distributed.set_epoch([self.train_queue], epoch)
        loss_m, acc_m = utils.AvgMeter(), utils.AvgMeter()
        bar = tqdm(self.train_queue, desc=f"train {epoch + 1}/{a.epochs}", leave=False, dynamic_ncols=True,
                   disable=None)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            logits, logits_aux = (self.ddp or m)(x)  # DDP averages the gradients across ranks (torchrun)
            loss = self.criterion(logits, y)
            if logits_aux is not None:
                loss = loss + a.auxiliary_weight * self.criterion(logits_aux, y)
            control.check_finite(loss.item(), "training loss", epoch, step)
            loss.backward()
            norm = nn.utils.clip_grad_norm_(m.parameters(), a.grad_clip)
            control.check_finite(float(norm), "gradient", epoch, step)
            self.optimizer.step()
            loss_m.update(loss.item(), y.size(0))
            acc_m.update(utils.accuracy(logits.detach(), y)[0], y.size(0))
            bar.set_postfix(loss=f"{loss_m.avg:.3f}", acc=f"{acc_m.avg:.1f}")
            if control.stop_requested:
                break
        return distributed.average_metrics({"train_loss": loss_m.avg, "train_acc": acc_m.avg}, acc_m.n)

    @torch.no_grad()
    def evaluate(self, queue, prefix: str) -> Dict[str, float]:
        self.model.eval()
        loss_m, top1, top5 = utils.AvgMeter(), utils.AvgMeter(), utils.AvgMeter()
        for x, y in queue:
            x, y = x.to(self.device), y.to(self.device)
            logits, _ = self.model(x)
            loss_m.update(nn.functional.cross_entropy(logits, y).item(), y.size(0))
            a1, a5 = utils.accuracy(logits, y, (1, 5))
            top1.update(a1, y.size(0))
            top5.update(a5, y.size(0))
        out = {f"{prefix}_loss": loss_m.avg, f"{prefix}_acc": top1.avg}
        if self.info.num_classes > 10:
            out[f"{prefix}_acc_top5"] = top5.avg
        return distributed.average_metrics(out, top1.n)

    def run(self, tracker: Tracker, control: RunControl) -> Dict[str, Any]:
        a, log = self.args, self.log
        if self.pending_rng is not None:
            utils.set_rng_state(self.pending_rng)
        row: Dict[str, Any] = {}
        for epoch in range(self.start_epoch, a.epochs):
            t0 = time.time()
            lr = self.optimizer.param_groups[0]["lr"]
            self.model.drop_path_prob = a.drop_path_prob * epoch / a.epochs
            row = {"epoch": epoch + 1, "lr": lr}
            with utils.autocast(self.device, a.amp):
                row.update(self.train_epoch(epoch, control))
            if control.stop_requested:
                log.info(runs.stopped_message(control.signal_name, epoch, self.run_dir))
                return {"stopped": True}
            self.scheduler.step()
            distributed.check_same(list(self.model.parameters()), "weights")  # torchrun: ranks must agree
            if self.valid_queue is not None:
                with utils.autocast(self.device, a.amp):
                    row.update(self.evaluate(self.valid_queue, "valid"))
            with utils.autocast(self.device, a.amp):
                row.update(self.evaluate(self.test_queue, "test"))
            self.wall_s += time.time() - t0
            row["epoch_s"] = time.time() - t0
            if not distributed.is_main():  # torchrun: only rank 0 writes files
                continue
            utils.append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), row)
            tracker.log(row, step=epoch + 1)
            weights = {"model": self.model.state_dict(), "genotype": G.to_dict(self.genotype)}
            utils.atomic_torch_save(weights, os.path.join(self.run_dir, "weights.pt"))
            if self.valid_queue is not None and row["valid_acc"] > self.best_valid_acc:
                self.best_valid_acc = row["valid_acc"]
                utils.atomic_torch_save({**weights, "epoch": epoch + 1, "valid_acc": row["valid_acc"]},
                                        os.path.join(self.run_dir, "best_weights.pt"))
            runs.save_checkpoint(os.path.join(self.run_dir, "checkpoint.pt"), SCRIPT, self.state(epoch))
            log.info(f"epoch {epoch + 1}/{a.epochs} lr {lr:.4g} train_acc {row['train_acc']:.2f} "
                     + (f"valid_acc {row['valid_acc']:.2f} " if "valid_acc" in row else "")
                     + f"test_acc {row['test_acc']:.2f} ({row['epoch_s']:.1f} s)")
        return {"stopped": False, "last": row}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return runs.guarded_main(parser, run, args, utils.explicit_flags(argv))


def run(args: argparse.Namespace, explicit: set) -> int:
    ckpt, args = runs.restored_args(args, explicit, SCRIPT)
    resolve(args)
    if args.report:
        return report(args)
    trainer, run_dir, log, tracker = runs.open_run(args, explicit, SCRIPT, ckpt,
                                                    lambda d, lg: Trainer(args, d, ckpt, explicit, lg))
    rep = trainer.report
    log.info(f"genotype = {trainer.genotype}\n{rep.text()}")
    result, status = runs.run_epochs(trainer, tracker)
    if status:
        return status
    last = result["last"]
    summary = {"params": rep.params, "macs": rep.macs, "energy_mj": rep.energy_mj,
               "test_acc": last.get("test_acc"), "seed": args.seed, "wall_s": trainer.wall_s,
               "epochs": args.epochs, "genotype": G.to_dict(trainer.genotype),
               "best_valid_acc": trainer.best_valid_acc if args.valid_portion else None}
    if distributed.is_main():
        utils.atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    tracker.summary({k: v for k, v in summary.items() if k != "genotype"})
    tracker.finish()
    log.info(f"final test_acc {summary['test_acc']:.2f} %, params {rep.params:,}, energy {rep.energy_mj:.4f} mJ "
             f"per image, {trainer.wall_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
