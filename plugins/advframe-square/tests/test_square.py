"""Square Attack: the shared query-attack suite (advframe.testing.QueryAttackTests) plus its own checks."""

import torch

import advframe_square
from advframe.testing import QueryAttackTests


class TestSquare(QueryAttackTests):
    module, name = advframe_square, "square"
    # spends its whole budget on a failure (one query per iteration): the suite's defaults


def test_schedule_halves_at_the_official_marks():
    p = [advframe_square.p_schedule(0.8, i, 10000) for i in (0, 10, 11, 50, 51, 8001)]
    assert p == [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 512]
    assert advframe_square.p_schedule(0.8, 2, 1000) == 0.4  # rescaled to the budget


def test_l2_candidate_uses_the_whole_radius():
    inputs = torch.full((4, 1, 12, 12), 0.5)
    delta = advframe_square.initial_delta(inputs, 1.0, "l2", torch.Generator().manual_seed(0))
    candidate = advframe_square.l2_step(inputs, delta, 0.1, 1.0, torch.Generator().manual_seed(1))
    assert torch.allclose(candidate.flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(candidate, delta)
