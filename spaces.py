"""Search spaces by name (`--space`). Each space is one unit with the same methods: its primitives, supernet,
derivation (guards, budget projection), genotype format and files, the network `train.py` builds from a genotype,
its price and its diagram. The scripts call these and never ask which space they run.

- `darts`: DARTS's cells (normal and reduction, 14 edges, two inputs per node); model_search.py, model.py,
  genotypes.py, derivation.py.
- `nb201`: NAS-Bench-201's cell (4 nodes, 6 edges, one op per edge); the nb201/ package.

`energy_network` is the network builder `energy.py` hands the energy estimator's CLI, which builds the network of
a genotype someone else measured with it (the estimator imports nothing of the project).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from plumbing.cliargs import CLIError
from plumbing.options import SPACE_NAMES


class DartsSpace:
    """DARTS's space: genotypes are `genotypes.Genotype` (normal and reduction cells of (op, input) pairs)."""

    name = "darts"
    default_primitives = "darts"
    guarded_ops = 8  # ops in the normal cell the guards count

    def parse_primitives(self, spec: str) -> List[str]:
        import genotypes as G
        return G.parse_primitives(spec)

    def check(self, args) -> None:
        if args.layers < 3:  # reductions sit at layers // 3 and 2 * layers // 3: fewer leave no normal cell
            raise CLIError(f"--layers {args.layers} leaves no normal cell to search; use at least 3")
        if args.init_channels % args.partial_channels or (args.init_channels // args.partial_channels) % 2:
            raise CLIError(f"--partial_channels {args.partial_channels} must divide --init_channels "
                           f"{args.init_channels} into an even width")

    def supernet(self, args, info, estimator) -> nn.Module:
        from model_search import Network
        return Network(args.init_channels, info.num_classes, args.layers, args.primitives, info.in_channels,
                       estimator, partial_channels=args.partial_channels)

    def costs(self, args, info, estimator):
        from model import CellCosts
        return CellCosts(args.primitives, info, args.eval_channels, args.eval_layers, estimator)

    def project(self, genotype, model, args, costs, actions: List[str]):
        from derivation import project_genotype
        return project_genotype(genotype, model.derivation_weights(), args.primitives, costs, args.energy_budget,
                                args.max_skip, args.min_parametric, actions)

    def guarded_cell(self, genotype) -> List[Tuple[str, int]]:
        """The (op, input) pairs the guards, the statistics and early stopping look at."""
        return list(genotype.normal)

    def collapse_view(self, genotype):
        return genotype

    def energy_mj(self, genotype, info, channels: int, layers: int, estimator) -> float:
        from model import genotype_energy_mj
        return genotype_energy_mj(genotype, info, channels, layers, estimator)

    def network(self, genotype, channels: int, info, layers: int, auxiliary: bool = False,
                imagenet: bool = False) -> nn.Module:
        from model import build_network
        return build_network(genotype, channels, info.num_classes, layers, auxiliary, info.in_channels,
                             info.image_size, imagenet=imagenet)

    def to_dict(self, genotype, primitives=None, meta=None) -> Dict[str, Any]:
        import genotypes as G
        return G.to_dict(genotype, primitives, meta)

    def from_dict(self, data: Any, where: str = "genotype"):
        import genotypes as G
        return G.from_dict(data, where)

    def save(self, genotype, path: str, primitives, meta: Dict[str, Any]) -> None:
        import genotypes as G
        G.save(genotype, path, primitives, meta)

    def load(self, path: str):
        """(genotype, meta) of a genotype file."""
        import genotypes as G
        return G.load_with_meta(path)

    def resolve(self, genotype: Optional[str], arch: Optional[str]):
        """(genotype, meta) of train.py's --genotype FILE or --arch NAME."""
        import genotypes as G
        return self.load(genotype) if genotype else (G.named_genotype(arch), {})

    def render(self, genotype, out_dir: str, info, channels: int, layers: int, estimator, backend: str = "auto",
               name: str = "") -> List[str]:
        from model import op_energies
        from plumbing import cell_diagrams
        energies = op_energies(genotype, info, channels, layers, estimator)[0]
        return cell_diagrams.render(genotype, energies, out_dir, channels, layers, backend, name)

    def edge_labels(self) -> Optional[List[str]]:
        return None  # plots.py's default: DARTS's edges

    def describe(self, genotype) -> str:
        return str(genotype)


class NB201Space:
    """NAS-Bench-201's space: a genotype is an arch string's 6 ops (nb201.Arch)."""

    name = "nb201"
    default_primitives = "nb201"
    guarded_ops = 6

    def parse_primitives(self, spec: str) -> List[str]:
        from nb201 import space as nb201
        if spec == "nb201":
            return list(nb201.PRIMITIVES)
        return nb201.check_primitives([s.strip() for s in spec.split(",") if s.strip()])

    def check(self, args) -> None:
        if args.init_channels % args.partial_channels:
            raise CLIError(f"--partial_channels {args.partial_channels} must divide --init_channels "
                           f"{args.init_channels}")

    def supernet(self, args, info, estimator) -> nn.Module:
        from nb201 import space as nb201
        return nb201.Supernet(args.init_channels, info.num_classes, args.layers, args.primitives, info.in_channels,
                              estimator, partial_channels=args.partial_channels)

    def costs(self, args, info, estimator):
        from nb201 import pricing as nb201_energy
        return nb201_energy.CellCosts(args.primitives, info, estimator, args.eval_channels, args.eval_layers)

    def project(self, genotype, model, args, costs, actions: List[str]):
        from nb201 import space as nb201
        from nb201 import pricing as nb201_energy
        return nb201.format_arch(nb201_energy.project_to_budget(
            genotype, model.derivation_weights()["cell"], args.primitives, costs, args.energy_budget, args.max_skip,
            args.min_parametric, actions))

    def guarded_cell(self, genotype) -> List[Tuple[str, int]]:
        from nb201 import space as nb201
        return nb201.pairs(genotype)

    def collapse_view(self, genotype):
        from nb201 import space as nb201
        return nb201.collapse_view(genotype)

    def energy_mj(self, genotype, info, channels: int, layers: int, estimator) -> float:
        from nb201 import pricing as nb201_energy
        return nb201_energy.network_energy_mj(genotype, info, estimator, channels, layers)

    def network(self, genotype, channels: int, info, layers: int, auxiliary: bool = False,
                imagenet: bool = False) -> nn.Module:
        from nb201 import space as nb201
        if auxiliary or imagenet:
            raise CLIError("--space nb201 trains NB201's own skeleton: no --auxiliary, no --dataset imagenet")
        return nb201.NB201Network(genotype, channels, layers, info.num_classes, info.in_channels)

    def to_dict(self, genotype, primitives=None, meta=None) -> Dict[str, Any]:
        from nb201 import space as nb201
        return nb201.to_dict(genotype, primitives, meta)

    def from_dict(self, data: Any, where: str = "genotype"):
        from nb201 import space as nb201
        return nb201.from_dict(data, where)

    def save(self, genotype, path: str, primitives, meta: Dict[str, Any]) -> None:
        from nb201 import space as nb201
        nb201.save(genotype, path, primitives, meta)

    def load(self, path: str):
        from nb201 import space as nb201
        return nb201.load(path)

    def resolve(self, genotype: Optional[str], arch: Optional[str]):
        from nb201 import space as nb201
        if arch:
            raise CLIError("--space nb201 takes the cell as --genotype ARCH_STRING or a genotype.json, not --arch")
        return nb201.resolve(genotype)

    def render(self, genotype, out_dir: str, info, channels: int, layers: int, estimator, backend: str = "auto",
               name: str = "") -> List[str]:
        from nb201 import pricing as nb201_energy
        return nb201_energy.render(genotype, out_dir, info, estimator, channels, layers, backend, name)

    def edge_labels(self) -> Optional[List[str]]:
        from nb201 import space as nb201
        return [nb201.edge_name(e) for e in range(len(nb201.EDGES))]

    def describe(self, genotype) -> str:
        from nb201 import space as nb201
        return nb201.format_arch(genotype)


SPACES = {s.name: s for s in (DartsSpace(), NB201Space())}
assert tuple(SPACES) == SPACE_NAMES, "register a new space in plumbing.options.SPACE_NAMES (its flags) too"


def get(name: str):
    """The space called `name`."""
    try:
        return SPACES[name]
    except KeyError:
        raise CLIError(f"unknown search space {name!r}; valid: {', '.join(SPACE_NAMES)}") from None


def space_of_genotype(spec: Optional[str]) -> Optional[str]:
    """The space a --genotype names by itself: an NB201 arch string, or a genotype.json with a "space" key."""
    if not spec:
        return None
    if spec.strip().startswith("|"):
        return "nb201"
    if os.path.isfile(spec):
        from plumbing import jsonfile
        try:
            data = jsonfile.read(spec, "genotype file")
        except CLIError:
            return None  # the space's own loader reports the problem
        space = data.get("space") if isinstance(data, dict) else None
        return space if isinstance(space, str) else None
    return None


def energy_network(space: str, genotype: Any, input_shape: Sequence[int], num_classes: int = 10,
                   channels: Optional[int] = None, layers: Optional[int] = None,
                   reference: bool = False) -> nn.Module:
    """The evaluation network of `genotype` in `space`, in eval mode, for an input of `input_shape` (C, H, W) or
    (N, C, H, W). darts: a genotype.json object (dict) or a named genotype (str); width and depth from its meta
    (`eval_channels`, `eval_layers`) unless given, else DARTS's 36 / 20. nb201: an NB201 arch string; 16 channels
    and 5 cells per stage unless given. `reference`: the network as the space's reference code runs it (nb201:
    NAS-Bench-201's, which executes `none` edges; darts: DARTS's code builds the same network). Bad input is a
    CLIError naming what is wrong."""
    shape = tuple(int(v) for v in input_shape)[-3:]
    if len(shape) != 3 or min(shape) < 1:
        raise CLIError(f"input shape {tuple(input_shape)} is not (C, H, W) or (N, C, H, W) with positive sizes")
    in_channels, size = shape[0], shape[1]
    if space == "darts":
        import genotypes as G
        from plumbing import options
        from model import build_network
        if isinstance(genotype, str):
            g, meta = G.named_genotype(genotype), {}
        else:
            g = G.from_dict(genotype, where="genotype")
            meta = genotype.get("meta") if isinstance(genotype.get("meta"), dict) else {}
        table = options.defaults_for("train", "cifar10")  # DARTS's evaluation network
        C = channels or _int(meta.get("eval_channels"), table["init_channels"])
        L = layers or _int(meta.get("eval_layers"), table["layers"])
        return build_network(g, C, num_classes, L, False, in_channels, size).eval()
    if space == "nb201":
        from nb201 import space as nb201
        return nb201.energy_network(genotype, in_channels, num_classes, channels, layers, reference).eval()
    raise CLIError(f"unknown search space {space!r}; valid: {', '.join(SPACE_NAMES)}")


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
