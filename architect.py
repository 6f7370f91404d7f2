"""Bilevel updates of the architecture weights (alphas), first order and second order (DARTS).

The architecture objective on a validation batch is
    total = task_weight * task_normalized + energy_weight * energy_normalized
with task_normalized = cross-entropy / ln(num_classes) (about 1 for a uniform guess) and
energy_normalized = (E(alpha) - E_min) / (E_max - E_min) in [0, 1] (see model_search.py). The weights' own
(inner) loss is the plain cross-entropy on a training batch: the energy does not depend on the weights.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call


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

    def __init__(self, model, arch_learning_rate: float = 3e-4, arch_weight_decay: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 3e-4, task_weight: float = 0.9,
                 energy_weight: float = 0.05, unrolled: bool = False, grad_hook=None) -> None:
        self.model = model
        self.grad_hook = grad_hook  # sees the alphas' gradients before Adam's step (torchrun: averages them)
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
             eta: float, network_optimizer: Optional[torch.optim.Optimizer] = None) -> float:
        """One update of the alphas; `eta` is the weights' current learning rate (used by the unrolled step)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.unrolled:
            loss = self._backward_unrolled(x_train, y_train, x_valid, y_valid, eta, network_optimizer)
        else:
            loss = self._val_loss(self.model(x_valid), y_valid)
            grads = torch.autograd.grad(loss, self.model.arch_parameters())
            for p, g in zip(self.model.arch_parameters(), grads):
                p.grad = g
        if self.grad_hook is not None:
            self.grad_hook([p.grad for p in self.model.arch_parameters()])
        self.optimizer.step()
        return float(loss.detach())

    # ----------------------------------------------------------------------------------- second order
    def _weights(self) -> List[Tuple[str, torch.nn.Parameter]]:
        arch = {id(p) for p in self.model.arch_parameters()}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) not in arch]

    def _buffers(self) -> Dict[str, torch.Tensor]:
        # Copies, so the unrolled forward does not move the real model's BatchNorm statistics.
        return {n: b.clone() for n, b in self.model.named_buffers()}

    def unrolled_weights(self, x: torch.Tensor, y: torch.Tensor, eta: float,
                         network_optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, torch.Tensor]:
        """w' = w - eta * (momentum + dL_train/dw + wd * w): one SGD step of the weights, as DARTS unrolls it."""
        named = self._weights()
        params = [p for _, p in named]
        logits, _ = self.model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params, allow_unused=True)
        out = {}
        for (name, p), g in zip(named, grads):
            d = (g if g is not None else torch.zeros_like(p)) + self.network_weight_decay * p.detach()
            state = network_optimizer.state.get(p, {}) if network_optimizer is not None else {}
            buf = state.get("momentum_buffer")
            if buf is not None:
                d = d + self.network_momentum * buf
            out[name] = (p.detach() - eta * d).requires_grad_(True)
        return out

    def _backward_unrolled(self, x_train, y_train, x_valid, y_valid, eta, network_optimizer) -> torch.Tensor:
        w_prime = self.unrolled_weights(x_train, y_train, eta, network_optimizer)
        arch = self.model.arch_parameters()
        out = functional_call(self.model, {**w_prime, **self._buffers()}, (x_valid,))
        loss = self._val_loss(out, y_valid)
        names = list(w_prime)
        grads = torch.autograd.grad(loss, arch + [w_prime[n] for n in names], allow_unused=True)
        dalpha = [g if g is not None else torch.zeros_like(a) for g, a in zip(grads[:len(arch)], arch)]
        vector = [g if g is not None else torch.zeros_like(w_prime[n]) for g, n in zip(grads[len(arch):], names)]
        implicit = self.hessian_vector_product(vector, x_train, y_train)
        for a, g, ig in zip(arch, dalpha, implicit):
            a.grad = g - eta * ig
        return loss.detach()

    def hessian_vector_product(self, vector: List[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                               r: float = 1e-2) -> List[torch.Tensor]:
        """d/dalpha (dL_train/dw . v) by central finite differences: (g(w + R v) - g(w - R v)) / (2 R),
        R = r / ||v||, g = dL_train/dalpha (DARTS; note the division by 2R, not `/2.*R`)."""
        params = [p for _, p in self._weights()]
        norm = torch.sqrt(sum((v * v).sum() for v in vector))
        if float(norm) == 0.0:
            return [torch.zeros_like(a) for a in self.model.arch_parameters()]
        R = r / norm
        arch = self.model.arch_parameters()
        saved = [p.detach().clone() for p in params] if self.grad_hook is not None else None

        def grad_alpha() -> List[torch.Tensor]:
            logits, _ = self.model(x)
            g = torch.autograd.grad(F.cross_entropy(logits, y), arch, allow_unused=True)
            return [gi if gi is not None else torch.zeros_like(a) for gi, a in zip(g, arch)]

        with torch.no_grad():
            for p, v in zip(params, vector):
                p.add_(R * v)
        grads_p = grad_alpha()
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.sub_(2 * R * v)
        grads_n = grad_alpha()
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.add_(R * v)
            if self.grad_hook is not None:  # torchrun: w + Rv - 2Rv + Rv rounds differently on each rank (v is
                for p, w in zip(params, saved):  # per rank), so put the exact shared weights back
                    p.copy_(w)
        return [(gp - gn) / (2 * R) for gp, gn in zip(grads_p, grads_n)]
