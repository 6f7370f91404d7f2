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
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from plumbing import distributed
import genotypes as G
from plumbing import options
from plumbing import runs
import spaces
from plumbing import utils
from plumbing.cliargs import CLIError, explicit_flags
from plumbing.datasets import DataInfo, eval_loaders, load_dataset
from plumbing.layout import want_channels_last
from model import network_report
from plumbing.run import Run


def build_parser() -> argparse.ArgumentParser:
    return options.train_parser(G.NAMED_GENOTYPES)


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
    from plumbing.datasets import known_info
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


def build(run: Run) -> SimpleNamespace:
    """The training's parts: the genotype (the checkpoint's on resume), data, network, optimizer, schedule."""
    a, device, ckpt = run.args, run.device, run.ckpt
    space = spaces.get(a.space)
    genotype = space.from_dict(runs.field(ckpt, "genotype", dict), "--resume checkpoint") if ckpt else load_genotype(a)
    size = a.image_size
    train_data, info = load_dataset(a.dataset, a.data, train=True, cutout=a.cutout_length if a.cutout else 0,
                                    image_size=size)
    test_data, _ = load_dataset(a.dataset, a.data, train=False, image_size=size)
    plain_train = load_dataset(a.dataset, a.data, train=True, augment=False, image_size=size)[0] \
        if a.valid_portion else None
    train_queue, valid_queue, test_queue = eval_loaders(train_data, plain_train, test_data, a, device)
    model = make_model(genotype, a, info).to(device).set_channels_last(want_channels_last(a.channels_last, device,
                                                                                          a.amp))
    if a.compile:
        utils.compile_cells(model)
    report = network_report(make_model(genotype, a, info).eval(), run.estimator, info)
    optimizer = torch.optim.SGD(model.parameters(), a.learning_rate, momentum=a.momentum,
                                weight_decay=a.weight_decay, nesterov=a.nesterov)
    if a.lr_schedule == "exponential":  # DARTS's ImageNet protocol: x0.97 per epoch
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=a.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, a.epochs)
    return SimpleNamespace(space=space, genotype=genotype, info=info, train_queue=train_queue,
                           valid_queue=valid_queue, test_queue=test_queue, model=model, report=report,
                           criterion=nn.CrossEntropyLoss(label_smoothing=a.label_smoothing), optimizer=optimizer,
                           scheduler=scheduler)


def train_step(s: SimpleNamespace, a: argparse.Namespace, run: Run, ddp, x, y):
    """One SGD step of the network (with its auxiliary head's loss); returns (logits, loss)."""
    s.optimizer.zero_grad(set_to_none=True)
    with run.autocast():  # --amp: this forward and its loss only (backward and step outside it)
        logits, logits_aux = (ddp or s.model)(x)  # DDP averages the gradients across ranks (torchrun)
        loss = s.criterion(logits, y)
        if logits_aux is not None:
            loss = loss + a.auxiliary_weight * s.criterion(logits_aux, y)
    run.check(loss, "training loss")
    loss.backward()
    clip = a.grad_clip or math.inf  # NB201's protocol does not clip: the norm is still checked
    run.check(nn.utils.clip_grad_norm_(s.model.parameters(), clip), "gradient")
    s.optimizer.step()
    return logits, loss


def train(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set) -> int:
    """DARTS's evaluation protocol: the genotype's network trained from scratch, tested after every epoch."""
    run = Run(parser, args, explicit, "train", final_file="summary.json")  # --resume: the checkpoint's flags
    resolve(run.args)
    if run.args.report:
        return report(run.args)
    if run.finished():
        return 0
    with run:
        a = run.args
        s = build(run)
        run.restore(s.model, s.optimizer, s.scheduler)
        ddp = distributed.wrap(s.model, run.device)  # None without torchrun
        run.log.info(f"genotype = {s.space.describe(s.genotype)}\n{s.report.text()}")
        if distributed.enabled() and run.ckpt is None:  # same initial weights, then per-rank augmentation/drop path
            utils.set_seed(a.seed + distributed.rank())
        run.start()
        for epoch in run.epochs():
            row: Dict[str, Any] = {"epoch": epoch + 1, "lr": s.optimizer.param_groups[0]["lr"]}
            s.model.drop_path_prob = a.drop_path_prob * epoch / a.epochs
            s.model.train()
            for x, y in run.batches(s.train_queue, epoch):
                logits, loss = train_step(s, a, run, ddp, x, y)
                run.record(logits, loss, y)
            row.update(run.end_training(list(s.model.parameters())))
            for queue, prefix in ((s.valid_queue, "valid"), (s.test_queue, "test")):
                if queue is not None:
                    row.update(run.evaluate(s.model, queue, prefix, s.info.num_classes)[0])
            s.scheduler.step()
            run.end_epoch(row, {"genotype": s.space.to_dict(s.genotype)}, lambda: write_weights(s, run, row),
                          lambda: epoch_line(a, row))
        finish(s, a, run)
    return run.status


def write_weights(s: SimpleNamespace, run: Run, row: Dict[str, Any]) -> Dict[str, Any]:
    """weights.pt, and best_weights.pt when the validation accuracy is the best so far (--valid_portion)."""
    weights = {"model": s.model.state_dict(), "genotype": s.space.to_dict(s.genotype)}
    utils.atomic_torch_save(weights, os.path.join(run.dir, "weights.pt"))
    if s.valid_queue is not None and row["valid_acc"] > run.best_valid_acc:
        run.best_valid_acc = row["valid_acc"]
        utils.atomic_torch_save({**weights, "epoch": row["epoch"], "valid_acc": row["valid_acc"]},
                                os.path.join(run.dir, "best_weights.pt"))
    return {}


def epoch_line(a: argparse.Namespace, row: Dict[str, Any]) -> str:
    return (f"epoch {row['epoch']}/{a.epochs} lr {row['lr']:.4g} train_acc {row['train_acc']:.2f} "
            + (f"valid_acc {row['valid_acc']:.2f} " if "valid_acc" in row else "")
            + f"test_acc {row['test_acc']:.2f} ({row['epoch_s']:.1f} s)")


def finish(s: SimpleNamespace, a: argparse.Namespace, run: Run) -> None:
    """summary.json (the FINAL epoch's test accuracy), wandb's summary, the log's last line."""
    rep = s.report
    last = distributed.from_main(lambda: runs.last_row(run.dir))  # torchrun: rank 0's file, sent to all
    summary = {"params": rep.params, "macs": rep.macs, "energy_mj": rep.energy_mj,
               "test_acc": last.get("test_acc"), "seed": a.seed, "wall_s": run.wall_s,
               "epochs": a.epochs, "genotype": s.space.to_dict(s.genotype),
               "best_valid_acc": run.best_valid_acc if a.valid_portion else None}
    if distributed.is_main():
        utils.atomic_write_json(os.path.join(run.dir, "summary.json"), summary)
    run.tracker.summary({k: v for k, v in summary.items() if k != "genotype"})
    run.log.info(f"final test_acc {summary['test_acc']:.2f} %, params {rep.params:,}, energy "
                 f"{rep.energy_mj:.4f} mJ per image, {run.wall_s:.1f} s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return runs.guarded_main(parser, lambda a, e: train(parser, a, e), args, explicit_flags(argv))


if __name__ == "__main__":
    sys.exit(main())
