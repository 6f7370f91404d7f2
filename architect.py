"""Bilevel updates of the architecture weights (alphas), first order and second order (DARTS).

The architecture objective on a validation batch is
    total = task_weight * task_normalized + energy_weight * energy_normalized
with task_normalized = cross-entropy / ln(num_classes) (about 1 for a uniform guess) and
energy_normalized = (E(alpha) - E_min) / (E_max - E_min) in [0, 1] (see model_search.py). The weights' own
(inner) loss is the plain cross-entropy on a training batch: the energy does not depend on the weights.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dl_energy_estimator.trace import autocast_off


DARTS_ARCH_LR = 3e-4  # DARTS's Adam on the alphas, CIFAR-10 ...
DARTS_ARCH_STEPS = 50 * 391  # ... over 50 epochs of ceil(25,000 / 64) steps


def arch_lr_for_steps(steps_per_epoch: int, epochs: int) -> float:
    """The alphas' learning rate that lets them travel as far as in DARTS's CIFAR-10 search (3e-4 over 19,550
    steps): Adam moves each alpha by at most about lr per step, so a search of few steps (a small data set or
    --subset) at 3e-4 leaves the alphas at their initial values and neither the task nor the energy term can steer
    them (Fashion-MNIST, 2,000 images, 160 steps: alpha entropy 1.609 of 1.609 after the search, expected energy
    flat; bench/README.md, "Outcome study"). train_search.py uses it where the data set's defaults leave
    --arch_learning_rate at None (resolved once the loaders exist, so args.json records it)."""
    return DARTS_ARCH_LR * DARTS_ARCH_STEPS / max(1, steps_per_epoch * epochs)


class Architect:
    """Adam on the alphas (betas (0.5, 0.999)), as DARTS; `unrolled` for the second-order step."""

    def __init__(self, model, *, arch_learning_rate: float = 3e-4, arch_weight_decay: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 3e-4, task_weight: float = 0.9,
                 energy_weight: float = 0.05, unrolled: bool = False, grad_hook=None,
                 autocast=contextlib.nullcontext) -> None:
        self.model = model
        # Sees gradients before they are used (torchrun: averages them across ranks): the alphas' before Adam's
        # step, and in the unrolled step the inner gradients w' and the Hessian-vector product are built from.
        self.grad_hook = grad_hook
        self.autocast = autocast  # --amp: the context of the first-order step's forward and loss
        self.network_momentum = momentum
        self.network_weight_decay = weight_decay
        self.task_weight = task_weight
        self.energy_weight = energy_weight
        self.unrolled = unrolled
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=arch_learning_rate, betas=(0.5, 0.999),
                                          weight_decay=arch_weight_decay)

    def set_hyperparameters(self, learning_rate: float, weight_decay: float) -> None:
        """New learning rate and weight decay of the alphas' Adam (a resume that overrides them)."""
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = learning_rate, weight_decay

    # --------------------------------------------------------------------------------------------- losses
    def normalized_energy(self, energy: torch.Tensor) -> torch.Tensor:
        lo, hi = self.model.energy_bounds()
        if hi <= lo:  # every derivable cell costs the same: nothing to trade
            return energy * 0.0
        return (energy - lo) / (hi - lo)

    def objective(self, logits: torch.Tensor, energy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The architecture loss of one batch from the network's outputs."""
        task = F.cross_entropy(logits, target)
        task_n = task / math.log(logits.shape[1])
        energy_n = self.normalized_energy(energy)
        return self.task_weight * task_n + self.energy_weight * energy_n

    def _val_loss(self, model_out, target) -> torch.Tensor:
        logits, energy = model_out
        return self.objective(logits, energy, target)

    # ----------------------------------------------------------------------------------------------- step
    def step(self, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor,
             eta: float, network_optimizer: Optional[torch.optim.Optimizer] = None) -> torch.Tensor:
        """One update of the alphas; `eta` is the weights' current learning rate (used by the unrolled step).
        Returns the architecture loss as a 0-dim tensor on the device (reading it would stall the step)."""
        self.optimizer.zero_grad(set_to_none=True)
        arch = self.model.arch_parameters()
        if self.unrolled:
            with autocast_off():  # finite differences of size ~1e-2/||v|| do not survive bf16, whatever --amp says
                loss, grads = self._unrolled_gradients(x_train, y_train, x_valid, y_valid, eta, network_optimizer)
        else:
            with self.autocast():
                loss = self._val_loss(self.model(x_valid), y_valid)
            grads = torch.autograd.grad(loss, arch)
        for p, g in zip(arch, grads):
            p.grad = g
        if self.grad_hook is not None:
            self.grad_hook([p.grad for p in arch])
        self.optimizer.step()
        return loss.detach()

    # ----------------------------------------------------------------------------------- second order
    def _weights(self) -> List[Tuple[str, torch.nn.Parameter]]:
        arch = {id(p) for p in self.model.arch_parameters()}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) not in arch]

    def _scratch_statistics(self) -> Dict[str, torch.Tensor]:
        """Stand-ins for the running statistics and counter of every BatchNorm in training mode, so that the
        unrolled forward does not move the real model's. In training mode BatchNorm only writes them (it
        normalizes with the batch's own statistics), so they are allocated once and never copied: no per-step
        clone of any buffer. BatchNorms in eval mode read their statistics and write none: they keep their own."""
        scratch = self.__dict__.setdefault("_scratch", {})
        out = {}
        for m, mod in self.model.named_modules():
            if not (isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.training
                    and mod.track_running_stats):
                continue
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                real = getattr(mod, b)
                name = f"{m}.{b}" if m else b
                have = scratch.get(name)
                if have is None or have.shape != real.shape or have.device != real.device:
                    have = scratch[name] = torch.zeros_like(real)
                out[name] = have
        return out

    def inner_gradients(self, x: torch.Tensor, y: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """dL_train/dw of the weights `params` on a training batch (zeros for a weight the loss does not reach):
        the inner problem's gradient that the unrolled step is built on."""
        logits, _ = self.model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]

    def unrolled_weights(self, x: torch.Tensor, y: torch.Tensor, eta: float,
                         network_optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, torch.Tensor]:
        """w' = w - eta * (momentum + dL_train/dw + wd * w): one SGD step of the weights, as DARTS unrolls it
        (multi-tensor operators: a handful of kernels for all the weights, not several per weight)."""
        named = self._weights()
        params = [p for _, p in named]
        grads = self._shared(self.inner_gradients(x, y, params))
        with torch.no_grad():
            d = torch._foreach_mul(params, self.network_weight_decay)
            torch._foreach_add_(d, grads)
            state = network_optimizer.state if network_optimizer is not None else {}
            with_buf = [(i, state[p]["momentum_buffer"]) for i, p in enumerate(params)
                        if state.get(p, {}).get("momentum_buffer") is not None]
            if with_buf:
                moved = torch._foreach_mul([b for _, b in with_buf], self.network_momentum)
                torch._foreach_add_([d[i] for i, _ in with_buf], moved)
            torch._foreach_mul_(d, eta)
            w_prime = torch._foreach_sub(params, d)
        return {name: w.requires_grad_(True) for (name, _), w in zip(named, w_prime)}

    def _unrolled_gradients(self, x_train, y_train, x_valid, y_valid, eta, network_optimizer):
        """The second-order step's loss and alpha gradients: dL_val(w', alpha)/dalpha - eta * (Hessian-vector
        product of the training loss with dL_val/dw')."""
        w_prime = self.unrolled_weights(x_train, y_train, eta, network_optimizer)
        arch = self.model.arch_parameters()
        out = functional_call(self.model, {**w_prime, **self._scratch_statistics()}, (x_valid,))
        loss = self._val_loss(out, y_valid)
        wp = list(w_prime.values())
        grads = torch.autograd.grad(loss, arch + wp, allow_unused=True)
        dalpha = [g if g is not None else torch.zeros_like(a) for g, a in zip(grads[:len(arch)], arch)]
        vector = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads[len(arch):], wp)]
        vector = self._shared(vector)
        implicit = self.hessian_vector_product(vector, x_train, y_train)
        torch._foreach_mul_(implicit, eta)
        return loss, torch._foreach_sub(dalpha, implicit)

    def _shared(self, grads) -> list:
        """Inner gradients of the unrolled step as every rank must use them: under torchrun averaged across ranks
        (`grad_hook`), so w' and the Hessian-vector product are those of the global batch; as they are otherwise."""
        grads = list(grads)
        if self.grad_hook is not None:
            self.grad_hook(grads)
        return grads

    def hessian_vector_product(self, vector: List[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                               r: float = 1e-2) -> List[torch.Tensor]:
        """d/dalpha (dL_train/dw . v) by central finite differences: (g(w + R v) - g(w - R v)) / (2 R),
        R = r / ||v||, g = dL_train/dalpha (DARTS; note the division by 2R, not `/2.*R`).

        The weights w +- R v are new tensors run through `functional_call`: the real weights are never moved
        and put back (no rounding drift, identical on every torchrun rank), and ||v|| stays on the device (a
        zero v gives R v = 0, so both sides agree and the product is 0, with no host sync to test for it)."""
        named = self._weights()
        params = [p for _, p in named]
        arch = self.model.arch_parameters()
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(vector)))
            R = r / norm.clamp_min(1e-30)
            Rv = torch._foreach_mul(vector, R)
            sides = (torch._foreach_add(params, Rv), torch._foreach_sub(params, Rv))

        def grad_alpha(weights: List[torch.Tensor]) -> List[torch.Tensor]:
            logits, _ = functional_call(self.model, {n: w for (n, _), w in zip(named, weights)}, (x,))
            g = torch.autograd.grad(F.cross_entropy(logits, y), arch, allow_unused=True)
            return [gi if gi is not None else torch.zeros_like(a) for gi, a in zip(g, arch)]

        grads_p, grads_n = (grad_alpha(w) for w in sides)
        diff = torch._foreach_sub(grads_p, grads_n)
        torch._foreach_div_(diff, 2 * R)
        return diff


# ------------------------------------------------ the energy weight over the search: ramp and budget
def energy_scale(epoch: int, warmup_epochs: int, ramp_epochs: int) -> float:
    """The energy weight's share in `epoch` (0-based): 0 during the warm-up, then a linear ramp over
    `ramp_epochs` (1 without one)."""
    if epoch < warmup_epochs:
        return 0.0
    return min(1.0, (epoch - warmup_epochs + 1) / ramp_epochs) if ramp_epochs else 1.0


class BudgetController:
    """Energy budget as a constraint, E_derived <= budget, with a Lagrange multiplier: after each measurement of
    the derived network's energy, lambda <- clip(lambda + rate * (E / budget - 1), 0, max_lambda). lambda
    multiplies the normalized expected energy in the alphas' objective, so it rises while the derived cell is
    over budget and decays to 0 (no energy pressure at all) while it is under: only excess energy is penalized.
    The derived energy is measured directly (not mapped from the supernet's expected energy, whose widths and
    depth differ from the network train.py builds)."""

    def __init__(self, budget_mj: float, rate: float = 0.02, lam: float = 0.0, max_lambda: float = 10.0) -> None:
        if budget_mj <= 0:
            raise ValueError("the energy budget must be positive")
        self.budget_mj, self.rate, self.lam, self.max_lambda = budget_mj, rate, lam, max_lambda

    def update(self, energy_mj: float) -> float:
        """One multiplier step from a measured derived energy (mJ per image); returns the new lambda."""
        self.lam = min(self.max_lambda, max(0.0, self.lam + self.rate * (energy_mj / self.budget_mj - 1.0)))
        return self.lam

    def state_dict(self) -> Dict[str, Any]:
        return {"lam": self.lam}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        lam = state.get("lam")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= self.max_lambda:
            raise ValueError(f"lambda {lam!r} is not a number in [0, {self.max_lambda}]")
        self.lam = float(lam)
