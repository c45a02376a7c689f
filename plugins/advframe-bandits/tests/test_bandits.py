"""Bandits-TD: the shared query-attack suite (advframe.testing.QueryAttackTests) plus its own checks."""

from typing import ClassVar

import pytest
import torch

import advframe_bandits
from advframe.testing import QueryAttackTests


class TestBandits(QueryAttackTests):
    module, name = advframe_bandits, "bandits"
    settings: ClassVar[dict] = {"prior_size": 4}
    iteration_queries = 3  # two finite-difference probes and the check at the new iterate
    targeted_budget = 400


def test_exponentiated_gradient_matches_the_official_step_and_stays_bounded():
    prior = torch.tensor([-0.9, -0.2, 0.0, 0.5, 0.99])
    gradient = torch.tensor([0.3, -0.1, 0.02, 0.5, -0.4])
    real = (prior + 1) / 2
    positive, negative = real * torch.exp(2.0 * gradient), (1 - real) * torch.exp(-2.0 * gradient)
    official = positive / (positive + negative) * 2 - 1
    assert torch.allclose(advframe_bandits.exponentiated_gradient(prior, gradient, 2.0), official, atol=1e-6)
    huge = advframe_bandits.exponentiated_gradient(prior, gradient * 1e6, 100.0)
    assert torch.isfinite(huge).all() and huge.abs().max() <= 1


def test_defaults_follow_the_official_values_per_norm():
    assert advframe_bandits.resolve("linf", eps=0.05, dim=3 * 50 * 50) == {
        "fd_eta": 0.1, "lr": pytest.approx(0.01), "online_lr": 100.0, "exploration": 1.0}
    assert advframe_bandits.resolve("linf", eps=0.2, dim=49)["online_lr"] == pytest.approx(100 * (49 / 7500) ** 0.5)
    assert advframe_bandits.resolve("l2", eps=5.0, dim=49) == {
        "fd_eta": 0.01, "lr": pytest.approx(0.5), "online_lr": 0.1, "exploration": 0.01}
