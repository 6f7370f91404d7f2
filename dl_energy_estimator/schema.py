"""The energy-model JSON file: schema validation, canonical form, atomic save. No pickle, no eval."""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

from .defaults import FAMILIES, FEATURES, PARENTS
from .runner import write_text_atomic

FORMAT = 1
#: where the energies came from: the analytical default; NVML / RAPL (files of version 1.0 of this package); Zeus;
#: a counter or power file read by the bundle's runner; latency x stated watts; someone else's table of networks
SOURCES = ("analytical", "nvml", "rapl", "zeus", "counter_file", "power_file", "latency_x_watts", "external")
META_KEYS = ("device", "driver", "torch", "dtype", "batch_size", "source", "date")
MAX_BYTES = 4 << 20   # an energy model is a few kB (a few hundred with a calibration's held-out items)
MAX_DEPTH = 32        # the format nests 5 deep; deeper is a foreign or hostile file
MAX_COEF = 1e3        # joules per MAC, byte or call: far beyond any device

# Types of the keys readers use (report, the project); other keys are free. NUM: a number or null (NaN is
# written as null), INT: an integer, STR: a string; a dict is an object of those keys, [spec] a list of them.
NUM, INT, STR, ANY = "number", "integer", "string", "any"
_ROW = {"family": STR, "n": INT, "measured_mj": NUM, "predicted_mj": NUM, "cv_median_rel_error": NUM}
_ITEM = {"name": STR, "family": STR, "measured_mj": NUM, "predicted_mj": NUM}
_CAND = {"name": STR, "structure": STR, "intercept": "boolean", "ridge": NUM, "cv_spearman": NUM,
         "cv_median_rel_error": NUM, "gain": NUM, "gain_sd": NUM, "rel_gain": NUM, "rel_gain_sd": NUM}
META_SPEC = {"device": STR, "driver": STR, "torch": STR, "dtype": STR, "source": STR, "date": STR, "name": STR,
             "idle_w": NUM, "watts": NUM}
FIT_SPEC = {"n_samples": INT, "global_scale": NUM, "ridge": NUM, "median_rel_error": NUM, "prior": STR,
            "method": STR, "chosen": STR, "structure": STR, "intercept_mj": NUM, "seed": INT, "cv_folds": INT,
            "cv_repeats": INT, "tie": NUM, "z": NUM, "z_in": NUM, "cv_spearman": NUM, "cv_median_rel_error": NUM,
            "n_train": INT, "n_grid": INT, "grid": STR, "multipliers": {ANY: [NUM]}, "table": [_ROW],
            "heldout": {"n": INT, "spearman": NUM, "spearman_macs_only": NUM, "median_rel_error": NUM,
                        "items": [_ITEM]},
            "candidates": [_CAND], "measurement": {ANY: ANY}, "spearman_in_sample": NUM, "spearman_default": NUM}


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
    for fam, parent in PARENTS.items():  # a file of version 1.0: the split-off families price as their parent
        if fam not in coef and isinstance(coef.get(parent), dict):
            coef[fam] = dict(coef[parent])
    for fam in FAMILIES:
        if fam not in coef:
            fail(f"missing coefficients for layer family '{fam}'")
    for fam, c in coef.items():
        if fam not in FAMILIES:
            fail(f"unknown layer family '{fam}' in coefficients")
        if not isinstance(c, dict) or set(c) != set(FEATURES):
            fail(f"coefficients['{fam}'] must have exactly the keys {list(FEATURES)}")
        for k, v in c.items():
            if not _is(v, NUM) or v is None:
                fail(f"coefficients['{fam}']['{k}'] must be a finite number, got {_short(v)}")
            if v < 0:
                fail(f"coefficients['{fam}']['{k}'] is negative ({v!r})")
            if v > MAX_COEF:
                fail(f"coefficients['{fam}']['{k}'] = {v!r} J per unit is not physical (at most {MAX_COEF:g})")
    meta = doc["meta"]
    if not isinstance(meta, dict):
        fail("'meta' must be an object")
    for k in META_KEYS:
        if k not in meta:
            fail(f"missing key 'meta.{k}'")
    bs = meta["batch_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or not 1 <= bs < 2 ** 31:
        fail(f"meta.batch_size must be a positive integer below 2^31, got {_short(bs)}")
    check_types(meta, META_SPEC, "meta", fail)
    if meta["source"] not in SOURCES:
        fail(f"meta.source must be one of {list(SOURCES)}, got {_short(meta['source'])}")
    if not isinstance(doc["fit"], dict):
        fail("'fit' must be an object")
    check_types(doc["fit"], FIT_SPEC, "fit", fail)
    return doc


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is(v: Any, t: str) -> bool:
    if t == ANY:
        return True
    if t == NUM:  # null, or a number a float holds (our writer turns NaN into null, and writes no infinity)
        if v is None:
            return True
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        try:
            return math.isfinite(float(v))
        except OverflowError:
            return False
    if t == INT:
        return isinstance(v, int) and not isinstance(v, bool)
    if t == STR:
        return isinstance(v, str)
    return isinstance(v, bool)  # "boolean"


def check_types(value: Any, spec: Any, where: str, fail) -> None:
    """Check ``value`` against ``spec`` (see FIT_SPEC); ``fail(msg)`` names the first wrong field."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            fail(f"{where} must be an object, got {type(value).__name__}")
        for k, v in value.items():
            sub = spec.get(k, spec.get(ANY))
            if sub is not None:
                check_types(v, sub, f"{where}.{k}", fail)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            fail(f"{where} must be a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            check_types(v, spec[0], f"{where}[{i}]", fail)
    elif not _is(value, spec):
        fail(f"{where} must be {'a' if spec != INT else 'an'} {spec}, got {_short(value)}")


def canonical(doc: dict) -> str:
    """Canonical JSON text (sorted keys, no whitespace); hashed by :func:`sha256`."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256(doc: dict) -> str:
    return hashlib.sha256(canonical(doc).encode()).hexdigest()


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (iterative: a deep document must not overflow the stack here either)."""
    best, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            best = max(best, d)
            if d <= MAX_DEPTH:
                stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return best


def read_json(path: str | os.PathLike, what: str, error: type = ValueError, max_bytes: int = MAX_BYTES) -> Any:
    """Parse a JSON file; any unreadable, oversized, non-standard or too deeply nested file raises ``error``
    with one line naming the file (``what``: what the file should be)."""
    where = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):  # a folder, a device or a pipe (open would block)
        raise error(f"{where}: not a regular file: not {what}")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise error(f"{where}: larger than {max_bytes >> 20} MiB: not {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{where}: not a UTF-8 text file") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels: not {what}") from None
    except ValueError as e:  # also numbers too long for Python's int conversion
        raise error(f"{where}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if depth(doc) > MAX_DEPTH:
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels: not {what}")
    return doc


def read(path: str | os.PathLike) -> dict:
    """Read and validate an energy-model file; EnergyModelError (one line naming file and field) otherwise."""
    return validate(read_json(path, "an energy model", EnergyModelError), os.fspath(path))


def write_atomic(path: str | os.PathLike, doc: dict) -> None:
    """Write JSON to a temp file in the same folder, fsync, then os.replace (never a half-written file)."""
    write_text_atomic(os.fspath(path), json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n")
