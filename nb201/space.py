"""NAS-Bench-201's search space as one unit (`--space nb201`): arch strings and genotype.json, the cell, the
skeleton, the supernet, derivation and guards, and NB201's training protocol.

Cell: nodes 0..3, node i sums one op applied to each earlier node: 6 edges, in NB201's order 1<-0, 2<-0, 2<-1,
3<-0, 3<-1, 3<-2; node 0 is the cell's input, node 3 its output. Ops: none, skip_connect, nor_conv_1x1,
nor_conv_3x3 (ReLU-Conv-BN), avg_pool_3x3. Skeleton (NB201's TinyNetwork): 3x3 conv stem to C channels + BN; three
stages of N cells at C, 2C, 4C channels with NB201's residual reduction block between them; BN-ReLU, global average
pool, linear. The supernet is the same skeleton with a MixedOp per edge and one alpha row per edge shared by every
cell (NB201's DARTS baselines). An arch is held as the tuple of its 6 ops in edge order; its text is NB201's arch
string, e.g. `|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|`.

`none` is derivable here (it is a member of NB201's 15,625 cells and NB201's DARTS baselines pick it by argmax), so
it joins the expected energy at 0 J, and the derived network drops `none` edges from its node sums (they add exact
zeros) so that it really costs nothing. An arch whose output node is cut off from its input is worthless, so
derivation repairs it (`connect`) with the path that loses the least alpha weight.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from genotypes import GenotypeError, read_json
from plumbing.layout import LayoutMixin
from derivation import guard_derivation
from model_search import MixedOp, SupernetMixin
from operations import OPS, ReLUConvBN

SPACE = "nb201"
PRIMITIVES: List[str] = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]  # NB201's order
NODES = 4
EDGES: Tuple[Tuple[int, int], ...] = tuple((i, j) for i in range(1, NODES) for j in range(i))  # (node, input)
GENOTYPE_FORMAT = 1

Arch = Tuple[str, ...]  # the op of each edge, in EDGES order
ArchLike = Union[str, Sequence[str]]

# ------------------------------------------------------------------------------------------------ arch strings
def edge_name(e: int) -> str:
    """NB201's name of edge `e`: `node<-input`."""
    return "{}<-{}".format(*EDGES[e])


def format_arch(arch: Sequence[str]) -> str:
    """NB201's arch string of an arch (its 6 ops in edge order, or a string: then normalized)."""
    ops = as_arch(arch)
    nodes = ["|" + "|".join(f"{ops[e]}~{j}" for e, (i, j) in enumerate(EDGES) if i == node) + "|"
             for node in range(1, NODES)]
    return "+".join(nodes)


def parse_arch(text: Any, where: str = "arch string") -> Arch:
    """The 6 ops of an NB201 arch string; surrounding blanks are ignored, inputs may come in any order within a
    node. Anything else malformed is a GenotypeError (a CLIError) naming the problem."""
    if not isinstance(text, str):
        raise GenotypeError(f"{where}: expected an NB201 arch string, got {type(text).__name__}")
    nodes = text.strip().split("+")
    if len(nodes) != NODES - 1:
        raise GenotypeError(f"{where} {text!r}: {len(nodes)} node(s), an NB201 cell has {NODES - 1} "
                            f"(nodes '|op~input|...|' joined by '+')")
    ops: Dict[Tuple[int, int], str] = {}
    for node, part in enumerate(nodes, start=1):
        if len(part) < 2 or not (part.startswith("|") and part.endswith("|")):
            raise GenotypeError(f"{where} {text!r}: node {node} {part!r} is not '|op~input|...|'")
        for item in part[1:-1].split("|"):
            op, sep, src = item.partition("~")
            if not sep or op not in PRIMITIVES:
                raise GenotypeError(f"{where} {text!r}: node {node} has {item!r}, not op~input with op one of "
                                    f"{', '.join(PRIMITIVES)}")
            if src not in {str(j) for j in range(node)}:
                raise GenotypeError(f"{where} {text!r}: node {node} reads input {src!r}; it must be 0..{node - 1}")
            if (node, int(src)) in ops:
                raise GenotypeError(f"{where} {text!r}: node {node} reads input {src} twice")
            ops[(node, int(src))] = op
        if len(ops) != sum(i <= node for i, _ in EDGES):
            raise GenotypeError(f"{where} {text!r}: node {node} must read every input 0..{node - 1} once")
    return tuple(ops[e] for e in EDGES)


def as_arch(arch: ArchLike, where: str = "arch") -> Arch:
    """An arch from its string or its 6 ops (validated either way)."""
    if isinstance(arch, str):
        return parse_arch(arch, where)
    ops = tuple(arch)
    if len(ops) == len(EDGES) and all(isinstance(op, str) and op in PRIMITIVES for op in ops):
        return ops
    raise GenotypeError(f"{where}: {ops!r} is not {len(EDGES)} NB201 ops ({', '.join(PRIMITIVES)})")


def pairs(arch: ArchLike) -> List[Tuple[str, int]]:
    """(op, input) of each edge, in edge order."""
    return [(op, j) for op, (_, j) in zip(as_arch(arch), EDGES)]


def collapse_view(arch: ArchLike):
    """The arch as a DARTS Genotype whose normal cell is the 6 (op, input) pairs: what `CollapseStopper` reads."""
    from genotypes import Genotype
    return Genotype(pairs(arch), [NODES - 1], [], [])


# ---------------------------------------------------------------------------------------------- genotype.json
def to_dict(arch: ArchLike, primitives: Optional[Sequence[str]] = None,
            meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The `genotype.json` object of an NB201 arch."""
    return {"format": GENOTYPE_FORMAT, "space": SPACE, "arch": format_arch(arch),
            "primitives": list(primitives) if primitives is not None else None, "meta": dict(meta or {})}


def from_dict(data: Any, where: str = "genotype") -> Arch:
    """The arch of a `genotype.json` object, every field's type checked."""
    if not isinstance(data, dict):
        raise GenotypeError(f"{where}: expected a JSON object with 'space' and 'arch'")
    if data.get("format") != GENOTYPE_FORMAT or isinstance(data.get("format"), bool):
        raise GenotypeError(f"{where}: unsupported format {data.get('format')!r} (this code reads {GENOTYPE_FORMAT})")
    if data.get("space") != SPACE:
        raise GenotypeError(f"{where}: space {data.get('space')!r} is not {SPACE!r}")
    arch = parse_arch(data.get("arch"), f"{where}: 'arch'")
    prims = data.get("primitives")
    if prims is not None:
        if not isinstance(prims, list) or not prims or any(p not in PRIMITIVES for p in prims):
            raise GenotypeError(f"{where}: 'primitives' must be a list of NB201 ops ({', '.join(PRIMITIVES)})")
        if set(arch) - set(prims):
            raise GenotypeError(f"{where}: the arch uses {', '.join(sorted(set(arch) - set(prims)))}, not among "
                                f"its primitives")
    if not isinstance(data.get("meta", {}), dict):
        raise GenotypeError(f"{where}: 'meta' must be a JSON object")
    return arch


def save(arch: ArchLike, path: str, primitives: Optional[Sequence[str]] = None,
         meta: Optional[Dict[str, Any]] = None) -> None:
    """Write `genotype.json` atomically."""
    from plumbing.utils import atomic_write_json
    atomic_write_json(path, to_dict(arch, primitives, meta))


def load(path: str) -> Tuple[Arch, Dict[str, Any]]:
    """The arch and meta of an NB201 genotype file; GenotypeError with a one-line reason otherwise."""
    data = read_json(path)
    arch = from_dict(data, where=f"genotype file {path}")
    return arch, dict(data.get("meta", {}))


def resolve(spec: str) -> Tuple[Arch, Dict[str, Any]]:
    """`train.py --genotype` for nb201: a genotype.json path or a bare arch string (meta then empty)."""
    if spec.strip().startswith("|"):
        return parse_arch(spec, "--genotype"), {}
    if not os.path.exists(spec):
        raise GenotypeError(f"--genotype {spec!r} is neither an NB201 arch string ('|op~0|+...') nor an existing file")
    return load(spec)


# ------------------------------------------------------------------------------------------- cell and skeleton
def in_edges(node: int) -> List[int]:
    return [e for e, (i, _) in enumerate(EDGES) if i == node]


class ResidualReduction(nn.Module):
    """NB201's ResNetBasicblock at stride 2: ReLU-conv3x3(s2)-BN, ReLU-conv3x3-BN, plus a shortcut of 2x2 average
    pooling and a 1x1 conv. The pool rounds up, so odd sizes work; on even sizes that is NB201's pool exactly."""

    reduction = True

    def __init__(self, C_in: int, C_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, 2, 1)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2, 0, ceil_mode=True),
                                        nn.Conv2d(C_in, C_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


def _node_sums(x: torch.Tensor, edge: Callable[[int, torch.Tensor], Optional[torch.Tensor]]) -> torch.Tensor:
    """Node i = the sum over its edges of edge(e, node j); an edge returning None adds nothing, a node with no
    input at all is zeros (NB201's sum of zero ops; free: no arithmetic)."""
    nodes = [x]
    for node in range(1, NODES):
        total = None
        for e in in_edges(node):
            y = edge(e, nodes[EDGES[e][1]])
            if y is not None:
                total = y if total is None else total + y
        nodes.append(torch.zeros_like(x) if total is None else total)
    return nodes[-1]


class InferCell(nn.Module):
    """A derived NB201 cell: every op as NB201 runs it (also on a node of zeros), `none` edges left out."""

    reduction = False

    def __init__(self, arch: ArchLike, C: int) -> None:
        super().__init__()
        self.arch = as_arch(arch)
        self.edges = nn.ModuleList(OPS[op](C, 1, True) for op in self.arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _node_sums(x, lambda e, h: None if self.arch[e] == "none" else self.edges[e](h))


class ReferenceCell(InferCell):
    """The cell as NAS-Bench-201's own code runs it (where its latencies were measured: HELP, the NAS-Bench-201 API):
    every edge, `none` too (`x.mul(0)`: one kernel), and every node sums all of its edges."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _node_sums(x, lambda e, h: self.edges[e](h))


class _Skeleton(LayoutMixin, nn.Module):
    """NB201's TinyNetwork around any cell: `cells` holds the 3N cells and the 2 residual blocks in order."""

    def _build(self, C: int, N: int, num_classes: int, in_channels: int, make_cell: Callable[[int], nn.Module]):
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        C_prev = C
        for stage, width in enumerate((C, 2 * C, 4 * C)):
            if stage:
                self.cells.append(ResidualReduction(C_prev, width))
            self.cells.extend(make_cell(width) for _ in range(N))
            C_prev = width
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def head(self, s: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.global_pooling(self.lastact(s)).flatten(1))


class NB201Network(_Skeleton):
    """The network train.py builds from an NB201 arch. forward(x) -> (logits, None): no auxiliary head.
    `drop_path_prob` is accepted and ignored (NB201 trains without drop path)."""

    def __init__(self, arch: ArchLike, C: int = 16, N: int = 5, num_classes: int = 10, in_channels: int = 3,
                 reference: bool = False) -> None:
        super().__init__()
        self.arch = as_arch(arch)
        cell = ReferenceCell if reference else InferCell  # reference: as NB201's code runs it, for pricing only
        self._build(C, N, num_classes, in_channels, lambda width: cell(self.arch, width))
        self.drop_path_prob = 0.0

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        s = self.stem(self.to_layout(x))
        for cell in self.cells:
            s = cell(s)
        return self.head(s), None


def energy_network(arch: Any, in_channels: int, num_classes: int, channels: Optional[int] = None,
                   layers: Optional[int] = None, reference: bool = False) -> nn.Module:
    """The evaluation network of an arch (string, 6 ops or genotype.json object): 16 channels and 5 cells per
    stage unless given (spaces.energy_network's seam); `reference`: its cells as NAS-Bench-201's code runs them
    (`ReferenceCell`), to price measurements made with that code."""
    ops = from_dict(arch) if isinstance(arch, dict) else as_arch(arch)
    return NB201Network(ops, channels or 16, layers or 5, num_classes, in_channels, reference)


# -------------------------------------------------------------------------------------------------- supernet
class SearchCell(nn.Module):
    """The supernet's cell: one MixedOp per edge; its edges' expected energy is the supernet's (one table)."""

    reduction = False

    def __init__(self, C: int, primitives: Sequence[str], partial_channels: int, skip_none: bool) -> None:
        super().__init__()
        self.edges = nn.ModuleList(MixedOp(C, 1, primitives, partial_channels, skip_none, pool_bn=False,
                                           derive_none=True) for _ in EDGES)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows = weights.unbind()
        return _node_sums(x, lambda e, h: self.edges[e].mix(h, rows[e]))


def check_primitives(primitives: Sequence[str]) -> List[str]:
    """A list of NB201 ops, each once, with at least one besides `none` (GenotypeError otherwise)."""
    prims = list(primitives)
    bad = [p for p in prims if p not in PRIMITIVES]
    if bad or not prims or len(set(prims)) != len(prims) or set(prims) <= {"none"}:
        raise GenotypeError(f"NB201 primitives must be distinct ops among {', '.join(PRIMITIVES)}, with one besides "
                            f"'none'; got {', '.join(prims) or 'nothing'}")
    return prims


class Supernet(SupernetMixin, _Skeleton):
    """NB201's DARTS supernet, with model_search.Network's public methods (the architect and the search use it
    unchanged). forward(x) -> (logits, expected energy of all cells' edges in J per sample). `layers` is N, the
    cells per stage. Partial channels (PC-DARTS's K) apply to every edge; NB201 keeps every edge, so there are no
    edge weights (betas): they would only scale an edge's row, which never changes its argmax."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 5,
                 primitives: Sequence[str] = tuple(PRIMITIVES), in_channels: int = 3, estimator=None,
                 partial_channels: int = 1, skip_none: bool = True) -> None:
        super().__init__()
        prims = check_primitives(primitives)
        if partial_channels < 1 or C % partial_channels:
            raise GenotypeError(f"partial channels K={partial_channels} must divide the {C} channels")
        self._config = dict(C=C, num_classes=num_classes, layers=layers, primitives=prims, in_channels=in_channels,
                            partial_channels=partial_channels, skip_none=skip_none)
        self.primitives = prims
        self.partial_channels = partial_channels
        self._build(C, layers, num_classes, in_channels,
                    lambda width: SearchCell(width, prims, partial_channels, skip_none))
        self.alphas = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(prims)))
        self.estimator = None
        if estimator is not None:
            self.set_estimator(estimator)

    def arch_parameters(self) -> List[nn.Parameter]:
        return [self.alphas]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        weights = F.softmax(self.alphas, dim=-1)
        s = self.stem(self.to_layout(x))
        for cell in self.cells:
            s = cell(s) if cell.reduction else cell(s, weights)
        # every op is derivable here, `none` included (priced 0 J): the energy weights are the op weights
        return self.head(s), self.expected_energy({False: weights})

    def mixed_ops(self):
        for cell in self.cells:
            if not cell.reduction:
                yield from cell.edges

    def energy_cells(self) -> List[Tuple[bool, Sequence[MixedOp]]]:
        return [(False, cell.edges) for cell in self.cells if not cell.reduction]

    def softmaxed_alphas(self) -> Dict[str, List[List[float]]]:
        """Softmaxed alphas, edges x ops, for alphas.json (one cell kind: `cell`)."""
        return {"cell": self.derivation_tensors()["cell"].tolist()}

    def derivation_tensors(self) -> Dict[str, torch.Tensor]:
        """What derivation ranks: the softmaxed alphas (no edge weights in NB201), on the model's device."""
        with torch.no_grad():
            return {"cell": F.softmax(self.alphas, -1)}

    def derivation_weights(self) -> Dict[str, List[List[float]]]:
        """`derivation_tensors()` as nested lists (a read to the host)."""
        return self.softmaxed_alphas()

    def genotype(self, max_skip: Optional[int] = None, min_parametric: int = 0,
                 actions: Optional[List[str]] = None, weights: Optional[dict] = None) -> str:
        """The derived arch string: `derive_arch` (strongest op per edge, output kept connected) then the guards.
        `weights`: `derivation_weights()` read already."""
        return format_arch(derive_arch((weights or self.derivation_weights())["cell"], self.primitives, max_skip,
                                       min_parametric, actions))


# ------------------------------------------------------------------------------------------------- derivation
def derive(weights: Sequence[Sequence[float]], primitives: Sequence[str]) -> Arch:
    """The strongest op per edge (argmax of each row, `none` included: NB201's DARTS baselines)."""
    return tuple(primitives[max(range(len(row)), key=row.__getitem__)] for row in weights)


def useful_edges(arch: ArchLike) -> List[bool]:
    """Per edge: True for a live (non-`none`) op on a path from the input to the output. Any other live op's work is
    wasted: it reads a node of zeros, or nothing it feeds reaches the output."""
    ops = as_arch(arch)
    forward, backward = {0}, {NODES - 1}
    for (i, j), op in zip(EDGES, ops):  # EDGES is in topological order
        if op != "none" and j in forward:
            forward.add(i)
    for (i, j), op in reversed(list(zip(EDGES, ops))):
        if op != "none" and i in backward:
            backward.add(j)
    return [op != "none" and j in forward and i in backward for (i, j), op in zip(EDGES, ops)]


def reaches_output(arch: ArchLike) -> bool:
    """True when a path of non-`none` edges leads from the input (node 0) to the output (node 3)."""
    return any(useful_edges(arch))


def _paths(node: int = 0) -> List[List[int]]:
    """Every path of edges from `node` to the output, shortest first."""
    if node == NODES - 1:
        return [[]]
    out = [[e] + rest for e, (i, j) in enumerate(EDGES) if j == node for rest in _paths(i)]
    return sorted(out, key=len)


def connect(weights: Sequence[Sequence[float]], primitives: Sequence[str], arch: ArchLike,
            actions: Optional[List[str]] = None) -> Arch:
    """A cut-off arch made to reach its output: along the input-output path that loses the least log weight (ties:
    the shortest), each `none` edge takes its strongest other op. A connected arch comes back as it is."""
    ops = list(as_arch(arch))
    if reaches_output(ops):
        return tuple(ops)
    k = {p: n for n, p in enumerate(primitives)}
    others = [n for n, p in enumerate(primitives) if p != "none"]

    def best(e: int) -> int:
        return max(others, key=lambda n: weights[e][n])

    def loss(path: List[int]) -> float:
        return sum(math.log(max(weights[e][k["none"]], 1e-30)) - math.log(max(weights[e][best(e)], 1e-30))
                   for e in path if ops[e] == "none")

    for e in min(_paths(), key=loss):
        if ops[e] == "none":
            ops[e] = primitives[best(e)]
            if actions is not None:
                actions.append(f"connect replaced none on edge {edge_name(e)} by {ops[e]} (the output was cut off)")
    return tuple(ops)


def guard(weights: Sequence[Sequence[float]], primitives: Sequence[str], arch: ArchLike,
          max_skip: Optional[int] = None, min_parametric: int = 0, actions: Optional[List[str]] = None) -> Arch:
    """model_search.guard_derivation on the 6 edges: at most `max_skip` skip_connects, at least `min_parametric`
    convolutions; a rewritten edge takes its strongest convolution (so the output stays connected)."""
    gene = guard_derivation(weights, primitives, pairs(arch), max_skip, min_parametric, actions,
                            rows=range(len(EDGES)), edge_names=[edge_name(e) for e in range(len(EDGES))])
    return tuple(op for op, _ in gene)


def derive_arch(weights: Sequence[Sequence[float]], primitives: Sequence[str], max_skip: Optional[int] = None,
                min_parametric: int = 0, actions: Optional[List[str]] = None) -> Arch:
    """What a search writes: the strongest op per edge, connected, then guarded; `actions` gets one line per
    rewrite."""
    arch = connect(weights, primitives, derive(weights, primitives), actions)
    return guard(weights, primitives, arch, max_skip, min_parametric, actions)
