"""Run one forward pass of a module on a zero tensor and record what executes.

* Forward hooks on *terminal* modules (registered types, and modules without children) record one
  :class:`LayerFeatures` per call; the tracer does not descend into them. A childless module of an unknown
  type is traced through its functional ops (``x.mul(0.)``, ``a + b``); only if none of them is priced is it
  charged its memory traffic (family ``other``) with one warning per type.
* A ``TorchFunctionMode`` records functional tensor ops (``a + b``, ``sum(...)``, ``torch.cat``, ``x * mask``,
  ``F.relu`` ...) called *outside* terminal modules, as families ``elementwise`` / ``concat`` (or relu, pool, conv
  for functional forms of those layers). Views and indexing are free.
* Tracers nest (a project op may call ``op_energy(self, ...)`` from inside its own first forward while a
  whole-model trace runs): only the innermost active tracer records.

The module is put in eval() for the pass (each submodule's mode restored afterwards), under ``torch.no_grad()``:
no gradients, no BatchNorm running-stat updates.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .features import (BUILTIN, LayerFeatures, PRICED_FUNCS, functional_features, other_features,
                       warn_unknown)

_state = threading.local()


def _stack() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def lookup(module: nn.Module, registry: dict[type, Callable]) -> Callable | None:
    """Features function for a module: registered types first (by MRO), then built-ins."""
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    for types, fn in BUILTIN:
        if isinstance(module, types):
            return fn
    return None


def _as_features(v: Any, default_name: str, op: str) -> LayerFeatures:
    f = v if isinstance(v, LayerFeatures) else LayerFeatures(**v)
    f.name = f.name or default_name
    f.op = f.op or op
    return f


class Tracer(TorchFunctionMode):
    """Records the features of everything a forward pass executes."""

    def __init__(self, registry: dict[type, Callable]):
        super().__init__()
        self.registry = registry
        self.records: list[LayerFeatures] = []
        self.depth = 0              # > 0 while inside a terminal module
        self.names: list[str] = []  # qualified names of the containers being executed
        self._entered: list[bool] = []
        self._counts: dict[str, int] = {}

    def innermost(self) -> bool:
        s = _stack()
        return bool(s) and s[-1] is self

    # ---------------------------------------------------------------- functional ops
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            name = getattr(func, "__name__", "")
            if name in PRICED_FUNCS and self.innermost():
                f = functional_features(name, args, kwargs, out)
                if f is not None:
                    where = self.names[-1] if self.names else ""
                    k = self._counts.get(where + name, 0)
                    self._counts[where + name] = k + 1
                    f.name = f"{where}.{name}#{k}" if where else f"{name}#{k}"
                    self.records.append(f)
        return out

    # ---------------------------------------------------------------- hooks
    def _terminal_pre(self, module, inputs):
        # entered: (recording?, is-unknown-type, records before) -- unknown leaves are traced through their
        # functional ops; only if those are all free does the memory-traffic fallback (and its warning) apply.
        active = self.innermost() and self.depth == 0
        unknown = lookup(module, self.registry) is None
        self._entered.append((active, unknown, len(self.records)))
        if active and not unknown:
            self.depth += 1

    def _terminal_post(self, qname: str, fn: Callable | None):
        def hook(module, inputs, output):
            if not self._entered:
                return
            active, unknown, n0 = self._entered.pop()
            if not active:
                return
            op = type(module).__name__
            if unknown:
                if len(self.records) > n0:  # its functional ops were priced
                    return
                warn_unknown(type(module))
                f = other_features(module, inputs, output)
            else:
                self.depth -= 1
                f = fn(module, inputs, output)
            if f is not None:
                self.records.append(_as_features(f, qname or op, op))
        return hook

    def _container_pre(self, qname: str):
        def hook(module, inputs):
            self.names.append(qname)
        return hook

    def _container_post(self, module, inputs, output):
        if self.names:
            self.names.pop()

    def attach(self, root: nn.Module) -> list:
        handles = []

        def walk(m: nn.Module, qname: str) -> None:
            fn = lookup(m, self.registry)
            children = list(m.named_children())
            registered = any(c in self.registry for c in type(m).__mro__)
            if registered or not children:
                if fn is None:
                    handles.append(m.register_forward_pre_hook(self._container_pre(qname)))
                    handles.append(m.register_forward_hook(self._container_post, always_call=True))
                handles.append(m.register_forward_pre_hook(self._terminal_pre))
                handles.append(m.register_forward_hook(self._terminal_post(qname, fn), always_call=True))
                return
            handles.append(m.register_forward_pre_hook(self._container_pre(qname)))
            handles.append(m.register_forward_hook(self._container_post, always_call=True))
            for cname, c in children:
                walk(c, f"{qname}.{cname}" if qname else cname)

        walk(root, "")
        return handles


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device, torch.float32
    return torch.device("cpu"), torch.float32


def check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape) or any(int(s) != s for s in input_shape):
        raise ValueError(f"input_shape must be positive integers with the batch first, got {tuple(input_shape)}")
    return shape


def trace(module: nn.Module, input_shape: Sequence[int], registry: dict[type, Callable]) -> list[LayerFeatures]:
    """Features of every layer/op executed by one forward of ``module`` on zeros of ``input_shape``."""
    shape = check_shape(input_shape)
    device, dtype = _device_dtype(module)
    modes = [(m, m.training) for m in module.modules()]
    tracer = Tracer(registry)
    handles = tracer.attach(module)
    threads = torch.get_num_threads()
    try:
        module.eval()
        if device.type == "cpu" and threads > 1:
            torch.set_num_threads(1)  # small batch-1 kernels: OpenMP barriers only add latency (ms on busy hosts)
        with torch.no_grad():
            x = torch.zeros(shape, device=device, dtype=dtype)
            _stack().append(tracer)
            try:
                with tracer:
                    module(x)
            finally:
                s = _stack()
                if s and s[-1] is tracer:
                    s.pop()
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return tracer.records
