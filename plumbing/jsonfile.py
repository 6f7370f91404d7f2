"""The one reader of JSON files a user or an earlier run hands in (genotypes, args.json, alphas.json,
metrics.jsonl, summaries): bounded size and nesting, no NaN/Infinity constants or absurd numbers, and typed access
to fields, each failure one CLIError naming the file and the field. Imports only the CLI's leaf module."""
from __future__ import annotations

import json
import math
import os
from typing import Any, List, Sequence

from plumbing.cliargs import CLIError

MAX_BYTES = 64 << 20  # far above any file the project writes (alphas.json of a 600-epoch search: ~2 MB)
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 64
_MISSING = object()


class JSONFileError(CLIError, ValueError):
    """A file that is missing, unreadable, not JSON, or of the wrong shape; the message names file and field."""


def _number(text: str, cast):
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number of {len(text)} characters")
    value = cast(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} overflows")
    return value


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of `obj`, stopping (and returning) as soon as it passes `limit`."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        value, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value)
    return deepest


def parse(text: str, what: str) -> Any:
    """JSON text to a value, with the bounds of this module; `what` names the source in errors."""
    try:
        value = json.loads(text, parse_int=lambda t: _number(t, int), parse_float=lambda t: _number(t, float),
                           parse_constant=_constant)
    except RecursionError:
        raise JSONFileError(f"{what}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise JSONFileError(f"{what} is not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise JSONFileError(f"{what}: nested more than {MAX_DEPTH} levels deep")
    return value


def read_text(path: str, what: str, max_bytes: int = MAX_BYTES) -> str:
    """A UTF-8 text file (a byte-order mark, as spreadsheets write one, is dropped) of at most `max_bytes`;
    JSONFileError otherwise."""
    try:
        if os.path.isdir(path):
            raise JSONFileError(f"{what} {path} is a folder, not a file")
        if os.path.exists(path) and not os.path.isfile(path):  # a device or a pipe: reading might never end
            raise JSONFileError(f"{what} {path} is not a regular file")
        size = os.path.getsize(path)
        if size > max_bytes:
            raise JSONFileError(f"{what} {path} is {size / 2 ** 20:.1f} MiB, more than the "
                                f"{max_bytes / 2 ** 20:.1f} MiB this file may have")
        with open(path, encoding="utf-8-sig") as f:
            text = f.read(max_bytes + 1)  # a file still growing stops at the bound too
        if len(text) > max_bytes:
            raise JSONFileError(f"{what} {path} holds more than the {max_bytes / 2 ** 20:.1f} MiB this file may have")
        return text
    except FileNotFoundError:
        raise JSONFileError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise JSONFileError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise JSONFileError(f"{what} {path} cannot be read ({e.strerror})") from None


def read(path: str, what: str, default: Any = _MISSING) -> Any:
    """The JSON value in `path`; `default` if given and the file does not exist."""
    if default is not _MISSING and not os.path.exists(path):
        return default
    return parse(read_text(path, what), f"{what} {path}")


def read_lines(path: str, what: str) -> List[dict]:
    """The objects of a JSON-lines file (metrics.jsonl); a torn last line (a killed writer) is dropped."""
    lines = [line for line in read_text(path, what).splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(expect(parse(line, f"{what} {path} line {i + 1}"), dict, f"{what} {path} line {i + 1}"))
        except JSONFileError:
            if i == len(lines) - 1:
                break
            raise
    return rows


def expect(value: Any, types, where: str) -> Any:
    """`value` if it is one of `types` (a bool is no number here); else a JSONFileError naming `where`."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = "/".join("null" if t is type(None) else {"str": "text", "dict": "an object", "list": "a list",
                                                         "int": "an integer", "float": "a number"}.get(t.__name__,
                                                                                                     t.__name__)
                         for t in types)
        raise JSONFileError(f"{where} should be {names}, found {type(value).__name__}")
    return value


def get(obj: dict, key: str, types, where: str, default: Any = _MISSING) -> Any:
    """`obj[key]` checked with `expect`; `default` when the key is absent (or null) and a default is given."""
    if default is not _MISSING and obj.get(key) is None:
        return default
    if key not in obj:
        raise JSONFileError(f"{where}: missing '{key}'")
    return expect(obj[key], types, f"{where}: '{key}'")


def positive(value: Any, where: str) -> int:
    """A positive integer (sizes, epochs)."""
    if expect(value, int, where) <= 0:
        raise JSONFileError(f"{where} should be positive, found {value}")
    return value


def numbers(values: Sequence[Any], where: str) -> List[float]:
    """A list of finite numbers."""
    return [float(expect(v, (int, float), f"{where}[{i}]")) for i, v in enumerate(expect(values, list, where))]

