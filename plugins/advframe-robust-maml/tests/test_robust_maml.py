import math

import advframe_robust_maml as plugin
import pytest
import torch
import torch.nn.functional as F

from advframe import PluginError
from advframe.episodes import EpisodeSampler
from advframe.meta import batch_statistics, functional_forward, inner_loop
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config

NAME = "robust-maml"
# a tiny 5-way few-shot setting: the embedded MNIST few-shot split, a narrow Conv-4
USER = {"data": {"name": "mnist-fewshot", "train_size": 300, "test_size": 150},
        "model": {"name": "conv4", "args": {"width": 8}},
        "meta": {"queries": 3, "tasks_per_epoch": 4, "tasks_per_batch": 2, "test_tasks": 3}}


def make_run(tmp_path, overrides=()):
    host = make_host((plugin, NAME))
    return Run.start(host, tiny_config(host, NAME, list(overrides), USER), tmp_path)


def task_batch(run, count=2, shots=1, seed=0):
    sampler = EpisodeSampler(run.splits.train, run.config["meta"]["ways"], shots, run.config["meta"]["queries"])
    generator = torch.Generator().manual_seed(seed)
    return [sampler.sample(generator) for _ in range(count)]


def step(run, batch):
    run.model.train()
    return run.ctx.call("training_step", NAME, model=run.model, batch=batch,
                        optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)


def test_contract(tmp_path):
    assert_conforms(plugin, NAME, tmp_path, user=USER)


@pytest.mark.parametrize("first_order", [False, True])
def test_with_zero_weight_the_step_is_exactly_mamls(tmp_path, first_order):
    run = make_run(tmp_path / "r", ["plugins.robust-maml.weight=0", "plugins.robust-maml.inner_steps=2",
                                    f"plugins.robust-maml.first_order={first_order}"])
    batch = task_batch(run)
    output = step(run, batch)
    robust = torch.autograd.grad(output["loss"], list(run.model.parameters()))
    assert output["regulariser"] > 0  # the attack ran, with no weight
    settings = run.config["plugins"][NAME]
    losses = []
    for task in batch:  # MAML, written directly on advframe.meta
        params = inner_loop(run.model, task.support, steps=2, lr=settings["inner_lr"], first_order=first_order)
        losses.append(F.cross_entropy(functional_forward(run.model, params, task.query_inputs), task.query_labels))
    maml = torch.autograd.grad(torch.stack(losses).mean(), list(run.model.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(robust, maml))


@pytest.mark.parametrize("regulariser", ["at", "trades"])
def test_the_regulariser_is_computed_at_the_adapted_weights(tmp_path, monkeypatch, regulariser):
    attacked = []
    original = plugin.pgd

    def spy(model, inputs, labels, **kwargs):
        attacked.append((model, inputs, kwargs["loss"]))
        return original(model, inputs, labels, **kwargs)

    monkeypatch.setattr(plugin, "pgd", spy)
    run = make_run(tmp_path / "r", [f"plugins.robust-maml.regulariser={regulariser}", "plugins.robust-maml.weight=3"])
    batch = task_batch(run, count=1)
    output = step(run, batch)
    assert math.isclose(output["loss"].item(), output["clean_loss"] + 3 * output["regulariser"], rel_tol=1e-5)
    (predictor, inputs, loss), task = attacked[0], batch[0]
    assert torch.equal(inputs, task.query_inputs) and loss == ("kl" if regulariser == "trades" else "ce")
    # the attacked module is theta' (the clean inner loop on the support), not the meta-parameters theta
    adapted = inner_loop(run.model, task.support, steps=1, lr=run.config["plugins"][NAME]["inner_lr"], first_order=True)
    with torch.no_grad(), batch_statistics(run.model):
        at_adapted = functional_forward(run.model, adapted, inputs)
        at_meta = run.model(inputs)
        attacked_logits = predictor(inputs)
    assert torch.allclose(attacked_logits, at_adapted, atol=1e-5)
    assert not torch.allclose(attacked_logits, at_meta, atol=1e-3)


def test_a_zero_budget_regulariser_reduces_to_the_clean_loss_and_aq_drops_the_clean_term(tmp_path):
    batch = None
    for regulariser in ("at", "trades"):
        run = make_run(tmp_path / regulariser, ["attack.eps=0", f"plugins.robust-maml.regulariser={regulariser}"])
        batch = batch or task_batch(run)
        output = step(run, batch)
        expected = 0.0 if regulariser == "trades" else output["clean_loss"]  # x' = x
        assert output["regulariser"] == pytest.approx(expected, abs=1e-5)
    run = make_run(tmp_path / "aq", ["plugins.robust-maml.adversarial_querying=true", "plugins.robust-maml.weight=2"])
    output = step(run, batch)
    assert output["loss"].item() == pytest.approx(2 * output["regulariser"], rel=1e-5)
    assert output["regulariser"] > output["clean_loss"]  # the attack raised the query loss


def test_meta_training_sees_more_shots_than_meta_testing_and_adaptation_is_clean(tmp_path, monkeypatch):
    seen = []
    original = plugin.inner_loop

    def spy(model, support, **kwargs):
        seen.append((model.training, len(support[1])))
        return original(model, support, **kwargs)

    monkeypatch.setattr(plugin, "inner_loop", spy)
    run = make_run(tmp_path / "r", ["meta.train_shots=5", "meta.test_shots=1", "plugins.robust-maml.id_examples=100"])
    before = {key: value.clone() for key, value in run.model.state_dict().items()}
    predictor = run.ctx.call("adapt_task", NAME, model=run.model, support=task_batch(run, 1)[0].support)
    assert all(torch.equal(before[key], value) for key, value in run.model.state_dict().items())
    assert not any(value.requires_grad for value in predictor.params.values())
    seen.clear()
    metrics = run.execute()["metrics"]
    ways = run.config["meta"]["ways"]
    assert {size for training, size in seen if training} == {5 * ways}
    assert {size for training, size in seen if not training} == {1 * ways}
    assert 0 <= metrics["robust_accuracy"] <= metrics["clean_accuracy"] <= 1
    assert metrics["id_examples"] == 100


def test_intrinsic_dimension_of_clean_features(tmp_path):
    run = make_run(tmp_path / "r", ["plugins.robust-maml.id_estimator=mle", "plugins.robust-maml.id_examples=120"])
    run.model.eval()
    first = run.ctx.call("evaluate", NAME, model=run.model, dataset=run.splits.test)
    again = run.ctx.call("evaluate", NAME, model=run.model, dataset=run.splits.test)
    assert first == again  # the same images every time
    assert first["intrinsic_dimension"] == first["intrinsic_dimension/mle"]
    width = run.config["model"]["args"]["width"]  # conv4's flat features have `width` dimensions on 28x28
    for estimator in ("twonn", "mle", "pca"):
        assert 0 < first[f"intrinsic_dimension/{estimator}"] <= width + 1
    # the features are the embedding of those images: collapsing it collapses the estimate
    with torch.no_grad():
        for layer in run.model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight[1:] = 0
                layer.bias[1:] = 0
    collapsed = run.ctx.call("evaluate", NAME, model=run.model, dataset=run.splits.test)
    assert collapsed["intrinsic_dimension/pca"] < first["intrinsic_dimension/pca"]
    run.config["plugins"][NAME]["id_examples"] = 0
    assert run.ctx.call("evaluate", NAME, model=run.model, dataset=run.splits.test) == {}


def test_bad_settings_are_one_line_plugin_errors(tmp_path):
    for override, message in [("plugins.robust-maml.regulariser=mart", "regulariser must be one of"),
                              ("plugins.robust-maml.id_estimator=knn", "id_estimator must be one of"),
                              ("plugins.robust-maml.fgsm_step=0", "fgsm_step must be > 0")]:
        run = make_run(tmp_path / override.split(".")[-1].split("=")[0], [override])
        with pytest.raises(PluginError, match=message):
            step(run, task_batch(run))
    run = make_run(tmp_path / "aq", ["plugins.robust-maml.adversarial_querying=true",
                                     "plugins.robust-maml.regulariser=trades"])
    with pytest.raises(PluginError, match="use regulariser=at"):
        step(run, task_batch(run))
