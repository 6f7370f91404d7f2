"""The supernet of the search: MixedOp, Cell, Network (alphas, expected energy, genotype, new_model).

Energy (see README, "Energy term"): per edge, p = softmax of the alphas over the derivable (non-`none`) ops;
E(alpha) = sum over the cells' edges of sum_o p_o * E_o, each E_o the op's own cached energy (J per sample at the
deployment batch). E_min / E_max take each edge's cheapest / dearest derivable op, so the normalized energy
(E - E_min) / (E_max - E_min) lies in [0, 1]. Partial channels (PC-DARTS, K > 1) still price every op at the full
width it will have in the derived network.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import functools

from derivation import derivable, derive_genotype
from genotypes import Genotype
from plumbing.layout import BatchNorm2d, LayoutMixin, like
from operations import FactorizedReduce, ReLUConvBN, attach_estimator, build_op, energy_version, is_pool


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return like(x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w), x)


class MixedOp(nn.Module):
    """One edge: the weighted sum of every candidate op; returns (output, expected energy in J per sample)."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str], partial_channels: int = 1,
                 skip_none: bool = True, pool_bn: bool = True, derive_none: bool = False) -> None:
        """`pool_bn`: BN(affine=False) after each pool (DARTS; NAS-Bench-201's supernet has none). `derive_none`:
        `none` is derivable (NAS-Bench-201), so it joins the expected energy, priced 0 J (the derived cell drops it)."""
        super().__init__()
        self.k = partial_channels
        self.stride = stride
        self.primitives = list(primitives)
        self.derivable = derivable(self.primitives, none=derive_none)
        # The `none` op adds w * 0: skipping it gives the same output and gradients without a full-size zero tensor.
        self.active = [i for i in range(len(self.primitives)) if not (skip_none and self.primitives[i] == "none")]
        width = C // self.k
        self._ops = nn.ModuleList()
        self._post = nn.ModuleDict()  # BN(affine=False) after pools, as in DARTS's supernet; not priced
        for i, name in enumerate(self.primitives):
            op = build_op(name, width, stride, False)
            if self.k > 1:  # price the op at the full width it will have in the derived network
                op.priced_as = functools.partial(build_op, name, C, stride, False)
            self._ops.append(op)
            if is_pool(name) and pool_bn:
                self._post[str(i)] = BatchNorm2d(width, affine=False)
        if self.k > 1 and stride == 2:
            self.bypass_pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self._energy_vec: Optional[torch.Tensor] = None
        self._energy_vec_version = -1

    @property
    def _active(self):
        """(index, op, BN after it or None) of every op that runs, in primitive order."""
        return [(i, self._ops[i], self._post[str(i)] if str(i) in self._post else None) for i in self.active]

    def op_energies(self) -> torch.Tensor:
        """Cached energies (J per sample) of the derivable ops, as a float64 tensor (rebuilt when they change)."""
        if self._energy_vec is None or self._energy_vec_version != energy_version():
            self._energy_vec = torch.tensor(self._derivable_energies(), dtype=torch.float64)
            self._energy_vec_version = energy_version()
        return self._energy_vec

    def expected_energy(self, energy_weights: torch.Tensor) -> torch.Tensor:
        e = self.op_energies().to(device=energy_weights.device, dtype=energy_weights.dtype)
        return (energy_weights * e).sum()

    def forward(self, x: torch.Tensor, weights: torch.Tensor,
                energy_weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(output, expected energy of this edge): the contract of one edge on its own. The supernets call `mix`
        and price every edge at once from their energy table (`SupernetMixin.expected_energy`)."""
        return self.mix(x, weights), self.expected_energy(energy_weights)

    def mix(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the active ops' outputs (`weights`: this edge's row of softmaxed alphas)."""
        if self.k > 1:
            width = x.shape[1] // self.k
            xa, xb = like(x[:, :width], x), x[:, width:]
        else:
            xa = x
        w = weights.unbind()  # one operator for every op's weight (and one stack in the backward)
        out = None
        for i, op, post in self._active:
            y = op(xa)
            if post is not None:
                y = post(y)
            # not addcmul: its fused multiply-add rounds once, so the search would no longer reproduce its numbers
            out = w[i] * y if out is None else out + w[i] * y
        if self.k > 1:
            if self.stride == 2:
                xb = self.bypass_pool(xb)
            out = channel_shuffle(torch.cat([out, xb], dim=1), self.k)
        return out

    def _derivable_energies(self) -> List[float]:
        # `none` (derivable in NB201) costs nothing in a derived network; its op never runs here (`active`)
        return [0.0 if self.primitives[i] == "none" else self._ops[i].energy for i in self.derivable]

    def energy_range(self) -> Tuple[float, float]:
        e = self._derivable_energies()
        return min(e), max(e)


class Cell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str], partial_channels: int = 1,
                 skip_none: bool = True) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(C_prev_prev, C, affine=False) if reduction_prev
                            else ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.steps, self.multiplier = steps, multiplier
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C, stride, primitives, partial_channels, skip_none))

    def forward(self, s0, s1, weights: torch.Tensor, edge_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The cell's output from its two inputs; `weights`: softmaxed alphas (edges x ops), `edge_weights`:
        PC-DARTS's per-edge weights. The energy of the cell's edges is the network's (`expected_energy`)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        rows = weights.unbind()
        edges = edge_weights.unbind() if edge_weights is not None else None
        offset = 0
        for i in range(self.steps):
            total = None
            for j, h in enumerate(states):
                out = self._ops[offset + j].mix(h, rows[offset + j])
                if edges is not None:
                    out = edges[offset + j] * out
                total = out if total is None else total + out
            offset += len(states)
            states.append(total)
        return torch.cat(states[-self.multiplier:], dim=1)


class SupernetMixin:
    """What every supernet shares, given its `_config` (constructor kwargs), `arch_parameters()` and `estimator`:
    weights apart from alphas, the estimator hand-off and `new_model`."""

    def weight_parameters(self) -> List[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def set_estimator(self, estimator) -> None:
        """Hand the energy estimator to every op (energies are re-estimated on the next forward)."""
        self.estimator = estimator
        attach_estimator(self, estimator)

    # ------------------------------------------------------------------------------------------- energy
    def energy_cells(self) -> List[Tuple[bool, Sequence[MixedOp]]]:  # pragma: no cover - abstract
        """(cell kind, its edges' MixedOps) of every cell with alphas, in forward order."""
        raise NotImplementedError

    def _energy_state(self) -> dict:
        """The device-side energy table, rebuilt only when some op's cached energy changed: `table` (float64,
        cells x edges x derivable ops, a non-persistent buffer: it follows `.to()` and stays out of checkpoints),
        cells in reverse order (see `expected_energy`), and `bounds` (E_min, E_max) as Python floats."""
        state = getattr(self, "_energy_cache", None)
        device = self.arch_parameters()[0].device
        if state is not None and state["version"] == energy_version() and self.energy_table.device == device:
            return state
        cells = self.energy_cells()
        table = torch.tensor([[mixed._derivable_energies() for mixed in edges] for _, edges in reversed(cells)],
                             dtype=torch.float64)
        old = getattr(self, "energy_table", None)
        if old is not None and old.shape == table.shape and old.device == device:
            old.copy_(table)  # in place: whoever holds the buffer (DDP's buffer list) sees the new energies
        else:
            self.register_buffer("energy_table", table.to(device), persistent=False)
        lo = hi = 0.0
        for _, edges in cells:
            for mixed in edges:
                a, b = mixed.energy_range()
                lo, hi = lo + a, hi + b
        self._energy_cache = state = {"version": energy_version(), "bounds": (lo, hi),
                                      "kinds": [kind for kind, _ in reversed(cells)]}
        return state

    def expected_energy(self, energy_weights: dict) -> torch.Tensor:
        """E(alpha) = sum over cells and edges of sum_o p_o E_o (J per sample), once per forward from the table;
        `energy_weights`: cell kind -> (edges x derivable ops) softmax over the derivable ops.

        It rounds exactly as the per-edge sums it replaces (each edge's dot product, then the edges of a cell,
        then the cells, left to right), and stacks the cells in reverse so that each alpha's gradient collects
        the cells in the order autograd did there: the search's numbers do not move (tests/test_golden_run.py)."""
        state = self._energy_state()
        weights = torch.stack([energy_weights[kind] for kind in state["kinds"]])
        per_edge = (weights * self.energy_table.to(weights.dtype)).sum(-1).unbind()  # cells in reverse
        energy = None
        for cell in reversed(per_edge):
            edges = cell.unbind()
            cell_energy = edges[0]
            for e in edges[1:]:
                cell_energy = cell_energy + e
            energy = cell_energy if energy is None else energy + cell_energy
        return energy

    def energy_bounds(self) -> Tuple[float, float]:
        """(E_min, E_max): every edge at its cheapest / most expensive derivable op (J per sample), computed
        when the energies change, not per step."""
        return self._energy_state()["bounds"]

    def trace_energies(self, input_shape: Sequence[int]) -> None:
        """Estimate every op's energy with one eager forward of a zero batch (eval mode: no BatchNorm statistic
        moves, no gradient), e.g. before the cells are compiled."""
        training = self.training
        device = self.arch_parameters()[0].device
        try:
            with torch.no_grad():
                self.eval()(torch.zeros(1, *input_shape[1:], device=device))
        finally:
            self.train(training)

    def new_model(self):
        """A fresh supernet with new weights and the same alphas (DARTS's `new()`)."""
        device = self.arch_parameters()[0].device
        model = type(self)(**self._config).to(device).set_channels_last(self.channels_last)
        with torch.no_grad():
            for mine, theirs in zip(model.arch_parameters(), self.arch_parameters()):
                mine.copy_(theirs)
        if self.estimator is not None:
            model.set_estimator(self.estimator)
        return model


class Network(SupernetMixin, LayoutMixin, nn.Module):
    """The DARTS supernet for any data set: stem from `in_channels`, head to `num_classes`."""

    def __init__(self, C: int, num_classes: int, layers: int, primitives: Sequence[str], in_channels: int = 3,
                 estimator=None, steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
                 partial_channels: int = 1, skip_none: bool = True) -> None:
        super().__init__()
        if "none" in primitives and len(primitives) < 2:
            raise ValueError("the primitive set needs an op besides 'none'")
        self._config = dict(C=C, num_classes=num_classes, layers=layers, primitives=list(primitives),
                            in_channels=in_channels, steps=steps, multiplier=multiplier,
                            stem_multiplier=stem_multiplier, partial_channels=partial_channels,
                            skip_none=skip_none)
        self.primitives = list(primitives)
        self.steps, self.multiplier = steps, multiplier
        self.partial_channels = partial_channels
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, primitives,
                        partial_channels, skip_none)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        k = sum(2 + i for i in range(steps))
        n = len(self.primitives)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, n))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, n))
        if partial_channels > 1:  # PC-DARTS edge normalization
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(k))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(k))
        self._derivable = derivable(self.primitives)
        # an index buffer, not a Python list: indexing with a list builds (and on a GPU copies) a tensor each time
        self.register_buffer("derivable_index", torch.tensor(self._derivable), persistent=False)
        self.estimator = None
        if estimator is not None:
            self.set_estimator(estimator)

    # ----------------------------------------------------------------------------------------- parameters
    def arch_parameters(self) -> List[nn.Parameter]:
        names = ["alphas_normal", "alphas_reduce"] + (["betas_normal", "betas_reduce"] if self.partial_channels > 1
                                                      else [])
        return [getattr(self, n) for n in names]

    # -------------------------------------------------------------------------------------------- weights
    def _edge_weights(self, betas: torch.Tensor) -> torch.Tensor:
        """PC-DARTS: softmax of the betas over each node's incoming edges."""
        parts, start = [], 0
        for i in range(self.steps):
            parts.append(F.softmax(betas[start:start + 2 + i], dim=-1))
            start += 2 + i
        return torch.cat(parts)

    def arch_weights(self, reduction: bool):
        alphas = self.alphas_reduce if reduction else self.alphas_normal
        weights = F.softmax(alphas, dim=-1)
        energy_weights = F.softmax(alphas.index_select(1, self.derivable_index), dim=-1)
        edge = None
        if self.partial_channels > 1:
            edge = self._edge_weights(self.betas_reduce if reduction else self.betas_normal)
        return weights, energy_weights, edge

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits and the expected energy E(alpha) of the cells (J per sample, differentiable in the alphas)."""
        per_kind = {False: self.arch_weights(False), True: self.arch_weights(True)}
        s0 = s1 = self.stem(self.to_layout(x))
        for cell in self.cells:
            w, _, edge = per_kind[cell.reduction]
            s0, s1 = s1, cell(s0, s1, w, edge)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, self.expected_energy({kind: ew for kind, (_, ew, _) in per_kind.items()})

    def mixed_ops(self):
        for cell in self.cells:
            yield from cell._ops

    def energy_cells(self) -> List[Tuple[bool, Sequence[MixedOp]]]:
        return [(cell.reduction, cell._ops) for cell in self.cells]

    # ----------------------------------------------------------------------------------------- derivation
    def softmaxed_alphas(self) -> dict:
        """Softmaxed alphas (and edge weights with partial channels), as nested lists for alphas.json."""
        with torch.no_grad():
            out = {"normal": F.softmax(self.alphas_normal, -1).tolist(),
                   "reduce": F.softmax(self.alphas_reduce, -1).tolist()}
            if self.partial_channels > 1:
                out["edges_normal"] = self._edge_weights(self.betas_normal).tolist()
                out["edges_reduce"] = self._edge_weights(self.betas_reduce).tolist()
        return out

    def derivation_tensors(self) -> Dict[str, torch.Tensor]:
        """What the derivation ranks: per cell kind, the (edges x ops) softmaxed alphas, scaled by the PC-DARTS
        edge weights with partial channels (on the model's device, detached)."""
        with torch.no_grad():
            wn = F.softmax(self.alphas_normal, -1)
            wr = F.softmax(self.alphas_reduce, -1)
            if self.partial_channels > 1:
                wn = wn * self._edge_weights(self.betas_normal)[:, None]
                wr = wr * self._edge_weights(self.betas_reduce)[:, None]
        return {"normal": wn, "reduce": wr}

    def derivation_weights(self) -> dict:
        """`derivation_tensors()` as nested lists (a read to the host)."""
        return {kind: w.tolist() for kind, w in self.derivation_tensors().items()}

    def genotype(self, max_skip: Optional[int] = None, min_parametric: int = 0,
                 actions: Optional[List[str]] = None, weights: Optional[dict] = None) -> Genotype:
        """DARTS's rule: per node the 2 strongest incoming edges, on each the strongest non-`none` op. With
        `max_skip` / `min_parametric` the normal cell is then guarded (`derivation.guard_derivation`; rewrites go
        to `actions`); the defaults are plain DARTS. `weights`: `derivation_weights()` read already."""
        concat = range(2 + self.steps - self.multiplier, self.steps + 2)
        return derive_genotype(weights or self.derivation_weights(), self.primitives, self.steps, concat, max_skip,
                               min_parametric, actions)
