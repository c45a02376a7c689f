"""SimBA: the shared query-attack suite (advframe.testing.QueryAttackTests) plus its own checks."""

import torch

import advframe_simba
from advframe.testing import QueryAttackTests, QueryRecorder


class TestSimba(QueryAttackTests):
    module, name = advframe_simba, "simba"
    # spends its whole budget on a failure (the + probe only where a query is left): the default
    break_cases = ({"norm": "linf", "eps": 0.3, "basis": "pixel"}, {"norm": "l2", "eps": 1.5, "basis": "dct"},
                   {"norm": "l2", "eps": 1.5, "basis": "pixel"})

    def test_one_or_two_queries_per_direction(self, trained):
        """A kept minus-probe costs one query, otherwise the plus-probe follows: rows = clean + probes."""
        inputs = trained[2]
        recorder = QueryRecorder(trained[0])
        self.generate(trained, model=recorder, eps=1.0, norm="l2", budget=15)
        sizes = [len(c) for c in recorder.calls]
        assert sizes[0] == len(inputs)
        assert all(b <= a for a, b in zip(sizes[1::2], sizes[2::2]))  # plus-probes: a subset of minus-probes


def test_dct_basis_is_orthonormal():
    matrix = advframe_simba.dct_matrix(9)
    assert torch.allclose(matrix @ matrix.T, torch.eye(9), atol=1e-5)


def test_orders_visit_low_frequencies_first():
    generator = torch.Generator().manual_seed(0)
    shape = (1, 8, 8)
    reach = torch.maximum(torch.arange(8)[:, None], torch.arange(8)[None, :]).flatten()
    strided = advframe_simba.coordinate_order(3, shape, "dct", "strided", 3, 2, generator)
    assert sorted(strided[0].tolist()) == list(range(64))  # every direction once
    bands = torch.where(reach < 3, 0, 1 + (reach - 3) // 2)[strided]
    assert torch.all(bands[:, 1:] >= bands[:, :-1])  # band by band
    assert not torch.equal(strided[0], strided[1])  # random within a band, per example
    block = advframe_simba.coordinate_order(2, shape, "dct", "random", 3, 2, generator)
    assert block.shape == (2, 9) and torch.all(reach[block] < 3)
    pixels = advframe_simba.coordinate_order(2, shape, "pixel", "strided", 3, 2, generator)
    assert sorted(pixels[0].tolist()) == list(range(64))
