"""NES: the shared query-attack suite (advframe.testing.QueryAttackTests) plus its own checks."""

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import advframe_nes
from advframe import PluginError
from advframe.cost import QueryCounter
from advframe.testing import QueryAttackTests


class TestNes(QueryAttackTests):
    module, name = advframe_nes, "nes"
    settings: ClassVar[dict] = {"samples": 20}
    iteration_queries = 20 + 1  # the estimate's samples and the check at the new iterate
    start_settings: ClassVar[dict] = {"samples": 2}  # budget 5: clean, x + init, then one iteration of 3

    def test_gradient_estimate_points_along_the_true_gradient(self, trained):
        net, _, inputs, labels = trained
        x, y = inputs[:4], labels[:4]
        counter = QueryCounter(net, len(x))
        estimate, _ = advframe_nes.estimate_gradient(counter, x, y, torch.arange(len(x)), 200, 0.001, False,
                                                     torch.Generator().manual_seed(0))
        assert torch.all(counter.counts == 200)
        x = x.clone().requires_grad_(True)
        true, = torch.autograd.grad(F.cross_entropy(net(x), y, reduction="sum"), x)
        cosine = F.cosine_similarity(estimate.flatten(1), true.flatten(1), dim=1)
        assert cosine.mean() > 0.3

    def test_odd_samples_are_a_user_error(self, trained):
        with pytest.raises(PluginError, match="even"):
            self.attack(trained, samples=5)
