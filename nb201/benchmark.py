"""Measured metrics of NAS-Bench-201 cells from a benchmark table: a CSV with an `arch_str` column in NB201's
notation plus any metric columns (as users export them from NAS-Bench-201 or HW-NAS-Bench). Look up a derived
cell's row for metrics.jsonl (`bench_` keys), wandb and the genotype's meta, and plot a sweep's cells over the
whole table's cloud. Every problem with a table is a `BenchmarkError` (a CLIError) naming the file and what is
wrong.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

from plumbing.cliargs import CLIError
from genotypes import GenotypeError
from plumbing import jsonfile
from nb201 import space as nb201

ARCH_COLUMN = "arch_str"
MAX_COLUMNS = 4096  # HW-NAS-Bench's widest export has a few dozen; a million columns is a broken file
MAX_CELLS = 20_000_000  # rows x columns: bounds the time a load takes (seconds), whatever the file's shape
NON_NEGATIVE = re.compile(r"energy|latency|time|flops|macs|param|power|acc|_mj|_ms", re.IGNORECASE)
MAX_BYTES = 256 * 2 ** 20  # NB201's full table with every metric is a few tens of MB
Value = Union[int, float, str, None]
_INT = re.compile(r"[+-]?[0-9]+")


class BenchmarkError(CLIError):
    """A benchmark table that cannot be used, or a look-up it cannot answer; the message names the file."""


def parse_value(text: str) -> Value:
    """A cell of the table: int or float where it parses (non-finite numbers and blanks are None), else the text."""
    t = text.strip()
    if not t:
        return None
    if _INT.fullmatch(t):
        return int(t)
    try:
        v = float(t)
    except ValueError:
        return t
    return v if math.isfinite(v) else None


def normalize_arch(arch: nb201.ArchLike, where: str = "arch") -> str:
    """The canonical NB201 arch string (blanks stripped, each node's inputs in order); GenotypeError if malformed."""
    return nb201.format_arch(nb201.as_arch(arch, where))


class BenchmarkTable:
    """Rows of a benchmark CSV by canonical arch string; `columns` are the metric columns in file order."""

    def __init__(self, path: str, columns: List[str], rows: Dict[str, Dict[str, Value]]) -> None:
        self.path, self.columns, self.rows = path, columns, rows

    def __len__(self) -> int:
        return len(self.rows)

    def error(self, message: str) -> BenchmarkError:
        flat = "".join(c if c.isprintable() else " " for c in message)  # a quoted field may hold a line break
        return BenchmarkError(f"benchmark table {self.path}: {flat}")

    def check_columns(self, columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise self.error(f"no column {', '.join(map(repr, missing))}; it has {', '.join(self.columns)}")

    def lookup(self, arch: nb201.ArchLike, columns: Optional[Sequence[str]] = None) -> Dict[str, Value]:
        """The row of `arch` (string or ops), all columns or those named."""
        columns = list(self.columns if columns is None else columns)
        self.check_columns(columns)
        key = normalize_arch(arch)
        if key not in self.rows:
            raise self.error(f"no row for arch {key}")
        return {c: self.rows[key][c] for c in columns}

    def metrics(self, arch: nb201.ArchLike, columns: Optional[Sequence[str]] = None,
                prefix: str = "bench_") -> Dict[str, Value]:
        """`lookup` with keys prefixed, for metrics.jsonl, wandb and the genotype's meta."""
        return {prefix + c: v for c, v in self.lookup(arch, columns).items()}

    def numbers(self, arch: str, x: str, y: str) -> Optional[Tuple[float, float]]:
        row = self.rows[arch]
        ok = all(isinstance(row[c], (int, float)) for c in (x, y))
        return (float(row[x]), float(row[y])) if ok else None

    def cloud(self, x: str, y: str) -> List[Tuple[float, float]]:
        """(x, y) of every row where both columns are numbers."""
        self.check_columns([x, y])
        points = [p for p in (self.numbers(a, x, y) for a in self.rows) if p is not None]
        if not points:
            raise self.error(f"columns {x!r} and {y!r} hold no row of numbers")
        return points


def _read_text(path: str, max_bytes: int) -> str:
    try:
        return jsonfile.read_text(path, "benchmark table", max_bytes)
    except jsonfile.JSONFileError as e:
        raise BenchmarkError(str(e)) from None


def _header(table: BenchmarkTable, header: List[str], arch_column: str) -> int:
    if len(header) > MAX_COLUMNS:
        raise table.error(f"has {len(header)} columns, more than the {MAX_COLUMNS} a benchmark table may have")
    names = [h.strip() for h in header]
    if arch_column not in names:
        raise table.error(f"no {arch_column!r} column (columns: {', '.join(names)[:300] or 'none'})")
    counts = Counter(names)
    dupes = sorted(n for n, k in counts.items() if k > 1)
    if dupes or "" in names:
        raise table.error(f"column names must be distinct and non-empty ({', '.join(map(repr, dupes or ['']))})")
    table.columns = [n for n in names if n != arch_column]
    return names.index(arch_column)


def _add_row(table: BenchmarkTable, line: int, fields: List[str], at: int, names: List[str], seen: Dict[str, int]):
    try:
        key = normalize_arch(fields[at].strip(), "arch_str")
    except GenotypeError as e:
        raise table.error(f"line {line}: {e}") from None
    row = {n: parse_value(v) for n, v in zip(names, fields) if n is not None}
    _check_values(table, line, row)
    old = table.rows.get(key)
    if old is not None and old != row:
        col = next(c for c in table.columns if old[c] != row[c])
        raise table.error(f"line {line} repeats the arch of line {seen[key]} with another {col!r} "
                          f"({row[col]!r} vs {old[col]!r})")
    table.rows.setdefault(key, row)
    seen.setdefault(key, line)


def _check_values(table: BenchmarkTable, line: int, row: Dict[str, Value]) -> None:
    """A column holds numbers or text, not both (text in a numeric column is a broken export, not a metric), and
    a measured quantity (energy, latency, FLOPs, parameters, accuracy) is never negative."""
    kinds = table.__dict__.setdefault("kinds", {})
    for column, value in row.items():
        if value is None:
            continue
        kind = "text" if isinstance(value, str) else "number"
        first = kinds.setdefault(column, (kind, line, value))
        if first[0] != kind:
            where, text = (line, value) if kind == "text" else first[1:]
            raise table.error(f"column {column!r} holds numbers, but line {where} holds the text {str(text)[:40]!r}; "
                              f"make it a number or leave it blank")
        if kind == "number" and value < 0 and NON_NEGATIVE.search(column):
            raise table.error(f"line {line}: {column} is {value}, a measured quantity cannot be negative")


def load_table(path: str, arch_column: str = ARCH_COLUMN, max_bytes: int = MAX_BYTES) -> BenchmarkTable:
    """Read and check a benchmark CSV: an `arch_column` of NB201 arch strings, metric columns, one row per arch
    (exact repeats are tolerated, conflicting ones are not)."""
    table = BenchmarkTable(path, [], {})
    reader = csv.reader(io.StringIO(_read_text(path, max_bytes), newline=""))
    seen: Dict[str, int] = {}
    try:
        header = next(reader, None)
        if header is None:
            raise table.error("is empty")
        at = _header(table, header, arch_column)
        names = [None if k == at else n for k, n in enumerate([h.strip() for h in header])]
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise table.error(f"line {reader.line_num} has {len(fields)} fields, the header {len(header)}")
            if len(seen) * len(header) > MAX_CELLS:
                raise table.error(f"holds more than {MAX_CELLS:,} cells (line {reader.line_num}); NAS-Bench-201's "
                                  f"full table has about 1.5 million: keep the columns you need")
            _add_row(table, reader.line_num, fields, at, names, seen)
    except csv.Error as e:
        raise table.error(f"line {reader.line_num}: not valid CSV ({e})") from None
    if not table.rows:
        raise table.error("holds no rows")
    return table


def default_better(column: str) -> str:
    """Which way a column is better when the user does not say: accuracies "higher", anything else (energy,
    latency, FLOPs, parameters, error) "lower"."""
    name = column.lower()
    return "higher" if "acc" in name or "top1" in name or "top-1" in name else "lower"


def plot_sweep(table: BenchmarkTable, cells: Sequence[Tuple[str, nb201.ArchLike]], x: str, y: str, path: str,
               x_better: str = "lower", y_better: str = "higher", title: str = "") -> Tuple[str, List[str]]:
    """`pareto.py --benchmark`: the sweep's cells (label, arch) on two measured columns over the whole table's
    cloud and its Pareto front (`*_better`: "lower" or "higher"), a PNG at `path`. Returns the path and the labels
    of cells the table has no numbers for (left out of the plot)."""
    from plumbing import plots
    cloud = table.cloud(x, y)
    points, missing = [], []
    for label, arch in cells:
        key = normalize_arch(arch)
        p = table.numbers(key, x, y) if key in table.rows else None
        if p is None:
            missing.append(label)
        else:
            points.append((label, p[0], p[1]))
    return plots.benchmark_plot(cloud, points, path, x, y, x_better, y_better, title), missing
