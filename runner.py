"""The one epoch runner of both scripts: train_search.py's `Search` and train.py's `Trainer` subclass it.

The runner owns what every run shares: device, seed, energy model, the run folder (through `runs.py`), the
checkpoint with the RNG state and resume, the epoch loop under Ctrl-C / SIGTERM and non-finite checks, torchrun's
checks, the metric rows and wandb. A script fills in what differs:

    build()                          data, model, `optimizer`, `scheduler`, `train_queue`, `info` (once, from __init__)
    train_step(x, y, epoch, lr, check) -> (logits, loss)   one training batch; `check(tensor, what)`: non-finite
                                     check of a device tensor (read at the next --report_freq interval)
    evaluate() -> row                what the epoch's evaluation adds to its metrics row
    before_epoch(epoch) -> row       settings of the epoch (energy weight, drop path), also logged in the row
    after_epoch(epoch, row) -> bool  derive, decide; True ends the run after this epoch (its checkpoint included)
    write_epoch(row) -> dict         the script's own files of the epoch; returns extra data for wandb
    extra_state() / load_extra_state(ckpt, explicit)   what the checkpoint holds beyond the common state
    after_setup()                    (optional) once set up (and restored): log what the run is
    finish(tracker)                  after the last epoch: summaries; `final_file` is what it writes last
    epoch_line(row) -> str           the log line of an epoch
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import distributed
import runs
import utils
from runs import RunControl
from tracker import Tracker


class _EvaluationStopped(Exception):
    """A signal during an evaluation: its partial figures are dropped with the rest of the epoch."""


class EpochRunner:
    """One run of a script: set up in __init__ (restored from `ckpt` when resuming), `run()` does the epochs."""

    script = ""  # the checkpoint's kind and the progress bar's label
    final_file = ""  # written by `finish` (or, for a search, at every epoch): a run with it and no epoch left is done

    def __init__(self, args: argparse.Namespace, run_dir: str, ckpt: Optional[Dict[str, Any]], explicit: set,
                 log: logging.Logger) -> None:
        self.args, self.run_dir, self.log, self.ckpt, self.explicit = args, run_dir, log, ckpt, explicit
        self.device = utils.resolve_device(args.device, distributed.gpu_index(args.gpu))
        if self.device.type == "cpu" and not args.threads:  # recorded in args.json: a resume runs as many
            args.threads = utils.free_cpus()
        utils.set_threads(self.device, args.threads)
        utils.set_seed(args.seed)  # the same seed on every rank: identical initial weights (and alphas)
        utils.set_deterministic(args.deterministic, self.device)  # --deterministic: on for CPU runs, off on CUDA
        self.estimator = utils.load_estimator(args.energy_model, args.energy_batch_size)
        self.start_epoch, self.best_valid_acc, self.wall_s = 0, -1.0, 0.0
        self.wandb_id: Optional[str] = None
        self.pending_rng: Optional[Dict[str, Any]] = None
        self.stopped_early = False
        self.control: Optional[RunControl] = None
        self.build()
        if ckpt is not None:
            self.restore(ckpt, explicit)
        self.ddp = distributed.wrap(self.model, self.device)  # None without torchrun
        self.after_setup()

    @classmethod
    def finished(cls, ckpt: Dict[str, Any], args: argparse.Namespace) -> Optional[str]:
        """Why a run restored from `ckpt` has nothing left to do, or None. A run that stopped early stays
        stopped; one that ran all --epochs is done once its `final_file` exists."""
        epoch = ckpt["epoch"] + 1
        if runs.field(ckpt, "stopped_early", bool, False):
            return f"the run stopped early after epoch {epoch} and has finished"
        run_dir = os.path.dirname(ckpt["path"])
        if epoch >= args.epochs and os.path.exists(os.path.join(run_dir, cls.final_file)):
            return f"the run has finished its {args.epochs} epochs"
        return None

    # ------------------------------------------------------------------------------------- what differs
    def build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_step(self, x, y, epoch: int, lr: float, check: Callable[[float, str], None]):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self) -> Dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_setup(self) -> None:
        pass

    def before_epoch(self, epoch: int) -> Dict[str, Any]:
        return {}

    def after_epoch(self, epoch: int, row: Dict[str, Any]) -> bool:
        return False

    def write_epoch(self, row: Dict[str, Any]) -> Dict[str, Any]:
        return {}

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, ckpt: Dict[str, Any], explicit: set) -> None:
        pass

    def finish(self, tracker: Tracker) -> None:
        pass

    def epoch_line(self, row: Dict[str, Any]) -> str:
        return f"epoch {row['epoch']}/{self.args.epochs}"

    def autocast(self):
        """The mixed-precision context of one forward and its loss (`--amp`; a no-op context without it)."""
        return utils.autocast(self.device, self.args.amp)

    def loss_weights(self) -> Dict[str, float]:
        """The loss weights of the flags (`--*_weight` -> value), named by the non-finite check when extreme."""
        return {k: float(v) for k, v in vars(self.args).items() if k.endswith("_weight") and
                isinstance(v, (int, float)) and not isinstance(v, bool)}

    def checked_tensors(self) -> List[torch.Tensor]:
        """What every torchrun rank must hold identically after an epoch."""
        return list(self.model.parameters())

    # ---------------------------------------------------------------------------------------- checkpoint
    def state(self, epoch: int, rng: Dict[str, Any]) -> Dict[str, Any]:
        return {"epoch": epoch, "args": vars(self.args), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng, "best_valid_acc": self.best_valid_acc, "wandb_id": self.wandb_id,
                "wall_s": self.wall_s, "stopped_early": self.stopped_early, **self.extra_state()}

    def restore(self, ckpt: Dict[str, Any], explicit: set) -> None:
        self.load_extra_state(ckpt, explicit)
        where = f"--resume {self.run_dir}"
        for name in ("model", "optimizer", "scheduler"):
            runs.load_state(getattr(self, name), runs.field(ckpt, name, dict), f"{where}: the {name}")
        runs.override_schedule(self.optimizer, self.scheduler, self.args, explicit)
        self.pending_rng = runs.field(ckpt, "rng", dict)  # applied when the epochs start, after every set-up
        self.start_epoch = ckpt["epoch"] + 1
        self.best_valid_acc = float(runs.field(ckpt, "best_valid_acc", (float, int)))
        self.wall_s = float(runs.field(ckpt, "wall_s", (float, int), 0.0))
        self.wandb_id = runs.field(ckpt, "wandb_id", (str, type(None)), None)

    # ------------------------------------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int, lr: float, control: RunControl) -> Dict[str, float]:
        """One pass over the training queue with `train_step`; loss and accuracy averaged over every rank.

        Nothing is read to the host inside a step: loss and accuracy sums and the non-finite checks stay on the
        device and are read every `--report_freq` steps and at the end (one sync each time), so a GPU never waits
        for the host. A non-finite value stops the run at the next read (the checkpoint is only written after an
        epoch, so it is still the last good one)."""
        from tqdm import tqdm
        self.model.train()
        distributed.set_epoch([self.train_queue], epoch)
        meter, flags = utils.DeviceMeter(["loss", "acc"]), utils.FiniteFlags()
        bar = tqdm(self.train_queue, desc=f"{self.script} {epoch + 1}/{self.args.epochs}", leave=False,
                   dynamic_ncols=True, disable=None)
        every = getattr(self.args, "report_freq", None) or 50
        first = 0

        def read(step: int) -> None:
            bad = flags.bad()
            if bad is not None:
                what, value = bad
                span = f"{what} in steps {first}-{step}" if step > first else what
                control.check_finite(value, span, epoch, step)
            avg = meter.read()
            bar.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['acc']:.1f}")

        step = -1
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits, loss = self.train_step(x, y, epoch, lr, flags.check)
            hits = utils.correct_counts(logits.detach(), y)[0]
            meter.add(torch.stack([loss.detach().to(torch.float64), hits.to(torch.float64) * 100.0 / y.size(0)]),
                      y.size(0))
            if step == 0 or (step + 1) % every == 0:  # step 0 too: a damaged checkpoint is named at once
                read(step)
                first = step + 1
            if control.stop_requested:
                break
        if step >= first:
            read(step)
        avg = meter.read()
        return distributed.average_metrics({"train_loss": avg["loss"], "train_acc": avg["acc"]}, meter.n)

    @torch.no_grad()
    def evaluate_queue(self, queue, prefix: str) -> Tuple[Dict[str, float], Any]:
        """Loss and accuracy (top-5 too beyond 10 classes) over `queue`, summed on the device and read once; also
        the network's second output of the last batch (the supernet's expected energy)."""
        self.model.eval()
        topk = (1, 5) if self.info.num_classes > 10 else (1,)
        meter = utils.DeviceMeter(["loss"] + [f"top{k}" for k in topk])
        second = None
        for x, y in queue:
            if self.control is not None and self.control.stop_requested:
                raise _EvaluationStopped  # a signal: `run` stops without this epoch's row
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                logits, second = self.model(x)
                loss = torch.nn.functional.cross_entropy(logits, y).to(torch.float64)
            hits = utils.correct_counts(logits, y, topk).to(torch.float64) * 100.0 / y.size(0)
            meter.add(torch.cat([loss.reshape(1), hits]), y.size(0))
        avg = meter.read()
        out = {f"{prefix}_loss": avg["loss"], f"{prefix}_acc": avg["top1"]}
        if self.info.num_classes > 10:
            out[f"{prefix}_acc_top5"] = avg["top5"]
        return distributed.average_metrics(out, meter.n), second

    def run(self, tracker: Tracker, control: RunControl) -> Dict[str, Any]:
        """The epochs from `start_epoch`; every epoch ends with its metrics row, files and checkpoint."""
        a = self.args
        if self.pending_rng is not None:
            utils.set_rng_state(self.pending_rng, self.device)
        control.context = {"weights": self.loss_weights(), "start_epoch": self.start_epoch,
                           "resumed": self.ckpt["path"] if self.ckpt else None, "learning_rate": a.learning_rate,
                           "rate_changed": bool(self.explicit & {"learning_rate", "arch_learning_rate"})}
        control.in_epochs = True  # from here a signal stops after the current step, the checkpoint whole
        self.control = control
        for epoch in range(self.start_epoch, a.epochs):
            t0 = time.time()
            lr = self.optimizer.param_groups[0]["lr"]  # read before scheduler.step(): no off-by-one epoch
            row: Dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **self.before_epoch(epoch)}
            if not control.stop_requested:  # a signal during the last epoch's files: no step of this one
                row.update(self.train_epoch(epoch, lr, control))  # --amp: autocast around each forward (train_step)
            if not control.stop_requested:
                distributed.check_same(self.checked_tensors(), "the weights")  # torchrun: ranks must agree
                try:
                    row.update(self.evaluate())
                except _EvaluationStopped:
                    pass
            if control.stop_requested:  # (evaluation breaks off too): this epoch leaves no row, no checkpoint
                self.log.info(runs.stopped_message(control.signal_name, epoch, self.run_dir))
                return {"stopped": True}
            self.scheduler.step()
            self.stopped_early = self.after_epoch(epoch, row)
            row["epoch_s"] = time.time() - t0
            self.wall_s += row["epoch_s"]
            rng = utils.rng_state(self.device)  # torchrun: every rank's streams (a collective), saved by rank 0
            if distributed.is_main():  # torchrun: only rank 0 writes files
                utils.append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), row)
                tracker.log({**row, **self.write_epoch(row)}, step=epoch + 1)
                runs.save_checkpoint(os.path.join(self.run_dir, "checkpoint.pt"), self.script, self.state(epoch, rng))
            self.log.info(self.epoch_line(row))
            if self.stopped_early:
                break
        return {"stopped": False}


def launch(cls, args: argparse.Namespace, explicit: set, ckpt: Optional[Dict[str, Any]]) -> int:
    """Run `cls` (an EpochRunner) in its own run folder: set-up, epochs, `finish`; returns the exit status
    (128 + signal when stopped by one). A resumed run with nothing left to do changes nothing."""
    if ckpt is not None:
        done = cls.finished(ckpt, args)
        if done:
            print(f"{ckpt['path']}: {done}; nothing to do")
            return 0
    distributed.init(args.device, args.dist_timeout)  # a no-op without torchrun
    # Signals are caught from the start: a stop during set-up or the first epoch ends cleanly, and the folder goes
    # (only while it holds no checkpoint).
    try:
        return _launch(cls, args, explicit, ckpt)
    except runs.StoppedBySignal as e:
        print(f"{os.path.basename(sys.argv[0]) or cls.script}: stopped by {e} during set-up, before any epoch; "
              f"{runs.on_disk(e)}", file=sys.stderr)
        return 128 + e.signum


def _launch(cls, args: argparse.Namespace, explicit: set, ckpt: Optional[Dict[str, Any]]) -> int:
    with RunControl() as control, runs.RunFolder(args, cls.script, resume=ckpt is not None) as folder:
        log = runs.setup_logging(folder.path, distributed.rank())
        runner = cls(args, folder.path, ckpt, explicit, log)
        if ckpt is not None:
            runs.resume_bookkeeping(log, folder.path, ckpt, args, explicit)
        tracker = runs.start_run(args, folder.path, runner.device, runner.estimator, runner.wandb_id, log)
        runner.wandb_id, runner.tracker = tracker.run_id, tracker
        result = runner.run(tracker, control)
        control.settle()  # the epochs are over (checkpoint whole): later signals of a burst cannot change the outcome
        if result["stopped"]:
            tracker.finish()
            return 128 + control.signal_number
        runner.finish(tracker)
        tracker.finish()
    return 0
