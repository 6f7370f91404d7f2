"""The life of one run of a script, as a small object its loop calls (the loop itself stays in the script):

    run = Run(parser, args, explicit, "search", final_file="genotype.json")  # --resume: the checkpoint's flags
    if run.finished():                                   # a resumed run with nothing left to do changes nothing
        return 0
    with run:                                            # torchrun, signals, run folder + lock, log, device, seed
        ...build data, model, optimizers from run.args, run.device, run.estimator...
        run.restore(model, optimizer, scheduler, load_extra)   # --resume: every state, the epoch to start from
        run.start()                                      # args.json, env.json, wandb
        for epoch in run.epochs():
            for x, y in run.batches(train_queue, epoch):  # on the device; a signal stops after the step
                ...steps...; run.check(loss, "training loss"); run.record(logits, loss, y)
            row = {**run.end_training(tensors), **run.evaluate(model, valid_queue, "valid", classes)[0]}
            run.end_epoch(row, extra_state, write_files, line)  # metrics row, files, wandb, checkpoint, log line
        ...summaries (run.tracker)...
    return run.status                                    # 0, or 128 + the signal that stopped it

A signal during the epochs stops after the current step (or evaluation batch) without that epoch's row or
checkpoint: `batches` / `evaluate` raise `RunStopped`, which leaving the `with` block turns into the log line and
the status. A signal during set-up acts at once and leaves nothing behind (the folder goes while it holds no
checkpoint; `runs.guarded_main` says so). Errors pass through to `runs.guarded_main`, which makes them one line.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from plumbing import distributed, runs, utils
from plumbing.tracker import Tracker


class RunStopped(Exception):
    """A signal during the epochs: the current epoch ends without its row and checkpoint (caught by `Run`)."""


class Run:
    """One run of `script` ("search" or "train") in its own folder; `final_file` is what marks it finished."""

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set, script: str,
                 final_file: str) -> None:
        self.ckpt, self.args = runs.restored_args(parser, args, explicit, script)
        self.explicit, self.script, self.final_file = explicit, script, final_file
        self.status = 0
        self.start_epoch, self.epoch, self.best_valid_acc, self.wall_s = 0, 0, -1.0, 0.0
        self.wandb_id: Optional[str] = None
        self.stopped_early = False
        self.tracker: Optional[Tracker] = None
        self._stack: Optional[contextlib.ExitStack] = None
        self._states: Dict[str, Any] = {}
        self._pending_rng: Optional[Dict[str, Any]] = None

    def finished(self) -> bool:
        """True (and says so) when a resumed run has nothing left to do: it stopped early, or it ran all --epochs
        and wrote its `final_file`."""
        if self.ckpt is None:
            return False
        epoch, path = self.ckpt["epoch"] + 1, self.ckpt["path"]
        done = None
        if runs.field(self.ckpt, "stopped_early", bool, False):
            done = f"the run stopped early after epoch {epoch} and has finished"
        elif epoch >= self.args.epochs and os.path.exists(os.path.join(os.path.dirname(path), self.final_file)):
            done = f"the run has finished its {self.args.epochs} epochs"
        if done:
            print(f"{path}: {done}; nothing to do")
        return done is not None

    # ------------------------------------------------------------------------------------------ set-up
    def __enter__(self) -> "Run":
        a = self.args
        distributed.init(a.device, a.dist_timeout)  # a no-op without torchrun
        self._stack = contextlib.ExitStack()
        # signals are caught from the start: a stop during set-up or the first epoch ends cleanly, and the folder
        # goes (only while it holds no checkpoint)
        self.control = self._stack.enter_context(runs.RunControl())
        try:
            self.folder = self._stack.enter_context(runs.RunFolder(a, self.script, resume=self.ckpt is not None))
            self.dir = self.folder.path
            self.log = runs.setup_logging(self.dir, distributed.rank())
            self.device = utils.resolve_device(a.device, distributed.gpu_index(a.gpu))
            if self.device.type == "cpu" and not a.threads:  # recorded in args.json: a resume runs as many
                a.threads = utils.free_cpus()
            utils.set_threads(self.device, a.threads)
            utils.set_seed(a.seed)  # the same seed on every rank: identical initial weights (and alphas)
            utils.set_deterministic(a.deterministic, self.device)  # --deterministic: on for CPU runs, off on CUDA
            self.estimator = utils.load_estimator(a.energy_model, a.energy_batch_size)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is RunStopped:
            self.log.info(runs.stopped_message(self.control.signal_name, self.epoch, self.dir))
            self.control.settle()
            self.tracker.finish()
            self._stack.__exit__(None, None, None)
            self.status = 128 + self.control.signal_number
            return True
        if exc is not None:  # the folder goes while it holds no checkpoint; `runs.guarded_main` says so
            self._stack.__exit__(exc_type, exc, tb)
            return False
        self.control.settle()  # the epochs are over (checkpoint whole): later signals cannot change the outcome
        self.tracker.finish()
        self._stack.__exit__(None, None, None)
        return False

    def autocast(self):
        """The mixed-precision context of one forward and its loss (`--amp`; a no-op context without it)."""
        return utils.autocast(self.device, self.args.amp)

    def restore(self, model: torch.nn.Module, optimizer, scheduler,
                load_extra: Callable[[Dict[str, Any]], None] = lambda ckpt: None) -> None:
        """Register what the checkpoint holds; with --resume, load it: `load_extra(ckpt)` first (the script's own
        state), then the model, optimizer and scheduler, the schedule's overrides and the epoch to start from."""
        self._states = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        ckpt = self.ckpt
        if ckpt is None:
            return
        load_extra(ckpt)
        for name, target in self._states.items():
            runs.load_state(target, runs.field(ckpt, name, dict), f"--resume {self.dir}: the {name}")
        runs.override_schedule(optimizer, scheduler, self.args, self.explicit)
        self._pending_rng = runs.field(ckpt, "rng", dict)  # applied when the epochs start, after every set-up
        self.start_epoch = ckpt["epoch"] + 1
        self.best_valid_acc = float(runs.field(ckpt, "best_valid_acc", (float, int)))
        self.wall_s = float(runs.field(ckpt, "wall_s", (float, int), 0.0))
        self.wandb_id = runs.field(ckpt, "wandb_id", (str, type(None)), None)

    def start(self) -> None:
        """After set-up: the resume's bookkeeping, args.json and env.json, the wandb run."""
        if self.ckpt is not None:
            runs.resume_bookkeeping(self.log, self.dir, self.ckpt, self.args, self.explicit)
        self.tracker = runs.start_run(self.args, self.dir, self.device, self.estimator, self.wandb_id, self.log)
        self.wandb_id = self.tracker.run_id

    # ------------------------------------------------------------------------------------------ epochs
    def epochs(self) -> Iterator[int]:
        """The epochs left (0-based), each ended by `end_epoch`; stops after one that set `stopped_early`."""
        a = self.args
        if self._pending_rng is not None:
            utils.set_rng_state(self._pending_rng, self.device)
        self.control.context = {"weights": loss_weights(a), "start_epoch": self.start_epoch,
                                "resumed": self.ckpt["path"] if self.ckpt else None,
                                "learning_rate": a.learning_rate,
                                "rate_changed": bool(self.explicit & {"learning_rate", "arch_learning_rate"})}
        self.control.in_epochs = True  # from here a signal stops after the current step, the checkpoint whole
        for epoch in range(self.start_epoch, a.epochs):
            self.epoch, self._t0 = epoch, time.time()
            if self.control.stop_requested:  # a signal during the last epoch's files: no step of this one
                raise RunStopped
            yield epoch
            if self.stopped_early:
                break

    def batches(self, queue, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The training batches of `epoch` on the device (`record` each step's loss and logits).

        Nothing is read to the host inside a step: loss and accuracy sums and the non-finite checks (`check`)
        stay on the device and are read every `--report_freq` steps, at step 0 (a damaged checkpoint is named at
        once) and at the end, so a GPU never waits for the host. A non-finite value stops the run at the next
        read (the checkpoint is only written after an epoch, so it is still the last good one)."""
        from tqdm import tqdm
        distributed.set_epoch([queue], epoch)
        self._meter, self._flags = utils.DeviceMeter(["loss", "acc"]), utils.FiniteFlags()
        bar = tqdm(queue, desc=f"{self.script} {epoch + 1}/{self.args.epochs}", leave=False, dynamic_ncols=True,
                   disable=None)
        every, first, step = getattr(self.args, "report_freq", None) or 50, 0, -1
        for step, (x, y) in enumerate(bar):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if step == 0 or (step + 1) % every == 0:
                self._read(bar, epoch, first, step)
                first = step + 1
            if self.control.stop_requested:
                raise RunStopped
        if step >= first:
            self._read(bar, epoch, first, step)

    def check(self, value: torch.Tensor, what: str) -> None:
        """Non-finite check of a device tensor (read at the next --report_freq interval)."""
        self._flags.check(value, what)

    def record(self, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> None:
        """Add one training step's loss and accuracy to the epoch's sums (on the device)."""
        hits = utils.correct_counts(logits.detach(), y)[0]
        self._meter.add(torch.stack([loss.detach().to(torch.float64), hits.to(torch.float64) * 100.0 / y.size(0)]),
                        y.size(0))

    def _read(self, bar, epoch: int, first: int, step: int) -> None:
        bad = self._flags.bad()
        if bad is not None:
            what, value = bad
            self.control.check_finite(value, f"{what} in steps {first}-{step}" if step > first else what, epoch,
                                      step)
        avg = self._meter.read()
        bar.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['acc']:.1f}")

    def end_training(self, tensors: List[torch.Tensor]) -> Dict[str, float]:
        """The epoch's training loss and accuracy (averaged over every rank); torchrun's ranks must agree on
        `tensors` (the weights, the alphas)."""
        avg = self._meter.read()
        row = distributed.average_metrics({"train_loss": avg["loss"], "train_acc": avg["acc"]}, self._meter.n)
        distributed.check_same(tensors, "the weights")
        return row

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, queue, prefix: str, classes: int) -> Tuple[Dict[str, float], Any]:
        """Loss and accuracy (top-5 too beyond 10 `classes`) of `model` over `queue`, summed on the device and read
        once; and the network's second output of the last batch (the supernet's expected energy)."""
        model.eval()
        wide = classes > 10
        topk = (1, 5) if wide else (1,)
        meter = utils.DeviceMeter(["loss"] + [f"top{k}" for k in topk])
        second = None
        for x, y in queue:
            if self.control.stop_requested:
                raise RunStopped  # this epoch's partial figures go with the rest of it
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                logits, second = model(x)
                loss = torch.nn.functional.cross_entropy(logits, y).to(torch.float64)
            hits = utils.correct_counts(logits, y, topk).to(torch.float64) * 100.0 / y.size(0)
            meter.add(torch.cat([loss.reshape(1), hits]), y.size(0))
        avg = meter.read()
        out = {f"{prefix}_loss": avg["loss"], f"{prefix}_acc": avg["top1"]}
        if wide:
            out[f"{prefix}_acc_top5"] = avg["top5"]
        return distributed.average_metrics(out, meter.n), second

    def end_epoch(self, row: Dict[str, Any], extra_state: Dict[str, Any],
                  write_files: Callable[[], Dict[str, Any]], line: Callable[[], str]) -> None:
        """The epoch's metrics row, the script's files (`write_files`: returns extra data for wandb), its wandb
        step and its checkpoint (rank 0 only), then its log line."""
        row["epoch_s"] = time.time() - self._t0
        self.wall_s += row["epoch_s"]
        rng = utils.rng_state(self.device)  # torchrun: every rank's streams (a collective), saved by rank 0
        if distributed.is_main():
            utils.append_jsonl(os.path.join(self.dir, "metrics.jsonl"), row)
            self.tracker.log({**row, **write_files()}, step=row["epoch"])
            state = {"epoch": self.epoch, "args": vars(self.args),
                     **{k: v.state_dict() for k, v in self._states.items()},
                     "rng": rng, "best_valid_acc": self.best_valid_acc, "wandb_id": self.wandb_id,
                     "wall_s": self.wall_s, "stopped_early": self.stopped_early, **extra_state}
            runs.save_checkpoint(os.path.join(self.dir, "checkpoint.pt"), self.script, state)
        self.log.info(line())


def loss_weights(args: argparse.Namespace) -> Dict[str, float]:
    """The loss weights of the flags (`--*_weight` -> value), named by the non-finite check when extreme."""
    return {k: float(v) for k, v in vars(args).items() if k.endswith("_weight") and
            isinstance(v, (int, float)) and not isinstance(v, bool)}
