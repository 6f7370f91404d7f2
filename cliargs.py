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
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


positive_int = _typed(int, lambda v: v > 0, "a positive integer")
nonneg_int = _typed(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _typed(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
nonneg_float = _typed(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
fraction = _typed(float, lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")
unit_float = _typed(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def explicit_flags(argv: Iterable[str]) -> set:
    """Names (dest form) of the long flags given on the command line, to tell them from defaults."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
