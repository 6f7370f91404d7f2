"""Search spaces by name. Each space is one unit: its ops, supernet, derivation, genotype format and the network
`train.py` builds from a genotype. `energy_network` is the seam the energy estimator's CLI uses (by name, lazily)
to build the network of a genotype someone else measured; it is the only thing outside the project that reaches
in here.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch.nn as nn

from cliargs import CLIError

SPACE_NAMES = ("darts", "nb201")


def energy_network(space: str, genotype: Any, input_shape: Sequence[int], num_classes: int = 10,
                   channels: Optional[int] = None, layers: Optional[int] = None) -> nn.Module:
    """The evaluation network of `genotype` in `space`, in eval mode, for an input of `input_shape` (C, H, W) or
    (N, C, H, W). darts: a genotype.json object (dict) or a named genotype (str); width and depth from its meta
    (`eval_channels`, `eval_layers`) unless given, else DARTS's 36 / 20. nb201: an NB201 arch string; 16 channels
    and 5 cells per stage unless given. Bad input is a CLIError naming what is wrong."""
    shape = tuple(int(v) for v in input_shape)[-3:]
    if len(shape) != 3 or min(shape) < 1:
        raise CLIError(f"input shape {tuple(input_shape)} is not (C, H, W) or (N, C, H, W) with positive sizes")
    in_channels, size = shape[0], shape[1]
    if space == "darts":
        import genotypes as G
        from model import build_network
        if isinstance(genotype, str):
            g, meta = G.named_genotype(genotype), {}
        else:
            g = G.from_dict(genotype, where="genotype")
            meta = genotype.get("meta") if isinstance(genotype.get("meta"), dict) else {}
        C = channels or _int(meta.get("eval_channels"), 36)
        L = layers or _int(meta.get("eval_layers"), 20)
        return build_network(g, C, num_classes, L, False, in_channels, size).eval()
    if space == "nb201":
        import nb201
        return nb201.energy_network(genotype, in_channels, num_classes, channels, layers).eval()
    raise CLIError(f"unknown search space {space!r}; valid: {', '.join(SPACE_NAMES)}")


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
