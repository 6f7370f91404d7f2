"""Draw the cells of a genotype as PNG and PDF, each edge labelled with its op and the op's estimated energy
(mJ per image) in the network train.py builds from the genotype (plumbing/cell_diagrams.py, nb201/pricing.py draw them).

    python visualize.py log/<run>/genotype.json --out log/<run>/cells     # or --arch DARTS_V2, or an NB201 arch

Uses graphviz's `dot` program when it is installed, matplotlib otherwise (`--backend` to choose).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Callable, List, Optional

import genotypes as G
from plumbing import options
import spaces
from plumbing import utils
from plumbing.cliargs import CLIError, energy_batch_int, fail, size_int


def render_into(out: str, force: bool, render: Callable[[str], List[str]]) -> List[str]:
    """Draw with `render(folder)` into a fresh hidden folder inside `out`, then move the files into `out`: an
    existing file there is replaced only with --force, and a failed drawing leaves `out` as it was."""
    if not out.strip():
        raise CLIError("--out is empty; name the folder for the figures")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out} is a file; name a folder for the figures")
    try:
        os.makedirs(out, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".visualize-", dir=out)
    except OSError as e:
        raise CLIError(f"cannot write into --out {out} ({e.strerror or e})") from None
    try:
        drawn = render(tmp)
        targets = [os.path.join(out, os.path.relpath(p, tmp)) for p in drawn]
        taken = [t for t in targets if os.path.exists(t)]
        if taken and not force:
            raise CLIError(f"--out {out} already holds {', '.join(os.path.basename(t) for t in taken)}; choose "
                           f"another --out, or add --force to replace them")
        for src, dst in zip(drawn, targets):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        return targets
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False,
                                description="Draw a genotype's cells (PNG and PDF) with per-op energies.")
    p.add_argument("genotype", nargs="?", help="genotype.json (--space nb201: or an arch string)")
    p.add_argument("--arch", help=f"a named genotype instead: {', '.join(G.NAMED_GENOTYPES)}")
    p.add_argument("--space", default=None, choices=spaces.SPACE_NAMES,
                   help="search space of the genotype (default: what the genotype says, else darts)")
    p.add_argument("--out", default=None, help="output folder (default: beside the genotype file)")
    p.add_argument("--force", action="store_true", help="replace figures that already exist in --out")
    p.add_argument("--backend", default="auto", choices=["auto", "graphviz", "matplotlib"])
    p.add_argument("--dataset", default=None, help="data set of the network (default: the genotype's, or cifar10)")
    p.add_argument("--init_channels", type=size_int, default=None)
    p.add_argument("--layers", type=size_int, default=None)
    p.add_argument("--energy_model", default=None)
    p.add_argument("--energy_batch_size", type=energy_batch_int, default=None)
    args = p.parse_args(argv)
    try:
        if bool(args.genotype) == bool(args.arch):
            raise CLIError("give a genotype file or --arch NAME (one of them)")
        space = spaces.get(args.space or spaces.space_of_genotype(args.genotype) or "darts")
        genotype, meta = space.resolve(args.genotype, args.arch)
        _, info, channels, layers = options.evaluation_network(meta, args.dataset, args.init_channels, args.layers,
                                                               space.name)
        estimator = utils.load_estimator(args.energy_model, args.energy_batch_size)
        is_file = args.genotype and os.path.isfile(args.genotype)
        out = args.out if args.out is not None else (os.path.dirname(os.path.abspath(args.genotype)) if is_file
                                                     else ".")
        name = args.arch or (os.path.basename(os.path.dirname(os.path.abspath(args.genotype))) if is_file else "")
        for path in render_into(out, args.force, lambda d: space.render(genotype, d, info, channels, layers,
                                                                          estimator, args.backend, name)):
            print(path)
    except CLIError as e:
        p.print_usage(sys.stderr)
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; --out keeps only figures that were complete", code=130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
