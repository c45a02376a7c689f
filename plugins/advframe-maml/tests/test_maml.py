import advframe_maml
import pytest
import torch
import torch.nn.functional as F

from advframe import PluginError
from advframe.episodes import EpisodeSampler
from advframe.meta import functional_forward, inner_loop
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config

# a tiny 5-way few-shot setting: the embedded MNIST few-shot split, a narrow Conv-4
USER = {"data": {"name": "mnist-fewshot", "train_size": 300, "test_size": 150},
        "model": {"name": "conv4", "args": {"width": 8}},
        "meta": {"queries": 3, "tasks_per_epoch": 4, "tasks_per_batch": 2, "test_tasks": 3}}


def make_run(tmp_path, overrides=(), user=None):
    host = make_host((advframe_maml, "maml"))
    return Run.start(host, tiny_config(host, "maml", list(overrides), user or USER), tmp_path)


def task_batch(run, count=2, shots=1, seed=0):
    sampler = EpisodeSampler(run.splits.train, run.config["meta"]["ways"], shots, run.config["meta"]["queries"])
    generator = torch.Generator().manual_seed(seed)
    return [sampler.sample(generator) for _ in range(count)]


def meta_gradient(run, batch, **settings):
    run.config["plugins"]["maml"].update(settings)
    run.model.train()
    output = run.ctx.call("training_step", "maml", model=run.model, batch=batch,
                          optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    return torch.autograd.grad(output["loss"], list(run.model.parameters()))


def test_contract(tmp_path):
    assert_conforms(advframe_maml, "maml", tmp_path, user=USER)


def test_second_order_meta_gradient_differs_from_first_order(tmp_path):
    run = make_run(tmp_path / "r")
    batch = task_batch(run)
    first = meta_gradient(run, batch, first_order=True, inner_steps=2)
    second = meta_gradient(run, batch, first_order=False, inner_steps=2)
    # the Hessian term of the curved Conv-4 (BatchNorm, ReLU, two inner steps) makes them differ
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(first, second))
    # with no inner step there is nothing to differentiate through: the two coincide
    plain_first = meta_gradient(run, batch, first_order=True, inner_steps=0)
    plain_second = meta_gradient(run, batch, first_order=False, inner_steps=0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_first, plain_second))
    # first order is the query gradient at the adapted weights, averaged over the tasks
    model = run.model
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for task in batch:
        adapted = inner_loop(model, task.support, steps=2, lr=run.config["plugins"]["maml"]["inner_lr"],
                             first_order=True)
        leaves = {name: value.detach().requires_grad_(True) for name, value in adapted.items()}
        loss = F.cross_entropy(functional_forward(model, leaves, task.query_inputs), task.query_labels)
        for total, grad in zip(expected, torch.autograd.grad(loss, list(leaves.values()))):
            total += grad / len(batch)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(first, expected))


@pytest.mark.parametrize("batch_norm", ["transductive", "running"])
def test_adaptation_fits_the_support_and_never_changes_the_meta_parameters(tmp_path, batch_norm):
    run = make_run(tmp_path / "r", [f"plugins.maml.batch_norm={batch_norm}", "plugins.maml.test_inner_steps=5"])
    task = task_batch(run, count=1, shots=2)[0]
    for training in (True, False):
        run.model.train(training)
        before = {key: value.clone() for key, value in run.model.state_dict().items()}
        predictor = run.ctx.call("adapt_task", "maml", model=run.model, support=task.support)
        assert all(torch.equal(before[key], value) for key, value in run.model.state_dict().items())
        assert run.model.training == training
        # the predictor is the fine-tuned model: lower support loss than the meta-initialisation
        inputs, labels = task.support
        with torch.no_grad():
            predictor.eval()
            adapted_loss = F.cross_entropy(predictor(inputs), labels)
            run.config["plugins"]["maml"]["test_inner_steps"] = 0
            initial = run.ctx.call("adapt_task", "maml", model=run.model, support=task.support).eval()
            run.config["plugins"]["maml"]["test_inner_steps"] = 5
            assert adapted_loss < F.cross_entropy(initial(inputs), labels)
        assert not any(value.requires_grad for value in predictor.params.values())


def test_setup_gives_the_model_one_output_per_way(tmp_path):
    run = make_run(tmp_path / "r", ["meta.ways=3"])
    assert advframe_maml.head_size(run.model) == 3 and run.splits.num_classes == 5
    output = run.ctx.call("training_step", "maml", model=run.model, batch=task_batch(run),
                          optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    assert output["support_size"] == 3.0


def test_meta_training_uses_train_shots_and_meta_testing_test_shots(tmp_path, monkeypatch):
    seen = []
    original = advframe_maml.inner_loop

    def spy(model, support, **kwargs):
        seen.append((model.training, len(support[1])))
        return original(model, support, **kwargs)

    monkeypatch.setattr(advframe_maml, "inner_loop", spy)
    run = make_run(tmp_path / "r", ["meta.train_shots=4", "meta.test_shots=1"])
    metrics = run.execute()["metrics"]
    ways = run.config["meta"]["ways"]
    assert {size for training, size in seen if training} == {4 * ways}
    assert {size for training, size in seen if not training} == {1 * ways}
    assert 0 <= metrics["robust_accuracy"] <= metrics["clean_accuracy"] <= 1


def test_bad_settings_are_one_line_plugin_errors(tmp_path):
    run = make_run(tmp_path / "r", ["plugins.maml.inner_lr=0"])
    with pytest.raises(PluginError, match="inner_lr must be > 0"):
        run.ctx.call("training_step", "maml", model=run.model, batch=task_batch(run),
                     optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    host = make_host((advframe_maml, "maml"))
    with pytest.raises(PluginError, match="episodic_training"):
        Run.start(host, tiny_config(host, "maml", ["meta.episodic_training=false"], USER), tmp_path / "s")
