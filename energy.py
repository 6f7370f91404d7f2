"""The project's entry to the energy estimator's CLI: the estimator's commands, with the project's networks.

    python energy.py export --out bundle/ --arch DARTS_V2 --channels 16 --layers 8   # what to measure on a device
    python energy.py fit measurements.json --out energy_model.json                     # fit to what it measured
    python energy.py fit --space nb201 --table TABLE.csv --column energy_mj --out energy_model.json
    python energy.py calibrate --device cuda --out energy_model.json
    python energy.py report energy_model.json

`python -m dl_energy_estimator` runs the same commands without the project (layers only: no --genotype / --arch /
--table); here `spaces.energy_network` builds the networks those flags name.
"""
import sys
from typing import Optional, Sequence

import spaces
from dl_energy_estimator import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.main(argv, networks=spaces.energy_network, prog="python energy.py")


if __name__ == "__main__":
    sys.exit(main())
