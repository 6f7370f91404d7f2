"""Genotypes: the `Genotype` tuple, named primitive sets, the published cells, and JSON load/save.

A genotype lists, for the normal and the reduction cell, two `(op, input)` pairs per intermediate node: inputs 0
and 1 are the cell's two inputs, 2.. the earlier intermediate nodes. Files are JSON (never `eval`, never pickle).
"""
from __future__ import annotations

import json
from collections import namedtuple
from typing import Any, Dict, List, Optional, Sequence

from operations import OPS
from plumbing.cliargs import check
from plumbing.utils import CLIError, atomic_write_text

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

GENOTYPE_FORMAT = 1

PRIMITIVE_SETS: Dict[str, List[str]] = {
    # The DARTS search space (Liu et al., 2019).
    "darts": ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"],
    # A cheaper, smaller space: 3x3 kernels only (faster search, cheaper cells).
    "cheap": ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"],
    # DARTS plus dense convolutions: a wider energy range for the energy term to trade in.
    "extended": ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                 "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7", "conv_1x1", "conv_3x3"],
}
PRIMITIVES = PRIMITIVE_SETS["darts"]

DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5],
)
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)
PC_DARTS = Genotype(
    normal=[("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
    reduce_concat=[2, 3, 4, 5],
)

NAMED_GENOTYPES: Dict[str, Genotype] = {
    "DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2, "PC_DARTS": PC_DARTS,
}


class GenotypeError(CLIError, ValueError):
    """A genotype (file, name or primitive list) that cannot be used; the message says why."""


def parse_primitives(spec: str) -> List[str]:
    """A primitive set name (`darts`, `cheap`, ...) or a comma list of op names, validated against OPS."""
    if spec in PRIMITIVE_SETS:
        return list(PRIMITIVE_SETS[spec])
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in OPS]
    if not names or unknown:
        raise GenotypeError(
            f"unknown primitive(s) {', '.join(unknown) or repr(spec)}; valid sets: {', '.join(PRIMITIVE_SETS)}; "
            f"valid ops: {', '.join(OPS)}")
    if len(set(names)) != len(names):
        raise GenotypeError(f"primitive list {spec!r} names an op twice")
    if all(n == "none" for n in names):
        raise GenotypeError("the primitive list needs at least one op other than 'none'")
    return names


def named_genotype(name: str) -> Genotype:
    """The published genotype called `name` (looked up, never evaluated)."""
    try:
        return NAMED_GENOTYPES[name]
    except KeyError:
        raise GenotypeError(f"unknown genotype name {name!r}; known: {', '.join(NAMED_GENOTYPES)}") from None


MAX_NODES = 16  # intermediate nodes of a cell (DARTS: 4); far more only makes a network nothing can draw or train


def validate(genotype: Genotype, where: str = "genotype") -> Genotype:
    """Check ops exist and every input index points to an earlier node; returns a normalized Genotype."""
    cells = {}
    for kind in ("normal", "reduce"):
        pairs = getattr(genotype, kind)
        concat = getattr(genotype, f"{kind}_concat")
        if not isinstance(pairs, (list, tuple)) or not pairs or len(pairs) % 2:
            raise GenotypeError(f"{where}: '{kind}' must be a non-empty list of [op, input] pairs, two per node")
        if len(pairs) > 2 * MAX_NODES:
            raise GenotypeError(f"{where}: '{kind}' has {len(pairs)} edges; a cell has at most {MAX_NODES} nodes "
                                f"({2 * MAX_NODES} edges; DARTS's have 4 nodes)")
        clean = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise GenotypeError(f"{where}: {kind}[{i}] must be [op, input], got {pair!r}")
            op, idx = pair
            if not isinstance(op, str) or op not in OPS or op == "none":
                raise GenotypeError(f"{where}: {kind}[{i}] names unknown op {op!r}; valid: "
                                    f"{', '.join(o for o in OPS if o != 'none')}")
            node = i // 2
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < node + 2:
                raise GenotypeError(f"{where}: {kind}[{i}] input {idx!r} out of range for node {node + 2} "
                                    f"(must be 0..{node + 1})")
            clean.append((op, idx))
        steps = len(pairs) // 2
        if (not isinstance(concat, (list, tuple, range)) or not concat
                or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < steps + 2 for c in concat)):
            raise GenotypeError(f"{where}: '{kind}_concat' must list node indices in 0..{steps + 1}")
        if len(set(concat)) != len(concat):
            raise GenotypeError(f"{where}: '{kind}_concat' {list(concat)} repeats a node; list each node once")
        cells[kind] = (clean, list(concat))
    return Genotype(cells["normal"][0], cells["normal"][1], cells["reduce"][0], cells["reduce"][1])


def to_dict(genotype: Genotype, primitives: Optional[Sequence[str]] = None,
            meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The `genotype.json` object (README, "Outputs of a run")."""
    return {
        "format": GENOTYPE_FORMAT,
        "normal": [[op, idx] for op, idx in genotype.normal],
        "normal_concat": list(genotype.normal_concat),
        "reduce": [[op, idx] for op, idx in genotype.reduce],
        "reduce_concat": list(genotype.reduce_concat),
        "primitives": list(primitives) if primitives is not None else None,
        "meta": dict(meta or {}),
    }


def from_dict(data: Any, where: str = "genotype") -> Genotype:
    if not isinstance(data, dict):
        raise GenotypeError(f"{where}: expected a JSON object with 'normal' and 'reduce'")
    if data.get("format", GENOTYPE_FORMAT) != GENOTYPE_FORMAT:
        raise GenotypeError(f"{where}: unsupported format {data.get('format')!r} (this code reads {GENOTYPE_FORMAT})")
    missing = [k for k in ("normal", "normal_concat", "reduce", "reduce_concat") if k not in data]
    if missing:
        raise GenotypeError(f"{where}: missing key(s) {', '.join(missing)}")
    genotype = validate(Genotype(data["normal"], data["normal_concat"], data["reduce"], data["reduce_concat"]), where)
    primitives = data.get("primitives")
    if isinstance(primitives, list) and all(isinstance(p, str) for p in primitives):
        unlisted = sorted({op for op, _ in genotype.normal + genotype.reduce} - set(primitives))
        if unlisted:
            raise GenotypeError(f"{where}: uses {', '.join(unlisted)}, which its 'primitives' {primitives[:10]} do "
                                f"not list; the file is damaged or was edited by hand")
    return genotype


def save(genotype: Genotype, path: str, primitives: Optional[Sequence[str]] = None,
         meta: Optional[Dict[str, Any]] = None) -> None:
    """Write `genotype.json` atomically."""
    atomic_write_text(path, json.dumps(to_dict(genotype, primitives, meta), indent=2) + "\n")


def read_json(path: str) -> Any:
    """The JSON in a genotype file (bounded: `jsonfile`), unvalidated; GenotypeError with a one-line reason."""
    from plumbing import jsonfile
    try:
        return jsonfile.read(path, "genotype file")
    except jsonfile.JSONFileError as e:
        raise GenotypeError(str(e)) from None


def load(path: str) -> Genotype:
    """Read and validate a genotype file; GenotypeError with a one-line reason otherwise."""
    return load_with_meta(path)[0]


# Types of the metadata keys the project reads back (other keys pass through untouched).
META_TYPES = {"dataset": str, "search_run": str, "early_stop": str, "eval_channels": int, "eval_layers": int,
              "seed": int, "epoch": int, "energy_batch_size": int, "energy_mj": (int, float),
              "valid_acc": (int, float), "energy_weight": (int, float), "task_weight": (int, float),
              "energy_budget_mj": (int, float), "guards": dict}


# The metadata numbers the project uses, and their bounds in cliargs.LIMITS.
META_BOUNDS = {"eval_channels": "size", "eval_layers": "size", "energy_batch_size": "energy_batch_size",
               "seed": "seed", "energy_mj": "energy_mj", "energy_weight": "weight", "task_weight": "weight"}


def load_with_meta(path: str):
    """(Genotype, meta) of a genotype file, `meta` holding `primitives` too; every field the project reads is
    type-checked, and a bad file is one GenotypeError naming the file and the field."""
    from plumbing import jsonfile
    where = f"genotype file {path}"
    data = read_json(path)
    try:
        genotype = from_dict(data, where=where)
        meta = jsonfile.get(data, "meta", dict, where, {})
        primitives = jsonfile.get(data, "primitives", list, where, None)
        for i, p in enumerate(primitives or []):
            jsonfile.expect(p, str, f"{where}: primitives[{i}]")
        for key, types in META_TYPES.items():
            if meta.get(key) is not None:
                jsonfile.expect(meta[key], types, f"{where}: meta '{key}'")
        for key, kind in META_BOUNDS.items():
            if meta.get(key) is not None:
                check(kind, meta[key], f"{where}: meta '{key}'")
    except CLIError as e:  # JSONFileError and the bounds' CLIError
        raise GenotypeError(str(e)) from None
    return genotype, {**meta, "primitives": primitives}


def load_meta(path: str) -> Dict[str, Any]:
    """The `meta` and `primitives` of a genotype file, type-checked."""
    return load_with_meta(path)[1]
