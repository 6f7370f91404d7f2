"""The alphas' learning rate of the MNISTs' searches follows the search's length (architect.arch_lr_for_steps);
DARTS's CIFAR-10 defaults stay as published."""
import math

import pytest
import torch

from plumbing import options
from architect import DARTS_ARCH_LR, DARTS_ARCH_STEPS, arch_lr_for_steps


def test_darts_cifar10_keeps_its_published_rate_and_the_rule_meets_it_at_its_length():
    for space in ("darts", "nb201"):
        assert options.defaults_for("search", "cifar10", space)["arch_learning_rate"] == 3e-4
        assert options.defaults_for("search", "fashion_mnist", space)["arch_learning_rate"] is None
        assert options.defaults_for("search", "mnist", space)["workers"] == 0
    assert DARTS_ARCH_STEPS == 50 * math.ceil(25000 / 64)
    assert arch_lr_for_steps(391, 50) == pytest.approx(DARTS_ARCH_LR)
    assert arch_lr_for_steps(16, 10) == pytest.approx(3e-4 * 19550 / 160)
    assert arch_lr_for_steps(0, 10) == pytest.approx(3e-4 * 19550)  # a search of no step does not divide by 0


def test_the_alphas_travel_as_far_in_a_short_search_as_in_darts_long_one():
    """Adam on a constant gradient: 160 steps at the rule's rate move an alpha as far as 19,550 steps at 3e-4."""
    def travel(lr, steps):
        a = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([a], lr=lr, betas=(0.5, 0.999))
        for _ in range(steps):
            opt.zero_grad()
            a.sum().backward()
            opt.step()
        return float(a.detach())
    assert travel(arch_lr_for_steps(16, 10), 160) == pytest.approx(travel(3e-4, 1955) * 10, rel=0.01)
