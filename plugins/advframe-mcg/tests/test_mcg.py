"""MCG on scikit-learn's digits: a small CNN target and an MLP surrogate, trained on disjoint halves."""

import advframe_mcg
import pytest
import torch
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import misclassified, project
from advframe.cost import QueryCounter
from advframe.losses import margin
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config

TINY = {"meta_examples": 96, "meta_tasks": 8, "meta_batch": 8, "inner_steps": 2, "pretrain_epochs": 2,
        "transfer_steps": 5, "transforms": 2, "hidden": 32, "context": 8, "width": 8, "samples": 4,
        "cma_popsize": 6, "budget": 40, "chunk": 4, "surrogate_batch": 4}
EPS = 0.2


class RandomSearch:
    """``test-search``: a minimal score-based attack with the query attacks' seeding interface
    (``init``, ``counter``, ``counted``), so these tests need no other plugin."""

    __name__ = "test_mcg.RandomSearch"

    @staticmethod
    @hookimpl
    def default_config():
        return {"budget": 40, "targeted": False}

    @staticmethod
    @hookimpl
    def generate_perturbation(model, inputs, labels, params, ctx):
        n, eps = len(inputs), params["eps"]
        counter = params.get("counter") or QueryCounter(model, n, budget=params["budget"])
        counted = params.get("counted")
        if counted is None:
            counted = ~misclassified(counter(inputs), labels)
        init = params.get("init")
        delta = project(torch.zeros_like(inputs) if init is None else init, inputs, eps)
        every = torch.arange(n)
        success = torch.zeros(n, dtype=torch.bool)
        best = torch.full((n,), float("inf"))
        todo = every[counted.cpu() & (counter.remaining(every) > 0)]
        candidate = delta.clone()
        while len(todo):
            scores = counter(inputs[todo] + candidate[todo], todo)
            loss, won = -margin(scores, labels[todo]), misclassified(scores, labels[todo])
            success[todo[won]] = True
            accept = (loss < best[todo]) | won
            best[todo[accept]] = loss[accept]
            delta[todo[accept]] = candidate[todo[accept]]
            todo = every[counted.cpu() & ~success & (counter.remaining(every) > 0)]
            step = torch.randn(inputs[todo].shape, generator=ctx.generator).sign() * eps / 2
            candidate[todo] = project(delta[todo] + step, inputs[todo], eps)
        ctx.record_queries(counter.counts, success, counted=counted)
        return torch.where(counted.view(-1, 1, 1, 1), inputs + delta, inputs)


class ProbeThenReject(RandomSearch):
    """``test-reject``: queries G's perturbation and then a point of another class (which the target
    gets wrong), and returns the clean input: no point it returns reaches the goal."""

    __name__ = "test_mcg.ProbeThenReject"
    winning_probes = 0

    @staticmethod
    @hookimpl
    def generate_perturbation(model, inputs, labels, params, ctx):
        counter, todo = params["counter"], torch.nonzero(params["counted"]).squeeze(1)
        counter(inputs[todo] + params["init"][todo], todo)
        others = torch.stack([inputs[(labels != labels[i]).nonzero()[0, 0]] for i in todo.tolist()])
        ProbeThenReject.winning_probes += int(misclassified(counter(others, todo), labels[todo]).sum())
        ctx.record_queries(counter.counts, torch.zeros(len(inputs), dtype=torch.bool), counted=params["counted"])
        return inputs


class Counting(nn.Module):
    """The target seen from outside: every row it is asked about, in order."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)

    @property
    def rows(self):
        return sum(len(x) for x in self.seen)


def train(tmp_path_factory, name, model, half):
    host = make_host()
    config = tiny_config(host, None, ["data.train_size=1000", "train.epochs=4", "train.monitor_examples=0"],
                         user={"model": model})
    run = Run.start(host, config, tmp_path_factory.mktemp(name) / "run")
    run.splits.train = run.splits.train.subset(torch.arange(half, len(run.splits.train), 2))
    run.execute()
    return run


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    target = train(tmp_path_factory, "target", {"name": "small-cnn", "args": {"width": 8, "hidden": 32}}, 0)
    surrogate = train(tmp_path_factory, "surrogate", {"name": "mlp", "args": {"hidden": [64]}}, 1)
    return target, surrogate.out_dir


def setup_attack(target, surrogate_dir, tmp_path, **overrides):
    host = make_host((advframe_mcg, "mcg"), (RandomSearch(), "test-search"), (ProbeThenReject(), "test-reject"))
    settings = {**TINY, "surrogate": str(surrogate_dir), **overrides}
    config = tiny_config(host, None, [f"attack.eps={EPS}"], user={"plugins": {"mcg": settings}})
    run = Run.start(host, config, tmp_path / "attack")
    run.model.load_state_dict(target.model.state_dict())
    inputs, labels = run.splits.test.batch(torch.arange(24), run.ctx.device)
    return run.ctx, run.model.eval(), inputs, labels, run.ctx.attack_settings("mcg")


def test_contract(models, tmp_path):
    _, surrogate_dir = models
    assert_conforms(advframe_mcg, "mcg", tmp_path,
                    user={"plugins": {"mcg": {**TINY, "surrogate": str(surrogate_dir), "attack": "none"}}})


def test_missing_surrogate_says_what_to_do(models, tmp_path):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path)
    with pytest.raises(PluginError, match="--surrogate"):
        advframe_mcg.mcg_attack(model, inputs, labels, {**params, "surrogate": None}, ctx)
    with pytest.raises(PluginError, match="linf"):
        advframe_mcg.mcg_attack(model, inputs, labels, {**params, "norm": "l2"}, ctx)


def test_finetuning_changes_the_generator_output_towards_the_surrogate_goal(models, tmp_path):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path, attack="none",
                                                      adapt_surrogate=False, finetune_steps=3, interpolation=1.0)
    ctx.generator.manual_seed(7)
    result = advframe_mcg.mcg_attack(model, inputs, labels, params, ctx)
    counted = result.counted
    assert counted.sum() >= 10
    change = (result.init - result.meta_init).flatten(1).abs().amax(1)
    assert (change[counted] > 1e-4).all(), "per-example fine-tuning left G's perturbation unchanged"
    assert (change[~counted] == 0).all()
    surrogate, _, _ = advframe_mcg.load_surrogate(ctx, params["surrogate"], inputs.device)
    with torch.no_grad():
        before = advframe_mcg.surrogate_margin(surrogate, inputs + result.meta_init, labels, 5.0, False)[counted]
        after = advframe_mcg.surrogate_margin(surrogate, inputs + result.init, labels, 5.0, False)[counted]
    assert after.mean() < before.mean(), "fine-tuning did not lower the surrogate margin"
    ctx.generator.manual_seed(7)  # the same latent draws: only fine-tuning differs
    ablated = advframe_mcg.mcg_attack(model, inputs, labels, {**params, "finetune": False}, ctx)
    assert torch.equal(ablated.init, ablated.meta_init)
    assert torch.equal(ablated.meta_init, result.meta_init), "G was not reset to its meta-parameters"


def test_seeded_attack_starts_at_the_generator_perturbation(models, tmp_path):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path, attack="test-search",
                                                      chunk=24)
    counting = Counting(model)
    result = advframe_mcg.mcg_attack(counting, inputs, labels, params, ctx)
    counted = result.counted
    assert torch.equal(counting.seen[0], inputs)  # the clean query
    assert torch.allclose(counting.seen[1], (inputs + result.init)[counted])  # the seeded attack's first query
    assert (result.queries[counted] >= 2).all()
    first = misclassified(model(inputs + result.init), labels).detach()
    assert torch.equal(result.first_success, first & counted)


@pytest.mark.parametrize("attack", ["test-search", "none", "latent"])
def test_query_counts_are_exact(models, tmp_path, attack):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path, attack=attack)
    records = []
    ctx.record_queries = lambda queries, success, counted=None: records.append((queries, success, counted))
    counting = Counting(model)
    adversarial = ctx.attack(counting, inputs, labels, params)
    queries = torch.cat([r[0] for r in records])
    assert len(queries) == len(inputs), "every example is reported exactly once"
    assert int(queries.sum()) == counting.rows, "reported queries differ from the target's forward rows"
    assert int(queries.max()) <= params["budget"]
    counted = torch.cat([r[2] for r in records])
    assert (queries[~counted] == 1).all() and (queries[counted] >= 2).all()
    assert (adversarial - inputs).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    success = torch.cat([r[1] for r in records])
    with torch.no_grad():
        assert torch.equal(success & counted, misclassified(model(adversarial), labels) & counted)


def test_surrogate_adaptation_moves_the_surrogate_towards_the_target(models, tmp_path):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path, attack="none",
                                                      carry_over=True, surrogate_lr=0.001, mse_scale=1.0,
                                                      surrogate_clip=10.0)
    pristine, _, _ = advframe_mcg.load_surrogate(ctx, params["surrogate"], inputs.device)
    advframe_mcg.mcg_attack(model, inputs, labels, params, ctx)
    state = next(s for s in advframe_mcg._STATES.values() if s.model is model)
    assert len(state.history) > 0 and len(state.clean) > 0
    with torch.no_grad():
        probabilities = model(inputs).softmax(1)
        before = advframe_mcg.mse_to_target(pristine, inputs, probabilities, labels)
        after = advframe_mcg.mse_to_target(state.surrogate, inputs, probabilities, labels)
    assert after < before


def test_success_counts_only_points_the_attack_returns(models, tmp_path):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path, attack="test-reject")
    ProbeThenReject.winning_probes = 0
    result = advframe_mcg.mcg_attack(model, inputs, labels, params, ctx)
    assert ProbeThenReject.winning_probes >= 5, "the probes were meant to reach the goal"
    assert not result.success.any(), "a rejected probe was counted as a success"


def load_surrogate(surrogate_dir):
    """The surrogate model and its training split, as MCG loads them (only ``ctx.host`` is read)."""
    ctx = type("Ctx", (), {"host": make_host((advframe_mcg, "mcg"))})()
    return advframe_mcg.load_surrogate(ctx, str(surrogate_dir), torch.device("cpu"))


def test_flow_likelihood_of_its_training_perturbations_rises(models):
    _, surrogate_dir = models
    surrogate, inputs, labels = load_surrogate(surrogate_dir)
    generator = torch.Generator().manual_seed(0)
    x, y = inputs[:64], labels[:64]
    units = advframe_mcg.transfer_perturbations(surrogate, x, y, eps=EPS, steps=5, momentum=1.0, diversity=0.5,
                                                targeted=False, generator=generator) / EPS
    assert units.abs().max() <= 1 + 1e-6 and units.abs().max() > 0.99
    torch.manual_seed(0)
    flow = advframe_mcg.ConditionalFlow(tuple(x.shape[1:]), transforms=2, hidden=32, context=8, width=8)
    with torch.no_grad():
        before = float(flow.log_prob(units, x).mean())
    history = advframe_mcg.fit_likelihood(flow, x, units, epochs=6, lr=0.003, noise=0.1, generator=generator)
    with torch.no_grad():
        after = float(flow.log_prob(units, x).mean())
    assert history[-1] > history[0] and after > before + 0.1, (before, after, history)


def test_samples_differ_by_latent_and_stay_in_the_ball(models, tmp_path):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path)
    meta, _, _ = advframe_mcg.meta_generator(ctx, params, inputs.device)
    assert len(meta.log_likelihoods) == TINY["pretrain_epochs"]
    x = inputs[:1].expand(16, *inputs.shape[1:])
    latents = 3 * torch.randn(16, meta.features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = advframe_mcg.perturbation(meta, x, latents, EPS)
    assert delta.abs().max() <= EPS + 1e-6
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    distinct = (delta[1:] - delta[:1]).flatten(1).abs().amax(1)
    assert (distinct > 1e-3).all(), "different latents gave the same perturbation"
    with torch.no_grad():  # the flow is invertible: encoding a decoded perturbation gives its latent back
        units = meta.decode(x, latents)
        again = meta.encode(x, units)
    assert torch.allclose(again, latents, atol=1e-3)


def test_latent_search_spends_its_budget_on_cma_candidates(models, tmp_path):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path, attack="latent", budget=30)
    counting = Counting(model)
    result = advframe_mcg.mcg_attack(counting, inputs, labels, params, ctx)
    counted = result.counted
    assert int(result.queries.sum()) == counting.rows
    assert int(result.queries.max()) <= 30
    failed_first = counted & ~result.first_success
    assert failed_first.any()
    # an example G's perturbation did not break either succeeded later or spent the whole budget
    assert ((result.queries[failed_first] == 30) | result.success[failed_first]).all()
    assert (result.queries[failed_first] > 2).all(), "no CMA-ES candidate was queried"
    with torch.no_grad():
        assert torch.equal(result.success & counted, misclassified(model(result.adversarial), labels) & counted)
    assert (result.adversarial - inputs).abs().max() <= EPS + 1e-6


def test_translation_invariant_gradients_change_the_transfer_perturbations(models):
    _, surrogate_dir = models
    surrogate, inputs, labels = load_surrogate(surrogate_dir)
    x, y = inputs[:16], labels[:16]
    runs = [advframe_mcg.transfer_perturbations(surrogate, x, y, eps=EPS, steps=4, momentum=1.0, diversity=0.0,
                                                targeted=False, generator=None, translation=size) for size in (0, 3)]
    assert not torch.equal(runs[0], runs[1])
    for delta in runs:
        assert delta.abs().max() <= EPS + 1e-6 and (x + delta).min() >= 0 and (x + delta).max() <= 1


def test_flow_samples_attack_the_surrogate_better_than_random_signs(models, tmp_path):
    target, surrogate_dir = models
    ctx, model, inputs, labels, params = setup_attack(target, surrogate_dir, tmp_path, meta_examples=400,
                                                      pretrain_epochs=20, pretrain_lr=0.003)
    meta, surrogate, _ = advframe_mcg.meta_generator(ctx, params, inputs.device)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(inputs), meta.features, generator=generator)
    noise = EPS * torch.randn(inputs.shape, generator=generator).sign()
    with torch.no_grad():
        flow = advframe_mcg.surrogate_margin(surrogate, inputs + advframe_mcg.perturbation(meta, inputs, latents, EPS),
                                             labels, 5.0, False)
        random = advframe_mcg.surrogate_margin(surrogate, inputs + project(noise, inputs, EPS), labels, 5.0, False)
    assert flow.mean() < random.mean() - 0.2, (flow.mean(), random.mean())
