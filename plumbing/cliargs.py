"""The command line's leaf module: the error every script prints as one line, and argparse's value types.

It imports nothing from the project, so every module may import it (no import circle)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Iterable, NoReturn


class CLIError(Exception):
    """Bad input found after parsing; the scripts print it as one line and exit with status 2."""


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and exit: how the scripts report bad input."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "eadarts"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _typed(cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str):
    def parse(text: str):
        try:
            value = cast(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


# The one table of bounds on numbers from flags and files: (lowest, highest, why the highest). Flags get them
# through `bounded` (argparse types), files (checkpoints, args.json, genotype metadata, tables) through `check`.
LIMITS = {
    "seed": (0, 2 ** 32 - 1, "NumPy's seeds are 32-bit"),
    "batch_size": (1, 2 ** 20, "a training batch beyond a million samples does not fit any device"),
    "energy_batch_size": (1, 2 ** 30, "the energy model's batch size stays below 2^31"),
    "epochs": (1, 100_000, "DARTS trains for 600 epochs"),
    "size": (1, 4096, "channels, layers and image sides beyond 4096 do not fit any device"),
    "workers": (0, 1024, "data-loader workers are processes"),
    "threads": (0, 4096, "CPU threads"),
    "weight": (0.0, 1e4, "the normalized loss terms are ~1: larger weights only overflow the loss"),
    "energy_mj": (0.0, 1e9, "an estimate of a megajoule per image is a damaged file"),
}


def check(kind: str, value: Any, what: str) -> Any:
    """`value` if it lies within `LIMITS[kind]`; else a CLIError naming `what` and the bound."""
    low, high, why = LIMITS[kind]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CLIError(f"{what} = {str(value)[:40]} is not a finite number")
    if not low <= value <= high:
        raise CLIError(f"{what} = {str(value)[:40]} is outside [{_num(low)}, {_num(high)}] ({why})")
    return value


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def bounded(kind: str, cast: Callable[[str], Any] = int, positive: bool = False):
    """argparse type: a number of type `cast` within `LIMITS[kind]` (`positive`: above 0, not at it)."""
    low, high, why = LIMITS[kind]
    what = (f"{'an integer' if cast is int else 'a number'} in {'(0' if positive else f'[{_num(low)}'}, "
            f"{_num(high)}] ({why})")
    return _typed(cast, lambda v: (not isinstance(v, float) or math.isfinite(v)) and low <= v <= high
                  and (v > 0 or not positive), what)


seed_int = bounded("seed")
batch_int = bounded("batch_size")
energy_batch_int = bounded("energy_batch_size")
epochs_int = bounded("epochs")
size_int = bounded("size")
weight_float = bounded("weight", float)
positive_int = _typed(int, lambda v: v > 0, "a positive integer")
nonneg_int = _typed(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _typed(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
nonneg_float = _typed(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
fraction = _typed(float, lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")
unit_float = _typed(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def explicit_flags(argv: Iterable[str]) -> set:
    """Names (dest form) of the long flags given on the command line, to tell them from defaults."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
