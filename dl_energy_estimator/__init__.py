"""dl_energy_estimator: energy (joules per input sample) of PyTorch modules, analytical or calibrated.

    from dl_energy_estimator import EnergyEstimator, measure
    est = EnergyEstimator.default()
    est.model_energy(model, (1, 3, 32, 32))

Imports nothing from the surrounding project (torch, numpy, scipy, tqdm; zeus lazily).
"""
from .defaults import FAMILIES
from .estimator import EnergyEstimator
from .features import LayerFeatures
from .measure import EnergyCounterUnavailable, Measurements, measure
from .schema import EnergyModelError
from .trace import EnergyMemoryError

__all__ = ["EnergyEstimator", "EnergyModelError", "EnergyCounterUnavailable", "EnergyMemoryError", "FAMILIES",
           "LayerFeatures", "Measurements", "measure"]
__version__ = "1.1.0"
