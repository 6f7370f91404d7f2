"""EnergyEstimator: joules per input sample of a forward pass, from traced per-layer features."""
from __future__ import annotations

import copy
import datetime as _dt
import math
import os
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import schema
from .defaults import FAMILIES, FEATURES, analytical_coefficients
from .features import FeaturesFn, LayerFeatures
from .fitting import COLUMNS, design_row, fit_cv, fit_fixed
from .fitting import check_values as fitting_check
from .schema import EnergyModelError
from .trace import check_shape, trace

ANALYTICAL_NAME = "analytical-horowitz45nm-v1"
MAC_FAMILIES = ("conv", "conv_pw", "conv_dw", "conv_dw_dilated", "linear")
NETWORK_LAYERS = 10  # a sample running at least this many kernels is a network: a constant per pass may be fitted


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars -> Python, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


class EnergyEstimator:
    """``E = sum over executed layers of e_mac[t]*MACs + e_mem[t]*bytes + e_call[t]*calls``, per input sample.

    Families ``t``: see :data:`dl_energy_estimator.defaults.FAMILIES`. ``default()`` needs no hardware;
    ``fit()`` calibrates on measurements; ``save``/``load`` use the JSON format of ``schema.py``.
    """

    _registry: dict[type, FeaturesFn] = {}

    def __init__(self, coefficients: dict[str, dict[str, float]], meta: dict, fit: dict | None = None):
        doc = {"format": schema.FORMAT, "coefficients": coefficients, "meta": meta, "fit": fit or {}}
        doc = schema.validate(_clean(copy.deepcopy(doc)), "EnergyEstimator")
        self.coefficients: dict[str, dict[str, float]] = {f: {k: float(v) for k, v in c.items()}
                                                          for f, c in doc["coefficients"].items()}
        self.meta: dict = doc["meta"]
        self.fit_stats: dict = doc["fit"]

    # ------------------------------------------------------------------ construction / files
    @classmethod
    def default(cls, batch_size: int = 1) -> "EnergyEstimator":
        """Hardware-free analytical model (Horowitz 2014 constants; see ``defaults.py``)."""
        meta = {"name": ANALYTICAL_NAME, "device": "analytical (45 nm FP32, Horowitz ISSCC 2014)",
                "driver": "none", "torch": "any", "dtype": "float32",
                "batch_size": int(batch_size), "source": "analytical", "date": "2025-01-01"}
        return cls(analytical_coefficients(), meta, {})

    def to_dict(self) -> dict:
        return {"format": schema.FORMAT, "coefficients": copy.deepcopy(self.coefficients),
                "meta": copy.deepcopy(self.meta), "fit": copy.deepcopy(self.fit_stats)}

    def save(self, path: str | os.PathLike) -> None:
        """Atomic JSON write (temp file in the same folder, fsync, os.replace)."""
        schema.write_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EnergyEstimator":
        """Read and validate a JSON energy model; raises EnergyModelError (a ValueError) naming the problem."""
        doc = schema.read(path)
        try:
            return cls(doc["coefficients"], doc["meta"], doc["fit"])
        except EnergyModelError as e:
            raise EnergyModelError(f"{os.fspath(path)}: {str(e).split(': ', 1)[-1]}") from None

    def sha256(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys, no whitespace)."""
        return schema.sha256(self.to_dict())

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or f"{self.meta['source']}-{self.meta['device']}")

    @property
    def batch_size(self) -> int:
        """Deployment batch size the model was made for (metadata)."""
        return int(self.meta["batch_size"])

    def with_batch_size(self, batch_size: int) -> "EnergyEstimator":
        """This model at another deployment batch size (the coefficients are per sample; launches are shared)."""
        meta = {**self.meta, "batch_size": int(batch_size)}
        return type(self)(self.coefficients, meta, self.fit_stats)

    def __repr__(self) -> str:
        return f"EnergyEstimator(name={self.name!r}, source={self.meta['source']!r}, batch_size={self.batch_size})"

    # ------------------------------------------------------------------ extension point
    @classmethod
    def register(cls, module_type: type, features_fn: FeaturesFn) -> None:
        """Describe a leaf type torch.nn does not name (e.g. a project's ``Zero``).

        ``features_fn(module, inputs, output)`` returns a :class:`LayerFeatures` or a dict with ``family``
        (one of FAMILIES), ``macs``, ``bytes``, ``calls`` for the whole batch. Registered modules are leaves:
        their children and functional ops are not traced separately.
        """
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError("register() needs an nn.Module subclass")
        if not callable(features_fn):
            raise TypeError("features_fn must be callable")
        cls._registry[module_type] = features_fn

    # ------------------------------------------------------------------ estimation
    def layer_energy(self, f: LayerFeatures) -> float:
        """Joules of one traced layer (whole batch)."""
        c = self.coefficients[f.family]
        return c["e_mac"] * f.macs + c["e_mem"] * f.bytes + c["e_call"] * f.calls

    def trace(self, module: nn.Module, input_shape: Sequence[int]) -> list[LayerFeatures]:
        """Features of each executed layer (whole batch) of one forward on zeros of ``input_shape``."""
        return trace(module, input_shape, self._registry)

    def model_energy(self, model: nn.Module, input_shape: Sequence[int]) -> float:
        """Joules per sample of one forward of ``model`` at ``input_shape`` (batch first = deployment batch)."""
        shape = check_shape(input_shape)
        return sum(self.layer_energy(f) for f in self.trace(model, shape)) / shape[0]

    def op_energy(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Joules per sample of one op (any module; calls ``module(x)`` once under hooks)."""
        return self.model_energy(module, input_shape)

    def breakdown(self, model: nn.Module, input_shape: Sequence[int]) -> list[dict]:
        """Per executed layer/op: ``name``, ``type`` (family), ``macs``, ``bytes``, ``energy_mj`` (per sample)."""
        shape = check_shape(input_shape)
        B = shape[0]
        return [{"name": f.name, "type": f.family, "macs": int(round(f.macs / B)), "bytes": int(round(f.bytes / B)),
                 "energy_mj": 1e3 * self.layer_energy(f) / B} for f in self.trace(model, shape)]

    def count_macs(self, model: nn.Module, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates per sample of the conv and linear layers that run (what papers call MACs; the
        elementary ops of BN/ReLU/pooling/adds, which ``breakdown`` also lists under ``macs``, are left out)."""
        shape = check_shape(input_shape)
        return int(round(sum(f.macs for f in self.trace(model, shape) if f.family in MAC_FAMILIES) / shape[0]))

    def elementwise_energy(self, shape: Sequence[int], n_operands: int) -> float:
        """Joules per sample of summing ``n_operands`` tensors of ``shape`` (batch first), as n-1 pairwise adds
        (read two, write one, one kernel each) -- the same as a traced ``a + b + ...``."""
        shape = check_shape(shape)
        if int(n_operands) != n_operands or n_operands < 1:
            raise ValueError(f"n_operands must be a positive integer, got {n_operands!r}")
        numel = math.prod(shape)
        n = int(n_operands) - 1
        f = LayerFeatures("elementwise", n * numel, n * 3 * numel * 4, n)
        return self.layer_energy(f) / shape[0]

    def family_features(self, module: nn.Module, input_shape: Sequence[int]) -> dict[str, np.ndarray]:
        """Per-sample [MACs, bytes, calls] summed per family over one forward."""
        shape = check_shape(input_shape)
        out: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(FEATURES)))
        for f in self.trace(module, shape):
            out[f.family] += np.array([f.macs, f.bytes, f.calls]) / shape[0]
        return dict(out)

    # ------------------------------------------------------------------ calibration
    def fit(self, samples: Iterable[tuple[nn.Module, Sequence[int], float]], ridge: float | None = None,
            meta: dict | None = None, seed: int = 0, constant: bool | None = None,
            prior: str | None = None) -> "EnergyEstimator":
        """A new estimator fitted to ``(module, input_shape, joules_per_sample)`` samples (ops and/or whole
        networks). This estimator's coefficients are the prior; the model's complexity is chosen by seeded
        cross-validation (``ridge`` given: the per family x feature model at that ridge instead); see ``fitting.py``.

        ``constant``: whether a constant per forward pass (not part of the per-layer model; reported in
        ``fit_stats["intercept_mj"]``) may be fitted; None: only when every sample runs at least
        ``NETWORK_LAYERS`` layers (whole networks, not single ops). ``prior``: start from the prior bank instead
        of this estimator's coefficients (``"auto"``: the bank's best entry for these samples, or a name of
        ``priors.names()``, or ``"analytical"``; see ``priors.py``)."""
        feats, y = [], []
        for module, shape, joules in samples:
            feats.append(self.family_features(module, shape))
            y.append(float(joules))
        return self.fit_features(feats, y, ridge=ridge, meta=meta, seed=seed, constant=constant, prior=prior)

    def design(self, feats: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        """Design matrix of the fit: the prior's joules per (family, feature) column, one row per sample."""
        return np.array([design_row(f, self.coefficients) for f in feats]).reshape(len(feats), len(COLUMNS))

    def fit_features(self, feats: Sequence[dict[str, np.ndarray]], y: Sequence[float], ridge: float | None = None,
                     meta: dict | None = None, seed: int = 0, constant: bool | None = None,
                     prior: str | None = None, exclude_priors: Sequence[str] = (), report: bool = True
                     ) -> "EnergyEstimator":
        """Like :meth:`fit`, from precomputed per-sample :meth:`family_features` (at this model's batch size).
        ``exclude_priors``: bank entries ``prior="auto"`` may not pick (judging the bank on a device it holds);
        ``report``: cross-validate the candidates for ``fit_stats["candidates"]`` (off: faster, same model)."""
        y_arr = np.asarray(y, dtype=float)
        if constant is None:
            layers = [sum(float(v[2]) for v in f.values()) * self.batch_size for f in feats]
            constant = bool(layers) and min(layers) >= NETWORK_LAYERS
        if prior is not None:
            from . import priors
            choice: list = []
            name = prior
            if prior == "auto":
                fitting_check(y_arr)
                name, choice = priors.choose(feats, y_arr, constant, exclude_priors)
            start = type(self)(priors.coefficients(name), {**self.meta, "name": f"prior-{name}"}, {})
            fitted = start.fit_features(feats, y_arr, ridge=ridge, meta=meta, seed=seed, constant=constant,
                                        report=report)
            fitted.fit_stats.update({"prior": name, "prior_choice": choice})
            return type(self)(fitted.coefficients, fitted.meta, fitted.fit_stats)
        A = self.design(feats)
        m, _, stats = (fit_cv(A, y_arr, seed=seed, constant=constant, report=report) if ridge is None
                       else fit_fixed(A, y_arr, ridge))
        coef = {fam: dict(c) for fam, c in self.coefficients.items()}
        for j, (fam, k) in enumerate(COLUMNS):
            coef[fam][FEATURES[k]] = float(self.coefficients[fam][FEATURES[k]] * m[j])
        new_meta = dict(self.meta)
        new_meta.update({"name": f"fitted-{self.meta['source']}", "date": _dt.date.today().isoformat()})
        new_meta.update(meta or {})
        stats.update({"n_samples": len(y_arr), "prior": self.name,
                      "intercept_mj": 1e3 * stats.pop("intercept_j"),
                      "multipliers": {fam: [float(m[j]) for j, (f2, _) in enumerate(COLUMNS) if f2 == fam]
                                      for fam in FAMILIES}})
        return EnergyEstimator(coef, new_meta, stats)

    def predict_features(self, feats: dict[str, np.ndarray]) -> float:
        """Joules per sample from per-sample family features."""
        return float(sum(v[0] * self.coefficients[f]["e_mac"] + v[1] * self.coefficients[f]["e_mem"]
                         + v[2] * self.coefficients[f]["e_call"] for f, v in feats.items()))
