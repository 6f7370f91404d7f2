"""The energy-model JSON file: schema validation, canonical form, atomic save. No pickle, no eval."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import Any

from .defaults import FAMILIES, FEATURES

FORMAT = 1
SOURCES = ("analytical", "nvml", "rapl", "latency_x_watts")
META_KEYS = ("device", "driver", "torch", "dtype", "batch_size", "source", "date")


class EnergyModelError(ValueError):
    """An energy-model file is unreadable or does not follow the schema."""


def validate(doc: Any, where: str = "energy model") -> dict:
    """Check ``doc`` against the format-1 schema; raise EnergyModelError with one line naming the problem."""
    def fail(msg: str) -> None:
        raise EnergyModelError(f"{where}: {msg}")

    if not isinstance(doc, dict):
        fail(f"top level must be a JSON object, got {type(doc).__name__}")
    if "format" in doc and (doc["format"] != FORMAT or isinstance(doc["format"], bool)):
        fail(f"unsupported format {doc['format']!r} (this version reads format {FORMAT})")
    for k in ("format", "coefficients", "meta", "fit"):
        if k not in doc:
            fail(f"missing key '{k}'")
    extra = set(doc) - {"format", "coefficients", "meta", "fit"}
    if extra:
        fail(f"unexpected top-level key(s) {sorted(extra)}")
    if doc["format"] != FORMAT or isinstance(doc["format"], bool):
        fail(f"unsupported format {doc['format']!r} (this version reads format {FORMAT})")
    coef = doc["coefficients"]
    if not isinstance(coef, dict):
        fail("'coefficients' must be an object")
    for fam in FAMILIES:
        if fam not in coef:
            fail(f"missing coefficients for layer family '{fam}'")
    for fam, c in coef.items():
        if fam not in FAMILIES:
            fail(f"unknown layer family '{fam}' in coefficients")
        if not isinstance(c, dict) or set(c) != set(FEATURES):
            fail(f"coefficients['{fam}'] must have exactly the keys {list(FEATURES)}")
        for k, v in c.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(f"coefficients['{fam}']['{k}'] must be a finite number, got {v!r}")
            if v < 0:
                fail(f"coefficients['{fam}']['{k}'] is negative ({v!r})")
    meta = doc["meta"]
    if not isinstance(meta, dict):
        fail("'meta' must be an object")
    for k in META_KEYS:
        if k not in meta:
            fail(f"missing key 'meta.{k}'")
    bs = meta["batch_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        fail(f"meta.batch_size must be a positive integer, got {bs!r}")
    if meta["source"] not in SOURCES:
        fail(f"meta.source must be one of {list(SOURCES)}, got {meta['source']!r}")
    if not isinstance(doc["fit"], dict):
        fail("'fit' must be an object")
    return doc


def canonical(doc: dict) -> str:
    """Canonical JSON text (sorted keys, no whitespace); hashed by :func:`sha256`."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256(doc: dict) -> str:
    return hashlib.sha256(canonical(doc).encode()).hexdigest()


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def read(path: str | os.PathLike) -> dict:
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise EnergyModelError(f"{where}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise EnergyModelError(f"{where}: not a UTF-8 text file") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise EnergyModelError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None
    return validate(doc, where)


def write_atomic(path: str | os.PathLike, doc: dict) -> None:
    """Write JSON to a temp file in the same folder, fsync, then os.replace (never a half-written file)."""
    text = json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n"
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".energy_model.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
