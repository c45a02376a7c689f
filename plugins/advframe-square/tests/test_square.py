import pytest
import torch
from torch import nn

import advframe_square
from advframe import PluginError
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config

NAME = "square"


class Recorder(nn.Module):
    """Counts the rows of every forward pass and keeps each call's inputs; ``labels_only`` returns argmax."""

    def __init__(self, model, labels_only=False):
        super().__init__()
        self.model, self.labels_only, self.calls = model, labels_only, []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        logits = self.model(x)
        return logits.argmax(1) if self.labels_only else logits

    @property
    def rows(self):
        return sum(len(c) for c in self.calls)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained on digits by the core runner, its context and 48 test images."""
    host = make_host((advframe_square, NAME))
    config = tiny_config(host, None, ["train.epochs=8", "data.train_size=500", "data.test_size=48",
                                      "train.batch_size=64", "train.monitor_examples=0"])
    run = Run.start(host, config, tmp_path_factory.mktemp("trained"))
    run.execute()
    inputs, labels = run.splits.test.batch(torch.arange(48), run.ctx.device)
    return run.model.eval(), run.ctx, inputs, labels


def attack(trained, model=None, records=None, labels=None, **overrides):
    """The attack through ctx.attack (the core checks the ball and [0, 1]); records what it reports."""
    net, ctx, inputs, true_labels = trained
    params = ctx.attack_settings(NAME, **{"eps": 0.3, "budget": 300, **overrides})
    ctx.record_queries = lambda queries, success, counted=None: (records if records is not None else []).append(
        (queries, success, counted))
    return ctx.attack(model or net, inputs, true_labels if labels is None else labels, params)


def test_contract(tmp_path):
    assert_conforms(advframe_square, NAME, tmp_path, overrides=[f"plugins.{NAME}.budget=40"])


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 1.5)])
def test_stays_in_ball_and_box_even_from_a_large_init(trained, norm, eps):
    net, ctx, inputs, labels = trained
    init = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(1)) * 3
    params = ctx.attack_settings(NAME, norm=norm, eps=eps, budget=60, init=init)
    adversarial = advframe_square.generate_perturbation(model=net, inputs=inputs, labels=labels, params=params, ctx=ctx)
    delta = (adversarial - inputs).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 1.5)])
def test_breaks_a_trained_model(trained, norm, eps):
    net, ctx, inputs, labels = trained
    records = []
    adversarial = attack(trained, records=records, norm=norm, eps=eps)
    with torch.no_grad():
        clean = (net(inputs).argmax(1) == labels).float().mean()
        robust = (net(adversarial).argmax(1) == labels).float().mean()
    queries, success, counted = records[0]
    assert clean > 0.8
    assert (success & counted).sum() / counted.sum() > 0.8
    assert robust < clean - 0.5
    with torch.no_grad():  # success is what the model says about the returned point
        assert torch.equal(success[counted], net(adversarial).argmax(1)[counted] != labels[counted])


def test_query_counts_are_exact_and_within_budget(trained):
    net, ctx, inputs, labels = trained
    recorder, records = Recorder(net), []
    attack(trained, model=recorder, records=records, budget=25)
    queries, success, counted = records[0]
    assert recorder.rows == int(queries.sum())
    assert queries.max() <= 25
    assert torch.all(queries[~counted] == 1)  # initially misclassified: only the clean query
    assert torch.all(queries[counted & ~success] == 25)  # failures spend the whole budget


def test_labels_only_model_gets_a_clear_message(trained):
    net = trained[0]
    with pytest.raises(PluginError, match="needs class scores"):
        attack(trained, model=Recorder(net, labels_only=True))


def test_given_init_is_the_starting_point(trained):
    net, ctx, inputs, labels = trained
    recorder = Recorder(net)
    params = ctx.attack_settings(NAME, eps=0.3, budget=5, init=torch.full_like(inputs, 0.1))
    advframe_square.generate_perturbation(model=recorder, inputs=inputs, labels=labels, params=params, ctx=ctx)
    assert torch.equal(recorder.calls[0], inputs)  # the clean query, then the start: x + init, not stripes
    with torch.no_grad():
        counted = net(inputs).argmax(1) == labels
    assert torch.allclose(recorder.calls[1], (inputs[counted] + 0.1).clamp(0, 1))


def test_caller_can_continue_its_own_count(trained):
    """Another method (MCG) passes its counter and which examples to attack: no clean query."""
    from advframe.cost import QueryCounter

    net, ctx, inputs, labels = trained
    recorder, records = Recorder(net), []
    counter = QueryCounter(recorder, len(inputs), budget=30)
    counter(inputs)  # the caller's own query
    attack(trained, model=recorder, records=records, budget=30, counter=counter, init=torch.zeros_like(inputs),
           counted=torch.ones(len(inputs), dtype=torch.bool))
    queries, success, counted = records[0]
    assert torch.equal(queries, counter.counts) and queries.max() <= 30
    assert int(queries.sum()) == recorder.rows
    assert torch.equal(recorder.calls[1], inputs)  # the attack's first query is at x + init (init = 0)


def test_seeded(trained):
    net, ctx, inputs, labels = trained
    outputs = []
    for seed in (3, 3, 4):
        ctx.generator.manual_seed(seed)
        outputs.append(attack(trained, budget=30))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


def test_targeted_successes_reach_the_target(trained):
    net, ctx, inputs, labels = trained
    targets = (labels + 1) % 10
    records = []
    adversarial = attack(trained, records=records, targeted=True, labels=targets, budget=150)
    queries, success, counted = records[0]
    with torch.no_grad():
        predicted = net(adversarial).argmax(1)
    assert success[counted].float().mean() > 0.3
    assert torch.all(predicted[success] == targets[success])


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


def test_bad_settings_are_user_errors(trained):
    with pytest.raises(PluginError, match="budget"):
        attack(trained, budget=0)
    with pytest.raises(PluginError, match="norm"):
        attack(trained, norm="l1")
