import json

import pytest
import torch
import torch.nn.functional as F

import advframe_rfs
from advframe import PluginError
from advframe.config import resolve
from advframe.models import embed
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config

# digits 0-4 train a 5-class classifier; 3-way tasks on digits 5-9 test it
USER = {"data": {"name": "mnist-fewshot", "train_size": 600, "test_size": 300},
        "model": {"name": "conv4", "args": {"width": 16}},
        "meta": {"ways": 3, "queries": 5, "test_tasks": 20},
        "train": {"monitor_examples": 0, "lr": 0.003, "batch_size": 50}}


def start(path, overrides=()):
    host = make_host((advframe_rfs, "rfs"))
    return Run.start(host, tiny_config(host, "rfs", overrides, USER), path)


def call(ctx, hook, **kwargs):
    return ctx.call(hook, "rfs", **kwargs)


def test_contract(tmp_path):
    assert_conforms(advframe_rfs, "rfs", tmp_path, user=USER)


def test_run_defaults_train_one_classifier_on_all_training_classes(tmp_path):
    run = start(tmp_path / "r", ["plugins.rfs.generations=2", "train.epochs=3"])
    assert run.config["meta"]["learner"] == "rfs" and not run.config["meta"]["episodic_training"]
    assert run.model.classifier.out_features == 5  # digits 0-4
    host = make_host((advframe_rfs, "rfs"))
    assert resolve(host, {"attack": {"name": "test-pgd"}, "eval": {"attacks": []}}, [], "rfs")["train"]["batch_size"] == 64
    assert run.ctx.data_passes == 9 and "teacher" in run.ctx.models and "teacher" not in run.ctx.optimizers
    # only probing another method's embedding: no generations, no teacher
    probe_only = start(tmp_path / "erm", ["plugins.rfs.generations=2", "train.epochs=3", "train.method=erm"])
    assert probe_only.ctx.data_passes == 3 and not probe_only.ctx.models


def test_probe_uses_frozen_features(tmp_path):
    run = start(tmp_path / "r", ["plugins.rfs.support_augmentations=2"])
    model, ctx, task = run.model, run.ctx, run.ctx.test_tasks[0]
    model.train()  # even when called in train mode, adaptation must not touch BatchNorm statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    handle = model.features.register_forward_hook(
        lambda module, args, output: seen.append((torch.is_grad_enabled(), module.training, output.requires_grad)))
    try:
        probe = call(ctx, "adapt_task", model=model, support=task.support)
    finally:
        handle.remove()
    assert seen and all(state == (False, False, False) for state in seen)  # no graph, eval mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in probe.linear.parameters())
    # the probe's linear layer is a logistic regression on the normalised support features
    inputs = task.query_inputs
    with torch.no_grad():
        logits = probe(inputs)
        model.eval()
        features = F.normalize(embed(model, inputs), dim=1)
    assert torch.allclose(logits, probe.linear(features), atol=1e-5)
    # the probe is attacked through the frozen embedding: inputs get a gradient, the embedding does not change
    attacked = inputs.clone().requires_grad_(True)
    F.cross_entropy(probe(attacked), task.query_labels).backward()
    assert attacked.grad.abs().sum() > 0


def test_probe_matches_scikit_learn_and_normalisation_is_a_switch():
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 6, generator=generator) * 3
    labels = torch.arange(3).repeat(4)
    normalised = F.normalize(features, dim=1)
    weight, bias = advframe_rfs.fit_probe(normalised, labels, 3, 1.0, 1000)
    reference = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(normalised.double().numpy(), labels.numpy())
    ours = (normalised @ weight.t() + bias).argmax(1)
    assert ours.tolist() == reference.predict(normalised.double().numpy()).tolist()
    raw_weight, _ = advframe_rfs.fit_probe(features, labels, 3, 1.0, 1000)
    assert not torch.allclose(raw_weight, weight)
    # two classes: scikit-learn keeps one row; the probe still gives one logit per class
    two_weight, two_bias = advframe_rfs.fit_probe(normalised[:8], labels[:8] % 2, 2, 1.0, 1000)
    assert two_weight.shape == (2, 6) and two_bias.shape == (2,)


def test_distillation_term_uses_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(8, 5)
    assert advframe_rfs.distillation_loss(student, student.clone(), 4.0).abs() < 1e-6
    teacher = torch.randn(8, 5)
    kd = advframe_rfs.distillation_loss(student, teacher, 4.0)
    expected = (F.softmax(teacher / 4, 1) * (F.log_softmax(teacher / 4, 1) - F.log_softmax(student / 4, 1))).sum(1).mean() * 16
    assert kd > 0 and torch.isclose(kd, expected, atol=1e-6)


def test_born_again_generation_starts_from_a_fresh_student_and_a_teacher_of_the_last(tmp_path):
    simple = start(tmp_path / "simple", ["plugins.rfs.generations=0", "train.epochs=1"])
    simple.train()
    run = start(tmp_path / "distilled", ["plugins.rfs.generations=1", "train.epochs=1"])
    ctx = run.ctx
    # generation 0 is RFS-simple: the same network as a generations=0 run after one epoch
    run.epoch, ctx.data_passes = 0, 1
    run.train()
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), simple.model.state_dict().values()))
    # first step of generation 1: the teacher is that network, the student is new, Adam starts over
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert ctx.optimizers["model"].state
    ctx.epoch, ctx.batch_index = 1, 0
    inputs, labels = run.splits.train.batch(torch.arange(50))
    run.model.train()
    output = call(ctx, "training_step", model=run.model, batch=(inputs, labels), optimizer=ctx.optimizers["model"],
                  perturb=ctx.perturb)
    teacher = ctx.models["teacher"].state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in trained.items())
    assert not torch.equal(run.model.features[0].weight, trained["features.0.weight"])
    assert not ctx.optimizers["model"].state and int(ctx.state["rfs_generation"]) == 1
    # the learning rate restarts with the generation (cosine: the base rate at its first step)
    assert ctx.optimizers["model"].param_groups[0]["lr"] == pytest.approx(run.config["train"]["lr"])
    assert output["generation"] == 1 and output["kd_loss"] > 0
    expected = 0.5 * output["ce_loss"] + 0.5 * output["kd_loss"]
    assert output["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_distilled_run_trains_each_generation_and_the_probe_transfers(tmp_path):
    run = start(tmp_path / "r", ["plugins.rfs.generations=1", "train.epochs=2", "plugins.rfs.support_augmentations=0"])
    untrained = torch.cat(run.ctx.task_correct(run.model)).float().mean().item()
    run.ctx.clear_predictions()
    metrics = run.execute()["metrics"]
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [line["generation"] for line in lines] == [0, 0, 1, 1]
    assert "kd_loss" not in lines[1] and lines[3]["kd_loss"] > 0
    assert lines[1]["ce_loss"] < lines[0]["ce_loss"] and lines[3]["ce_loss"] < lines[2]["ce_loss"]
    # 3-way 1-shot on digits never seen in training (chance 1/3), the same fixed tasks before and after
    assert metrics["clean_accuracy"] > untrained + 0.08 and metrics["clean_accuracy"] > 0.5
    assert metrics["robust_accuracy"] < metrics["clean_accuracy"] - 0.1


def test_bad_settings_and_episodic_training_are_refused(tmp_path):
    with pytest.raises(PluginError, match="plugins.rfs.C must be > 0"):
        start(tmp_path / "a", ["plugins.rfs.C=0"])
    with pytest.raises(PluginError, match="support_augment must be one of"):
        start(tmp_path / "b", ["plugins.rfs.support_augment=rotate"])
    with pytest.raises(PluginError, match="meta.episodic_training=false"):
        start(tmp_path / "c", ["meta.episodic_training=true"])
