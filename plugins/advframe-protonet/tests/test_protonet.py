import json

import pytest
import torch

import advframe_protonet
from advframe import PluginError
from advframe.episodes import Task
from advframe.models import embed
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config

# digits 0-4 train, 5-9 test; 3-way tasks with 5 queries fit the tiny test split
USER = {"data": {"name": "mnist-fewshot", "train_size": 600, "test_size": 300},
        "model": {"name": "conv4", "args": {"width": 16}},
        "meta": {"ways": 3, "queries": 5, "test_tasks": 20, "tasks_per_epoch": 20, "tasks_per_batch": 2},
        "train": {"monitor_examples": 0, "lr": 0.003}}


def start(tmp_path, overrides=()):
    host = make_host((advframe_protonet, "protonet"))
    return Run.start(host, tiny_config(host, "protonet", overrides, USER), tmp_path / "run")


def test_contract(tmp_path):
    assert_conforms(advframe_protonet, "protonet", tmp_path, user=USER)


def test_run_defaults_make_a_few_shot_run():
    host = make_host((advframe_protonet, "protonet"))
    config = tiny_config(host, "protonet", user={"data": {"name": "mnist-fewshot"}})
    assert config["meta"]["learner"] == "protonet" and config["train"]["method"] == "protonet"
    assert config["meta"]["episodic_training"] and config["meta"]["tasks_per_batch"] == 1


def test_protonet_learns_an_embedding_that_transfers_to_unseen_classes(tmp_path):
    run = start(tmp_path, ["train.epochs=3", "meta.tasks_per_epoch=100"])
    untrained = torch.cat(run.ctx.task_correct(run.model)).float().mean().item()
    run.ctx.clear_predictions()
    results = run.execute()
    metrics = results["metrics"]
    # training cost is counted on the embedding: 3 epochs x 50 steps x 2 episodes x 3 ways x (1 shot + 5 queries)
    assert results["cost"]["gradient_evaluations"] == 3 * 50 * 2 * 3 * 6
    # 3-way 1-shot on digits 5-9, never seen in training (chance 1/3), on the same fixed test tasks
    assert metrics["clean_accuracy"] > untrained + 0.08 and metrics["clean_accuracy"] > 0.5
    # the evaluation attack goes through the embedding of the adapted predictor and hurts it
    assert metrics["robust_accuracy"] < metrics["clean_accuracy"] - 0.1
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["query_accuracy"] > lines[0]["query_accuracy"]


def test_adaptation_computes_detached_class_means_and_leaves_the_model_alone(tmp_path):
    run = start(tmp_path)
    model, task = run.model, run.ctx.test_tasks[0]
    model.train()  # adapt_task must not update BatchNorm statistics even when called in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = run.ctx.call("adapt_task", "protonet", model=model, support=task.support)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not adapted.prototypes.requires_grad and adapted.prototypes.shape[0] == task.ways
    model.eval()
    with torch.no_grad():
        features = embed(model, task.support_inputs)
        means = torch.stack([features[task.support_labels == k].mean(0) for k in range(task.ways)])
        queries = embed(model, task.query_inputs)
        expected = -torch.cdist(queries, means) ** 2
        assert torch.allclose(adapted(task.query_inputs), expected, rtol=1e-4, atol=1e-3)
    # the query is attacked through the embedding: the input gradient is not zero
    inputs = task.query_inputs.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(adapted(inputs), task.query_labels).backward()
    assert inputs.grad.abs().sum() > 0


def test_training_uses_the_runners_episodes_or_draws_wider_ones(tmp_path):
    run = start(tmp_path, ["plugins.protonet.train_ways=5", "plugins.protonet.train_queries=2"])
    ctx = run.ctx
    runner_tasks = run._task_batch(0, 0)
    assert runner_tasks[0].ways == 3
    ctx._plugin_stack.append("protonet")
    try:
        wide = advframe_protonet.training_tasks(runner_tasks, ctx)
        again = advframe_protonet.training_tasks(runner_tasks, ctx)
        ctx.batch_index = 1
        other = advframe_protonet.training_tasks(runner_tasks, ctx)
        plain = advframe_protonet.training_tasks((torch.zeros(4, 1, 28, 28), torch.zeros(4).long()), ctx)
    finally:
        ctx._plugin_stack.pop()
    assert len(wide) == len(runner_tasks) and all(t.ways == 5 for t in wide)
    assert all(torch.bincount(t.query_labels).tolist() == [2] * 5 for t in wide)
    assert torch.equal(wide[0].query_inputs, again[0].query_inputs)  # seeded by (seed, epoch, batch)
    assert not torch.equal(wide[0].query_inputs, other[0].query_inputs)
    assert len(plain) == ctx.config["meta"]["tasks_per_batch"] and plain[0].ways == 5
    output = ctx.call("training_step", "protonet", model=run.model, batch=runner_tasks,
                      optimizer=ctx.optimizers["model"], perturb=ctx.perturb)
    assert output["train_ways"] == 5 and output["loss"].requires_grad


def test_matching_episodes_are_the_runners(tmp_path):
    run = start(tmp_path)
    tasks = run._task_batch(0, 0)
    run.ctx._plugin_stack.append("protonet")
    try:
        assert advframe_protonet.training_tasks(tasks, run.ctx) is tasks
    finally:
        run.ctx._plugin_stack.pop()


def test_episode_loss_is_the_query_cross_entropy_over_squared_distances():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.features = torch.nn.Identity()  # embed() uses model.features: the inputs are the embedding
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    task = Task(support, labels, torch.tensor([[1.0, 1.0]]), torch.tensor([0]), torch.tensor([0, 1]))
    logits = advframe_protonet.episode_logits(model, task)
    # prototypes (1, 0) and (0, 4); squared distances 1 and 10
    assert torch.allclose(logits, torch.tensor([[-1.0, -10.0]]))


def test_bad_settings_are_refused_in_one_line(tmp_path):
    with pytest.raises(PluginError, match="train_ways"):
        start(tmp_path / "a", ["plugins.protonet.train_ways=1"])
    run = start(tmp_path / "b", ["plugins.protonet.train_ways=6"])  # mnist-fewshot trains on 5 digits
    with pytest.raises(PluginError, match="lower plugins.protonet.train_ways"):
        run.execute()
