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
no gradients, no BatchNorm running-stat updates; autocast is off (fp32, whatever the caller's mixed precision).

Every feature of the layers this package knows is affine in the batch size (activations scale with it, weights
and kernel calls do not), so a deployment batch above 3 is not allocated: the module is traced at batches 1, 2
and 3, and when the three traces line up and are affine the features at the batch are extrapolated exactly. A
module whose trace is not (control flow on the batch, a registered features function that is not affine) is
traced at the batch itself; if that cannot be allocated, :class:`EnergyMemoryError`.
"""
from __future__ import annotations

import contextlib
import math
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


class EnergyMemoryError(RuntimeError):
    """The input shape (deployment batch) does not fit in this machine's memory for tracing or measuring."""


_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CPU or GPU)."""
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT)


def available_bytes() -> int | None:
    """MemAvailable of Linux (None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(shape: Sequence[int], element_size: int = 4, what: str = "tracing") -> None:
    """Refuse an input whose tensor alone would take over a quarter of the available memory: activations are
    several times the input, and the kernel's out-of-memory killer, unlike an exception, cannot be caught."""
    need = math.prod(shape) * element_size
    avail = available_bytes()
    if avail is not None and need > avail // 4:
        raise EnergyMemoryError(f"{what} at input shape {tuple(shape)} needs more memory than this machine has "
                                f"(input alone {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available); "
                                f"use a smaller batch size")


def _affine(records: list[list[LayerFeatures]]) -> bool:
    one, two, three = records
    if not len(one) == len(two) == len(three):
        return False
    for a, b, c in zip(one, two, three):
        if not (a.family == b.family == c.family and a.name == b.name == c.name):
            return False
        for k in ("macs", "bytes", "calls"):
            va, vb, vc = getattr(a, k), getattr(b, k), getattr(c, k)
            if vb < va or abs((vc - vb) - (vb - va)) > 1e-9 * max(1.0, vc):
                return False
    return True


def trace(module: nn.Module, input_shape: Sequence[int], registry: dict[type, Callable]) -> list[LayerFeatures]:
    """Features of every layer/op executed by one forward of ``module`` on zeros of ``input_shape`` (batches
    above 3 extrapolated from batches 1-3 when exact, see the module's doc)."""
    shape = check_shape(input_shape)
    B = shape[0]
    if B > 3:
        small = [_trace(module, (b,) + shape[1:], registry) for b in (1, 2, 3)]
        if _affine(small):
            out = []
            for a, b in zip(small[0], small[1]):
                f = LayerFeatures(a.family, *(getattr(a, k) + (B - 1) * (getattr(b, k) - getattr(a, k))
                                              for k in ("macs", "bytes", "calls")), name=a.name, op=a.op)
                out.append(f)
            return out
    return _trace(module, shape, registry)


def autocast_off() -> contextlib.ExitStack:
    """Autocast off on the CPU and CUDA (fp32 inside any autocast region). A trace started inside a caller's
    autocast (an op's first forward under mixed precision) then records the fp32 element sizes and kernels the
    energy model is priced in, so mixed precision changes no estimate."""
    stack = contextlib.ExitStack()
    for kind in ("cpu", "cuda"):
        if kind == "cpu" or torch.cuda.is_available():
            stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


def _trace(module: nn.Module, shape: tuple[int, ...], registry: dict[type, Callable]) -> list[LayerFeatures]:
    device, dtype = _device_dtype(module)
    check_fits(shape, torch.empty((), dtype=dtype).element_size())
    modes = [(m, m.training) for m in module.modules()]
    tracer = Tracer(registry)
    handles = tracer.attach(module)
    threads = torch.get_num_threads()
    try:
        module.eval()
        if device.type == "cpu" and threads > 1:
            torch.set_num_threads(1)  # small batch-1 kernels: OpenMP barriers only add latency (ms on busy hosts)
        with torch.no_grad(), autocast_off():
            _stack().append(tracer)
            try:
                x = torch.zeros(shape, device=device, dtype=dtype)
                with tracer:
                    module(x)
            except (MemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
                raise EnergyMemoryError(f"tracing at input shape {shape} ran out of memory; use a smaller batch "
                                        f"size") from None
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
