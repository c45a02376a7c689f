"""One test per hook, through the real runner, with an inline plugin (see test_docs.py)."""

import types

import torch
import torch.nn.functional as F

from advframe import hookimpl
from advframe.runner import Run
from advframe.testing import make_host, tiny_config


def plugin(name, **hooks):
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def test_hook_generate_perturbation(tmp_path):
    calls = []

    def generate_perturbation(inputs, params, ctx):
        calls.append(params["eps"])
        return (inputs + params["eps"] * torch.sign(torch.randn(inputs.shape, generator=ctx.generator))).clamp(0, 1)

    host = make_host((plugin("noise", generate_perturbation=generate_perturbation), "noise"))
    config = tiny_config(host, user={"attack": {"name": "noise", "eps": 0.05}, "eval": {"attacks": [{"name": "noise"}]}})
    results = Run.start(host, config, tmp_path / "r").execute()
    assert calls and all(eps == 0.05 for eps in calls)
    assert results["metrics"]["robust_accuracy_after/noise-linf-0.05"] <= results["metrics"]["clean_accuracy"]


def test_hook_training_step(tmp_path):
    seen = []

    def training_step(model, batch, perturb, ctx):
        seen.append(model.training)
        inputs, labels = batch
        return F.cross_entropy(model(perturb(model, inputs, labels)), labels)

    host = make_host((plugin("adv", training_step=training_step), "adv"))
    run = Run.start(host, tiny_config(host, "adv"), tmp_path / "r")
    before = [p.detach().clone() for p in run.model.parameters()]
    run.train()
    assert seen and all(seen)  # called in train mode, once per batch
    assert len(seen) == 3
    assert any(not torch.equal(b, p) for b, p in zip(before, run.model.parameters()))


def test_hook_adapt_task(tmp_path):
    from advframe import models

    def run_defaults():
        return {"data": {"name": "mnist-fewshot"}, "meta": {"ways": 2, "queries": 3, "test_tasks": 4}}

    def adapt_task(model, support):
        inputs, labels = support
        head = torch.nn.Linear(models.embed(model, inputs).shape[1], 2)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(head(models.embed(model, inputs).detach()), labels).backward()
            optimizer.step()
        return torch.nn.Sequential(model.features, head)

    host = make_host((plugin("probe", run_defaults=run_defaults, adapt_task=adapt_task), "probe"))
    config = tiny_config(host, "probe", user={"data": {"name": "mnist-fewshot"}})
    run = Run.start(host, config, tmp_path / "r")
    metrics = run.execute()["metrics"]
    assert metrics["test_tasks"] == 4 and 0 <= metrics["clean_accuracy"] <= 1
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.evaluate()  # adaptation on every test task leaves the meta-parameters (and BN statistics) alone
    assert all(torch.equal(trained[k], v) for k, v in run.model.state_dict().items())


def test_hook_evaluate(tmp_path):
    def evaluate(model, dataset, ctx):
        clean = ctx.predictions(model, dataset)
        return {"mean_confidence": clean.logits.softmax(1).max(1).values.mean().item()}

    host = make_host((plugin("confidence", evaluate=evaluate), "confidence"))
    metrics = Run.start(host, tiny_config(host, user={"eval": {"attacks": [{"name": "test-pgd"}],
                                                                  "evaluators": ["confidence"]}}),
                        tmp_path / "r").execute()["metrics"]
    assert 0.1 <= metrics["mean_confidence"] <= 1 and "clean_accuracy" in metrics


def test_hook_default_config(tmp_path):
    def default_config():
        return {"strength": 2.0}

    def training_step(model, batch, ctx):
        inputs, labels = batch
        return ctx.settings["strength"] * F.cross_entropy(model(inputs), labels)

    host = make_host((plugin("scaled", default_config=default_config, training_step=training_step), "scaled"))
    config = tiny_config(host, "scaled", ["plugins.scaled.strength=3"])
    assert config["plugins"]["scaled"] == {"strength": 3.0}
    Run.start(host, config, tmp_path / "r").execute()


def test_hook_run_defaults():
    host = make_host((plugin("fewshot", run_defaults=lambda: {"meta": {"ways": 3}, "train": {"epochs": 7}},
                            training_step=lambda model, batch: None), "fewshot"))
    config = tiny_config(host, "fewshot", user={"train": {"epochs": 2}})
    assert config["meta"]["ways"] == 3 and config["train"]["epochs"] == 2  # the user's file wins


def test_hook_setup(tmp_path):
    def setup(model, ctx):
        ctx.data_passes = 2
        ctx.add_model("shadow", ctx.build_model(), trainable=False)
        return torch.nn.Sequential(model)  # a replacement model

    host = make_host((plugin("wrap", setup=setup, training_step=lambda model, batch: F.cross_entropy(
        model(batch[0]), batch[1])), "wrap"))
    run = Run.start(host, tiny_config(host, "wrap", ["train.epochs=5"]), tmp_path / "r")
    assert isinstance(run.model, torch.nn.Sequential) and "shadow" in run.ctx.models
    assert set(run.ctx.optimizers) == {"model"}
    results = run.execute()
    assert results["cost"]["gradient_evaluations"] == 2 * 96  # two data passes, not five
