"""Measure on the deployment device: export what to measure as plain-torch programs with their traced features, and
read back what the device measured (the runner's measurements.json, or someone else's table of networks).

A bundle folder holds ``manifest.json`` (format 1: the program format, the batch size, and per item its name,
kind, file, input shape and per-sample features ``{family: [MACs, bytes, calls]}``), ``programs/`` (one
``torch.export`` .pt2 or TorchScript .pt file per item) and ``run.py`` (a copy of ``runner.py``: standard library
and torch only). The fit needs no re-tracing: the features travel with the measurements.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .defaults import FAMILIES
from .runner import MAX_BATCH, MAX_JOULES_PER_SAMPLE
from .schema import ANY, INT, NUM, STR, check_types, read_json

FORMAT = 1
PROGRAMS = {"export": ("torch.export", ".pt2"), "torchscript": ("torchscript", ".pt")}
MAX_MEASUREMENTS_BYTES = 64 << 20
MAX_TABLE_COLUMNS = 4096  # a table of measured networks has a few dozen; a million columns is a broken file
MAX_FEATURE = 1e18  # MACs, bytes or calls per sample: a network of 10^18 MACs per image is a damaged file
MEASUREMENTS_SPEC = {"format": INT, "batch_size": INT, "source": STR, "dtype": STR, "date": STR,
                     "device": {"name": STR, "torch": STR, "platform": STR, ANY: ANY},
                     "items": [{"name": STR, "kind": STR, "family": STR, "input_shape": [INT], "features": {ANY: [NUM]},
                                "joules": NUM, "latency_s": NUM, ANY: ANY}]}
#: joules per unit of an energy column; latency units need the device's power (--watts)
ENERGY_UNITS = {"J": 1.0, "mJ": 1e-3, "uJ": 1e-6, "nJ": 1e-9}
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


class BundleError(ValueError):
    """Bad input to export or fit (a file, a column, a row): one line naming it."""


@dataclass
class Item:
    """One thing to measure: a module, its input shape (batch first), and what it is."""
    name: str
    kind: str          # "layer" or "network"
    family: str        # the grid family of a layer, "network" for a network
    module: nn.Module
    shape: tuple[int, ...]
    extra: dict | None = None


class _FirstTensor(nn.Module):
    """Exports need a tensor out; DARTS-style networks return (logits, auxiliary logits or None)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:80] or "item"


def save_program(module: nn.Module, shape: Sequence[int], path: str, program: str) -> None:
    """Write ``module`` (eval mode, fixed input shape) as a torch.export or TorchScript file."""
    wrapped = _FirstTensor(module).eval()
    x = torch.zeros(tuple(shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and trace notices: the files are checked below
        with torch.no_grad():
            if program == "export":
                torch.export.save(torch.export.export(wrapped, (x,)), path)
            else:
                torch.jit.save(torch.jit.trace(wrapped, x, check_trace=False), path)


def export(items: Sequence[Item], out_dir: str, features: Sequence[dict[str, np.ndarray]], program: str = "export",
           batch_size: int = 1, progress: bool = False) -> dict:
    """Write the bundle (programs, manifest.json, run.py) into ``out_dir``; returns the manifest."""
    from .schema import write_atomic
    kind, ext = PROGRAMS[program]
    os.makedirs(os.path.join(out_dir, "programs"), exist_ok=True)
    entries, seen = [], set()
    it = list(zip(items, features))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"exporting ({kind})", unit="item")
    for item, feats in it:
        name = safe_name(item.name)
        k = 1
        while name in seen:
            k += 1
            name = f"{safe_name(item.name)}-{k}"
        seen.add(name)
        rel = f"programs/{name}{ext}"
        try:
            save_program(item.module, item.shape, os.path.join(out_dir, rel), program)
        except Exception as e:  # noqa: BLE001 - exporters raise many types; the user needs the item and the way out
            other = "torchscript" if program == "export" else "export"
            raise BundleError(f"cannot write {item.name} as {kind} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}); try --program {other}") from None
        entries.append({"name": name, "kind": item.kind, "family": item.family, "file": rel,
                        "input_shape": list(item.shape),
                        "features": {f: [float(v) for v in vals] for f, vals in sorted(feats.items())},
                        **({"source": item.extra} if item.extra else {})})
    manifest = {"format": FORMAT, "kind": "bundle", "program": kind, "batch_size": int(batch_size),
                "dtype": "float32", "producer": {"torch": torch.__version__}, "items": entries}
    write_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py"),
                    os.path.join(out_dir, "run.py"))
    return manifest


def _features(obj: Any, where: str) -> dict[str, np.ndarray]:
    out = {}
    for fam, vals in obj.items():
        if fam not in FAMILIES:
            raise BundleError(f"{where}: unknown layer family {fam!r}")
        if len(vals) != 3 or any(v is None or not 0 <= v <= MAX_FEATURE for v in vals):
            raise BundleError(f"{where}.{fam}: must be [MACs, bytes, calls], numbers in [0, {MAX_FEATURE:g}]")
        out[fam] = np.array(vals, dtype=float)
    if not out:
        raise BundleError(f"{where}: no features")
    return out


def read_measurements(path: str) -> tuple[list[dict[str, np.ndarray]], np.ndarray, dict]:
    """(features per item, joules per sample, the file's header) of a runner's measurements.json."""
    doc = read_json(path, "a measurements file", BundleError, MAX_MEASUREMENTS_BYTES)

    def fail(msg: str) -> None:
        raise BundleError(f"{path}: {msg}")

    if not isinstance(doc, dict) or doc.get("kind") != "measurements":
        fail("not a measurements file (written by a bundle's run.py)")
    if doc.get("format") != FORMAT:
        fail(f"unsupported format {doc.get('format')!r} (this version reads {FORMAT})")
    check_types(doc, MEASUREMENTS_SPEC, "measurements", fail)
    for k in ("items", "batch_size", "source", "device"):
        if k not in doc:
            fail(f"missing key {k!r}")
    if not doc["items"]:
        fail("holds no items")
    if not 1 <= doc["batch_size"] <= MAX_BATCH:
        fail(f"batch_size must be an integer in [1, {MAX_BATCH}], got {doc['batch_size']}")
    feats, y = [], []
    for i, it in enumerate(doc["items"]):
        for k in ("features", "joules"):
            if k not in it:
                fail(f"items[{i}] has no {k!r}")
        j = it["joules"]
        if j is None or not j > 0:
            fail(f"items[{i}].joules must be a positive number, got {j!r}")
        if j > MAX_JOULES_PER_SAMPLE:
            fail(f"items[{i}].joules {j:.3g} J per sample is absurd (more than {MAX_JOULES_PER_SAMPLE:g} J); the "
                 f"counter's unit was likely wrong")
        feats.append(_features(it["features"], f"{path}: items[{i}].features"))
        y.append(float(j))
    return feats, np.array(y), doc


def merge_repeats(feats: list[dict[str, np.ndarray]], y: np.ndarray) -> tuple[list, np.ndarray, str | None]:
    """Samples with the same features (one network measured again, or listed twice) are one sample for the fit:
    their median energy. Returns the distinct samples and a one-line note when some were merged (else None)."""
    groups: dict = {}
    for f, v in zip(feats, y):
        key = tuple(sorted((fam, tuple(np.round(vals, 6).tolist())) for fam, vals in f.items()))
        groups.setdefault(key, (f, []))[1].append(float(v))
    if len(groups) == len(feats):
        return feats, y, None
    top = max(len(vs) for _, vs in groups.values())
    note = (f"{len(feats) - len(groups)} of {len(feats)} samples repeat the features of another (the same network "
            f"measured again; up to {top} copies): fitted on {len(groups)} distinct samples, each the median of its "
            f"copies")
    return [f for f, _ in groups.values()], np.array([float(np.median(vs)) for _, vs in groups.values()]), note


def parse_shape(text: str) -> tuple[int, ...]:
    """'3x32x32' -> (3, 32, 32); a leading batch ('1x3x32x32') is dropped (the batch is --batch_size)."""
    try:
        dims = tuple(int(v) for v in str(text).lower().replace(",", "x").split("x") if v.strip())
    except ValueError:
        raise BundleError(f"input shape {text!r} is not like 3x32x32") from None
    if len(dims) == 4:
        dims = dims[1:]
    if len(dims) != 3 or min(dims) < 1:
        raise BundleError(f"input shape {text!r} is not C x H x W with positive sizes")
    return dims


@dataclass
class Row:
    line: int
    arch: Any
    shape: tuple[int, ...]
    joules: float


def read_table(path: str, arch_column: str, column: str, unit: str, watts: float | None,
               shape: tuple[int, ...], shape_column: str = "input_shape", json_arch: bool = False) -> list[Row]:
    """Rows of a CSV of measured networks: the architecture (``json_arch``: JSON text or a name), an optional
    input shape column, and the measured value per sample in ``unit`` (energy; or latency times ``watts``)."""
    if unit in ENERGY_UNITS:
        scale = ENERGY_UNITS[unit]
    elif unit in TIME_UNITS:
        if watts is None:
            raise BundleError(f"--unit {unit} is a latency: give --watts (the device's power while busy)")
        scale = TIME_UNITS[unit] * watts
    else:
        raise BundleError(f"unknown --unit {unit!r}; energy: {', '.join(ENERGY_UNITS)}; latency with --watts: "
                          f"{', '.join(TIME_UNITS)}")
    if os.path.exists(path) and not os.path.isfile(path):  # a folder, a device or a pipe (open would block)
        raise BundleError(f"{path} is not a regular file: not a table of measured networks")
    try:
        if os.path.getsize(path) > MAX_MEASUREMENTS_BYTES * 4:
            raise BundleError(f"{path}: larger than {MAX_MEASUREMENTS_BYTES * 4 >> 20} MiB")
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if len(header) > MAX_TABLE_COLUMNS:
                raise BundleError(f"{path}: {len(header)} columns, more than the {MAX_TABLE_COLUMNS} a table of "
                                  f"measured networks may have")
            for need, flag in ((arch_column, "--arch_column"), (column, "--column")):
                if need not in header:
                    raise BundleError(f"{path}: no column {need!r} ({flag}); columns: {', '.join(header)[:300]}")
            rows = []
            for rec in reader:
                line = reader.line_num
                text = (rec.get(column) or "").strip()
                try:
                    v = float(text)
                except ValueError:
                    raise BundleError(f"{path} line {line}: {column} {text[:40]!r} is not a number") from None
                if not math.isfinite(v) or v <= 0:
                    raise BundleError(f"{path} line {line}: {column} must be a positive number, got {text[:40]!r}")
                if v * scale > MAX_JOULES_PER_SAMPLE:
                    raise BundleError(f"{path} line {line}: {column} {text[:40]} {unit} is {v * scale:.3g} J per "
                                      f"sample, absurd (more than {MAX_JOULES_PER_SAMPLE:g} J); check --unit")
                arch = (rec.get(arch_column) or "").strip()
                if not arch:
                    raise BundleError(f"{path} line {line}: empty {arch_column}")
                if json_arch and arch.startswith("{"):
                    try:
                        arch = json.loads(arch)
                    except ValueError as e:
                        raise BundleError(f"{path} line {line}: {arch_column} is not valid JSON ({e})") from None
                s = shape
                if rec.get(shape_column):
                    s = parse_shape(rec[shape_column])
                rows.append(Row(line, arch, s, v * scale))
    except OSError as e:
        raise BundleError(f"cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BundleError(f"{path} is not a UTF-8 text file") from None
    except csv.Error as e:
        raise BundleError(f"{path} is not a readable CSV ({e})") from None
    if not rows:
        raise BundleError(f"{path} holds no rows")
    return rows
