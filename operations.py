"""Candidate operations of the DARTS search space, one registry `OPS`: name -> factory(C, stride, affine).

Every op of the supernet is an `EnergyOp`: it carries `energy` (J per sample, 0.0 until known) and `energy_flag`
(0, then 1). On its first forward it asks the energy estimator that the network handed it (`op.estimator`) for its
energy at the deployment shape `(estimator.batch_size, C, H, W)` and caches the answer; it asks again only when the
per-sample input shape changes. Ops never import the estimator: the network sets it (see `attach_estimator`).

Adding an op: put a factory `(C, stride, affine) -> nn.Module` into `OPS`. The module may be an `EnergyOp` (write
`compute(x)`, or override `forward(x)`: the energy is tracked by a forward pre-hook, so it is priced either way) or
any plain `nn.Module`: `build_op` wraps it in `Priced`, which prices it like the others. A factory that builds no
module is refused when the supernet is built, with one line naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.cliargs import CLIError
from plumbing.layout import BatchNorm2d

# Bumped whenever any op's cached energy changes: a supernet rebuilds its device-side energy table only then
# (one int compared per forward instead of every op's energy).
_ENERGY_VERSION = [0]


def energy_version() -> int:
    """A counter that changes whenever some op's cached energy does."""
    return _ENERGY_VERSION[0]


class EnergyOp(nn.Module):
    """Base class of candidate ops: lazily estimated, cached energy per sample (joules)."""

    def __init__(self) -> None:
        super().__init__()
        self.energy: float = 0.0
        self.energy_flag: int = 0
        self.estimator = None  # set by the network; a plain attribute, not a submodule
        # Partial channels (PC-DARTS) run an op at 1/K of the width but price it at the full width it will have in
        # the derived network: `priced_as` builds that full-width twin. A factory, not a module: the twin holds no
        # trained weights, so it stays out of parameters(), state_dict() and .to().
        self.priced_as: Optional[Callable[[], nn.Module]] = None
        self._energy_shape: Optional[Tuple[int, ...]] = None
        self._estimating = False
        # In __call__, before any forward: a subclass that overrides forward() instead of compute() is priced too.
        self.register_forward_pre_hook(_track_energy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def track_energy(self, x: torch.Tensor) -> None:
        """Estimate (once per per-sample shape) this op's energy at the deployment batch size. Inside a compiled
        graph nothing is estimated (the estimator is Python work dynamo must not trace): `utils.compile_cells`
        traces the energies eagerly first."""
        if self.estimator is None or self._estimating or torch.compiler.is_compiling():
            return
        shape = tuple(x.shape[1:])
        if self.energy_flag and shape == self._energy_shape:
            return
        self._estimating = True  # the estimator runs this module's forward: do not recurse
        try:
            target = self.pricing_module()
            priced = (target.in_channels,) + shape[1:] if target is not self else shape
            self.energy = float(self.estimator.op_energy(target, (self.estimator.batch_size,) + priced))
        finally:
            self._estimating = False
        self._energy_shape = tuple(x.shape[1:])
        self.energy_flag = 1
        _ENERGY_VERSION[0] += 1

    def pricing_module(self) -> nn.Module:
        """The module this op's energy is estimated on: itself, or its full-width twin (`priced_as`), built on
        a forked RNG stream so that pricing never changes what the search draws next."""
        if self.priced_as is None:
            return self
        with torch.random.fork_rng(devices=[]):
            return self.priced_as()


def _track_energy(op: "EnergyOp", args) -> None:
    if args:
        op.track_energy(args[0])


class Priced(EnergyOp):
    """A plain `nn.Module` op from `OPS`, priced like every EnergyOp (its layers are traced on its first forward)."""

    def __init__(self, op: nn.Module, C: int) -> None:
        super().__init__()
        self.op = op
        self.in_channels = C

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def build_op(name: str, C: int, stride: int, affine: bool) -> EnergyOp:
    """`OPS[name](C, stride, affine)` as an EnergyOp (a plain module wrapped in `Priced`); a factory that fails or
    builds no module is a CLIError naming the op."""
    try:
        op = OPS[name](C, stride, affine)
    except TypeError as e:
        raise CLIError(f"op {name!r} in OPS cannot be built as factory(C, stride, affine) ({e}); write its entry as "
                       f"lambda C, stride, affine: MyOp(...)") from None
    if not isinstance(op, nn.Module):
        raise CLIError(f"op {name!r} in OPS built a {type(op).__name__}, not an nn.Module; its factory must return "
                       f"a module (an EnergyOp or any nn.Module)")
    if not isinstance(op, EnergyOp):
        return Priced(op, C)
    if not hasattr(op, "in_channels"):  # what the partial-channel pricing reads
        op.in_channels = C
    return op


def attach_estimator(module: nn.Module, estimator) -> None:
    """Hand `estimator` to every EnergyOp below `module` and forget cached energies."""
    for m in module.modules():
        if isinstance(m, EnergyOp):
            m.estimator = estimator
            m.energy, m.energy_flag, m._energy_shape = 0.0, 0, None
    _ENERGY_VERSION[0] += 1


class Sequential(EnergyOp):
    """An op made of a plain sequence of layers."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ReLUConvBN(Sequential):
    def __init__(self, C_in: int, C_out: int, kernel_size, stride, padding, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )
        self.in_channels = C_in


class DilConv(Sequential):
    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )
        self.in_channels = C_in


class SepConv(Sequential):
    """Two stacked (ReLU, depthwise kxk, pointwise 1x1, BN); the stride is on the first."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )
        self.in_channels = C_in


class Conv7x1x1x7(Sequential):
    def __init__(self, C: int, stride: int, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            BatchNorm2d(C, affine=affine),
        )
        self.in_channels = C


class Pool(Sequential):
    """3x3 max or average pooling (average excludes the padding, as in DARTS)."""

    def __init__(self, kind: str, C: int, stride: int) -> None:
        layer = (nn.MaxPool2d(3, stride=stride, padding=1) if kind == "max"
                 else nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False))
        super().__init__(layer)
        self.in_channels = C


class Identity(EnergyOp):
    def __init__(self, C: int = 0) -> None:
        super().__init__()
        self.in_channels = C
        self.layer = nn.Identity()

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Zero(EnergyOp):
    """The `none` op: outputs zeros of the strided shape. Never derived; the supernet skips it (a fast path)."""

    def __init__(self, C: int, stride: int) -> None:
        super().__init__()
        self.in_channels = C
        self.stride = stride

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(EnergyOp):
    """Halves the resolution with two offset 1x1 stride-2 convs whose outputs are concatenated.

    Odd sizes (MNIST's 7x7 after one reduction) are padded by one row and column so that both paths agree;
    for even sizes this selects exactly the pixels DARTS's `x[:, :, 1:, 1:]` does.
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True) -> None:
        super().__init__()
        assert C_out % 2 == 0, "FactorizedReduce needs an even number of output channels"
        self.in_channels = C_in
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = BatchNorm2d(C_out, affine=affine)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1)) if x.shape[-1] % 2 or x.shape[-2] % 2 else x
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted[:, :, 1:, 1:])], dim=1))


OpFactory = Callable[[int, int, bool], nn.Module]


@dataclass(frozen=True)
class Op:
    """A registry entry: its factory `build(C, stride, affine) -> module` and what the search must know of it."""
    build: OpFactory
    parametric: bool = True  # learnable weights: counted by --min_parametric (skips, pools and `none` are not)
    pool: bool = False       # a pooling op: the supernet puts a BN after it (DARTS), the cell statistics count it

    def __call__(self, C: int, stride: int, affine: bool) -> nn.Module:
        return self.build(C, stride, affine)


# The candidate ops, by name. A new op is one entry: `OPS["my_op"] = Op(lambda C, stride, affine: MyOp(...))`
# (any nn.Module is priced; `parametric=False` / `pool=True` when it has no weights / pools); a bare factory
# counts as parametric and not a pool.
OPS: Dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": Op(lambda C, stride, affine: Zero(C, stride), parametric=False),
    "avg_pool_3x3": Op(lambda C, stride, affine: Pool("avg", C, stride), parametric=False, pool=True),
    "max_pool_3x3": Op(lambda C, stride, affine: Pool("max", C, stride), parametric=False, pool=True),
    "skip_connect": Op(lambda C, stride, affine: Identity(C) if stride == 1 else FactorizedReduce(C, C, affine),
                       parametric=False),
    "sep_conv_3x3": Op(lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine)),
    "sep_conv_5x5": Op(lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine)),
    "sep_conv_7x7": Op(lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine)),
    "dil_conv_3x3": Op(lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine)),
    "dil_conv_5x5": Op(lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine)),
    "conv_7x1_1x7": Op(lambda C, stride, affine: Conv7x1x1x7(C, stride, affine)),
    "conv_1x1": Op(lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, affine)),
    "conv_3x3": Op(lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine)),
}
# NAS-Bench-201's names for the same ReLU-Conv-BN ops (its `nor_conv_kxk`), so its arch strings read as written.
OPS["nor_conv_1x1"] = OPS["conv_1x1"]
OPS["nor_conv_3x3"] = OPS["conv_3x3"]


def is_parametric(name: str) -> bool:
    """True for ops with learnable weights (convolutions); skip/pool/none are parameter-free (the registry says)."""
    return getattr(OPS.get(name), "parametric", True)


def is_pool(name: str) -> bool:
    """True for pooling ops (the registry says)."""
    return getattr(OPS.get(name), "pool", False)
