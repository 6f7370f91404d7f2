"""Every flag of the two scripts, and their defaults per script, search space and data set in one table.

Script-specific flags are declared in the scripts; a flag whose default depends on the data set is declared with
`default=None` and filled by `resolve_defaults` (a flag given explicitly always wins). CIFAR-10 follows DARTS
exactly (reference: the DARTS paper); `digits` is sized to finish on a laptop CPU in minutes.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence, Tuple

from plumbing import distributed
from plumbing.cliargs import (CLIError, batch_int, bounded, energy_batch_int, epochs_int, fraction, nonneg_float, nonneg_int,
                     positive_float, positive_int, seed_int, size_int, unit_float, weight_float)
from plumbing.datasets import DATASETS, DEFAULT_DATA, RESIZABLE, DataInfo, known_info

DEFAULT_DATASET = "cifar10"  # DARTS's
SPACE_NAMES = ("darts", "nb201")  # the search spaces: --space's choices; spaces.py holds one unit for each

# The MNISTs sit in memory as one tensor (no loader workers); their searches are often CPU-sized (--subset), so
# the alphas' learning rate follows the search's length (None: architect.arch_lr_for_steps, set when the loaders
# exist). CIFAR-10 keeps DARTS's 3e-4.
SMALL_SEARCH = dict(arch_learning_rate=None, workers=0)
SMALL_TRAIN = dict(workers=0)

# (script, space) -> data set -> defaults; "*" holds every data set's, a named data set overrides them. The one
# table of the scripts' defaults, read by `defaults_for` alone.
DARTS_SEARCH: Dict[str, Dict[str, Any]] = {
    "*": dict(batch_size=64, learning_rate=0.025, learning_rate_min=0.001, momentum=0.9, weight_decay=3e-4,
              epochs=50, init_channels=16, layers=8, train_portion=0.5, grad_clip=5.0, arch_learning_rate=3e-4,
              arch_weight_decay=1e-3, workers=2, threads=0, nesterov=False),
    "digits": dict(batch_size=64, learning_rate=0.1, epochs=10, init_channels=8, layers=5,
               arch_learning_rate=3e-3, workers=0),
    **{d: SMALL_SEARCH for d in ("mnist", "fashion_mnist")},
}
DARTS_TRAIN: Dict[str, Dict[str, Any]] = {
    "*": dict(batch_size=96, learning_rate=0.025, momentum=0.9, weight_decay=3e-4, epochs=600, init_channels=36,
              layers=20, drop_path_prob=0.2, grad_clip=5.0, cutout_length=16, auxiliary_weight=0.4, workers=2,
              lr_schedule="cosine", gamma=0.97, label_smoothing=0.0, nesterov=False, threads=0),
    "digits": dict(batch_size=64, learning_rate=0.05, epochs=20, init_channels=16, layers=6, drop_path_prob=0.1,
               cutout_length=3, workers=0, threads=1),
    **{d: SMALL_TRAIN for d in ("mnist", "fashion_mnist")},
    "imagenet": dict(batch_size=128, learning_rate=0.1, epochs=250, init_channels=48, layers=14,
                     drop_path_prob=0.0, weight_decay=3e-5, lr_schedule="exponential", gamma=0.97,
                     label_smoothing=0.1, workers=4),
}
# NB201's protocol (its paper and configs), in the scripts' flag names. `layers` is N, the cells per stage (3N in
# all). NB201 trains without drop path, auxiliary head, cutout or gradient clipping (None: no clipping).
NB201_TRAIN = {
    "*": dict(batch_size=256, learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, epochs=200,
              lr_schedule="cosine", learning_rate_min=0.0, init_channels=16, layers=5, drop_path_prob=0.0,
              auxiliary=False, cutout=False, grad_clip=None, label_smoothing=0.0),
    "digits": dict(batch_size=64, learning_rate=0.05, epochs=20, init_channels=16, layers=2, workers=0, threads=1),
}
# NB201's DARTS baselines (DARTS's optimizers, wd 5e-4 with Nesterov). Digits: sized to search in well under a
# minute on two CPU cores, with one thread (8x8 images gain nothing from more).
NB201_SEARCH = {
    "*": dict(batch_size=64, learning_rate=0.025, learning_rate_min=0.001, momentum=0.9, nesterov=True,
              weight_decay=5e-4, epochs=50, init_channels=16, layers=5, grad_clip=5.0, arch_learning_rate=3e-4,
              arch_weight_decay=1e-3, train_portion=0.5),
    "digits": dict(batch_size=64, learning_rate=0.1, epochs=10, init_channels=8, layers=2, arch_learning_rate=3e-3,
                   workers=0, threads=1),
}


def _over(darts: Dict[str, Dict[str, Any]], space: Dict[str, Dict[str, Any]], small: Dict[str, Any]):
    """A space's table over DARTS's for what it leaves open (workers, threads, ...)."""
    return {"*": {**darts["*"], **space["*"]}, **{d: small for d in ("mnist", "fashion_mnist")},
            **{k: v for k, v in space.items() if k != "*"}}


DEFAULTS: Dict[tuple, Dict[str, Dict[str, Any]]] = {
    ("search", "darts"): DARTS_SEARCH, ("train", "darts"): DARTS_TRAIN,
    ("search", "nb201"): _over(DARTS_SEARCH, NB201_SEARCH, SMALL_SEARCH),
    ("train", "nb201"): _over(DARTS_TRAIN, NB201_TRAIN, SMALL_TRAIN),
}


def defaults_for(script: str, dataset: str, space: str = "darts") -> Dict[str, Any]:
    """The defaults of `script` ("search" or "train") for `dataset` in `space`."""
    table = DEFAULTS[(script, space)]
    return {**table["*"], **table.get(dataset, {})}


def resolve_defaults(args: argparse.Namespace, script: str) -> None:
    """Fill the declared flags left at None from `defaults_for` (the one place a script's defaults are decided);
    check the common flags whose validity depends on the data set."""
    if getattr(args, "image_size", None) and args.dataset not in RESIZABLE:
        raise CLIError(f"--image_size applies to {', '.join(RESIZABLE)}; {args.dataset} has a fixed size")
    if script == "search" and args.dataset == "imagenet":
        raise CLIError("search on --dataset imagenet is not supported (DARTS transfers a CIFAR cell); "
                       "use imagefolder with small images")
    for key, value in defaults_for(script, args.dataset, args.space).items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)


def evaluation_network(meta: Dict[str, Any], dataset: Optional[str] = None, channels: Optional[int] = None,
                       layers: Optional[int] = None, space: str = "darts") -> Tuple[str, DataInfo, int, int]:
    """(data set, its shape, width, depth) of the network train.py builds for a genotype: flags first, then the
    genotype's metadata, then train.py's defaults for the data set. A user's image folder, whose shape only its
    files know, is taken as CIFAR-sized RGB with 10 classes (--image_size's default); a search's --image_size
    is the genotype's `image_size`."""
    dataset = dataset or meta.get("dataset") or DEFAULT_DATASET
    table = defaults_for("train", dataset, space)
    return (dataset, known_info(dataset, meta.get("image_size")) or DataInfo(3, 10, meta.get("image_size") or 32),
            channels or meta.get("eval_channels")
            or table["init_channels"], layers or meta.get("eval_layers") or table["layers"])


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags both scripts share (names as in DARTS where DARTS has one)."""
    p.add_argument("--space", default="darts", choices=SPACE_NAMES,
                   help="search space: DARTS's cells, or NAS-Bench-201's (README, \"NAS-Bench-201\")")
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted(DATASETS),
                   help="data set (default DARTS's cifar10; digits ships with scikit-learn and works offline)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="folder of the data set (downloaded there when online); fashion_mnist: also Debian's "
                        "dataset-fashion-mnist package, found under the default")
    p.add_argument("--image_size", type=size_int, default=None,
                   help="side of the square input: mnist/fashion_mnist resized once at load (default 28), "
                        "imagenet/imagefolder (default 224 / 32)")
    p.add_argument("--subset", type=positive_int, default=None,
                   help="train on a stratified subset of N images of the training split (CPU-sized studies)")
    p.add_argument("--subset_seed", type=nonneg_int, default=0, help="seed of --subset's draw")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--gpu", type=nonneg_int, default=0, help="CUDA device index")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--log_dir", default="./log", help="runs go to <log_dir>/<run_name>/")
    p.add_argument("--run_name", default=None, help="a plain name; default <script>-<dataset>-<timestamp>")
    p.add_argument("--wandb", default=None, choices=["offline", "online", "disabled"],
                   help="default: online if a wandb API key is configured, else offline")
    p.add_argument("--energy_model", default=None,
                   help="energy-model JSON from `python -m dl_energy_estimator calibrate` (default: analytical)")
    p.add_argument("--energy_batch_size", type=energy_batch_int, default=None,
                   help="deployment batch size of the energy estimates (default: the energy model's, 1)")
    p.add_argument("--workers", type=bounded("workers"), default=None, help="data-loader workers (default 0 for digits)")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder to continue")
    distributed.add_args(p)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """Flags that trade reproducibility or start-up time for speed (bench/README.md has the measurements)."""
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast around each forward and loss (the weights stay fp32; the unrolled step and "
                        "the energy estimates run in fp32): faster on GPUs, results not bitwise reproducible")
    p.add_argument("--deterministic", choices=["auto", "on", "off"], default="auto",
                   help="deterministic cuDNN kernels; auto = on for CPU runs (bitwise reproducible), off on CUDA "
                        "(cudnn.benchmark picks the fastest kernels)")
    p.add_argument("--threads", type=bounded("threads"), default=None,
                   help="CPU threads of torch (0: the cores this process may use, less the machine's load, so a "
                        "busy machine is not oversubscribed; digits trains with 1: 8x8 images gain nothing from more)")
    p.add_argument("--report_freq", type=positive_int, default=50,
                   help="steps between reads of the running loss and accuracy (and the non-finite checks) from the "
                        "device: a read stalls the GPU, so a step reads nothing")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every cell (inductor; minutes of compiling first); pays on GPUs, not on "
                        "small CPUs")
    p.add_argument("--channels_last", choices=["auto", "on", "off"], default="auto",
                   help="memory layout of the network: auto = channels_last on CPUs and with --amp on CUDA "
                        "(layout.py)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The weights' optimization and the network's size (DARTS's names); defaults from `DEFAULTS`."""
    p.add_argument("--batch_size", type=batch_int)
    p.add_argument("--learning_rate", type=positive_float)
    p.add_argument("--momentum", type=unit_float)
    p.add_argument("--weight_decay", type=nonneg_float)
    p.add_argument("--epochs", type=epochs_int)
    p.add_argument("--init_channels", type=size_int)
    p.add_argument("--layers", type=size_int)
    p.add_argument("--grad_clip", type=positive_float)
    p.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (NB201's protocols)")


def search_parser(primitive_sets: Sequence[str] = ()) -> argparse.ArgumentParser:
    """train_search.py's flags (`primitive_sets`: the named sets, for the help)."""
    p = argparse.ArgumentParser(allow_abbrev=False, description="Energy-aware DARTS search (defaults: DARTS's CIFAR-10 settings; "
                                            "digits has small defaults of its own).")
    add_common_args(p)
    add_training_args(p)
    p.add_argument("--primitives", default=None,
                   help=f"candidate ops: a set ({', '.join(primitive_sets)}; nb201 for --space nb201) or a comma "
                        f"list of op names (default: the space's own set)")
    p.add_argument("--benchmark", default=None,
                   help="--space nb201: a CSV with an arch_str column (NAS-Bench-201, HW-NAS-Bench); each epoch the "
                        "derived cell's row goes to metrics.jsonl as bench_<column>")
    p.add_argument("--task_weight", type=weight_float, default=0.9, help="weight of the normalized task loss")
    p.add_argument("--energy_weight", type=weight_float, default=0.05,
                   help="weight of the normalized expected energy (0 = plain DARTS)")
    p.add_argument("--learning_rate_min", type=nonneg_float)
    p.add_argument("--train_portion", type=fraction)
    p.add_argument("--arch_learning_rate", type=positive_float)
    p.add_argument("--arch_weight_decay", type=nonneg_float)
    p.add_argument("--unrolled", action="store_true", help="second-order (unrolled) architecture step")
    add_speed_args(p)
    p.add_argument("--partial_channels", type=positive_int, default=1,
                   help="PC-DARTS: each edge computes 1/K of the channels (1 = plain DARTS)")
    p.add_argument("--eval_channels", type=size_int, default=None,
                   help="width of the network whose energy is reported (default: train.py's for the data set)")
    p.add_argument("--eval_layers", type=size_int, default=None,
                   help="depth of the network whose energy is reported (default: train.py's for the data set)")
    add_collapse_args(p)
    return p


def train_parser(named_genotypes: Sequence[str] = ()) -> argparse.ArgumentParser:
    """train.py's flags (`named_genotypes`: the names --arch takes, for the help)."""
    p = argparse.ArgumentParser(allow_abbrev=False, description="Train a searched cell from scratch (defaults: DARTS's CIFAR-10 "
                                            "protocol; digits and imagenet have defaults of their own).")
    add_common_args(p)
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--genotype", help="genotype.json written by train_search.py (--space nb201: or an arch "
                                         "string)")
    arch.add_argument("--arch", help=f"a named genotype: {', '.join(named_genotypes)}")
    add_training_args(p)
    p.add_argument("--auxiliary", action="store_true", help="auxiliary tower at 2/3 depth")
    p.add_argument("--auxiliary_weight", type=weight_float)
    p.add_argument("--cutout", action="store_true", help="cutout augmentation")
    p.add_argument("--cutout_length", type=positive_int)
    p.add_argument("--drop_path_prob", type=unit_float)
    p.add_argument("--label_smoothing", type=unit_float)
    p.add_argument("--lr_schedule", choices=["cosine", "exponential"], default=None,
                   help="cosine annealing over --epochs, or x --gamma per epoch (DARTS's ImageNet protocol)")
    p.add_argument("--gamma", type=positive_float, default=None, help="with --lr_schedule exponential: decay per epoch")
    add_speed_args(p)
    p.add_argument("--valid_portion", type=fraction, default=None,
                   help="hold out this part of the training split to choose the best checkpoint")
    p.add_argument("--report", action="store_true", help="print params, MACs and energy, then exit")
    p.add_argument("--json", default=None, help="with --report: also write the report as JSON here")
    p.add_argument("--force", action="store_true", help="with --json: overwrite an existing file (never one of a "
                                                        "run folder)")
    p.add_argument("--measure_energy", action="store_true",
                   help="with --report: measure the real inference energy on this device beside the estimate")
    p.add_argument("--weights", default=None, help="with --measure_energy: weights to load (a weights .pt)")
    p.add_argument("--watts", type=positive_float, default=None,
                   help="with --measure_energy and no energy counter: the device's power draw in W")
    return p


def add_collapse_args(p: argparse.ArgumentParser) -> None:
    """Flags against skip/pool collapse (README, "Avoiding collapse"); all off by default (plain DARTS)."""
    g = p.add_argument_group("collapse guards and energy budget")
    g.add_argument("--warmup_epochs", type=nonneg_int, default=0,
                   help="train the weights only (alphas frozen) for the first N epochs (PC-DARTS)")
    g.add_argument("--energy_ramp_epochs", type=nonneg_int, default=0,
                   help="after the warm-up, ramp the energy weight in linearly over M epochs")
    g.add_argument("--max_skip", type=nonneg_int, default=None,
                   help="cap skip_connects in the derived normal cell (P-DARTS: 2)")
    g.add_argument("--min_parametric", type=nonneg_int, default=None,
                   help="at least K parametric ops in the derived normal cell (default 2 with --max_skip, else 0)")
    g.add_argument("--early_stop", action="store_true",
                   help="DARTS+: stop when the unguarded normal cell holds >2 skips for 2 epochs (or --patience)")
    g.add_argument("--patience", type=positive_int, default=None,
                   help="with --early_stop: also stop when the ranking of ops is stable for N epochs")
    g.add_argument("--energy_budget", type=positive_float, default=None,
                   help="mJ per image of the derived network: adaptive penalty on energy above it (replaces "
                        "--energy_weight); the written cell is projected to within 5 %% under it")
    g.add_argument("--budget_rate", type=positive_float, default=0.02,
                   help="step of the budget's Lagrange multiplier per architecture step")
