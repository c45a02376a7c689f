import json

import pytest
import torch

import advframe_fgsm_rs
from advframe import PluginError
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run


def test_contract(tmp_path):
    assert_conforms(advframe_fgsm_rs, "fgsm-rs", tmp_path)


def start(tmp_path, overrides=()):
    from advframe.runner import Run

    host = make_host((advframe_fgsm_rs, "fgsm-rs"))
    config = tiny_config(host, "fgsm-rs", ["data.train_size=256", "train.epochs=4", *overrides])
    return Run.start(host, config, tmp_path / "run")


def step(run, epoch, batch_index, inputs, labels):
    run.ctx.epoch, run.ctx.batch_index = epoch, batch_index
    run.model.train()
    return run.ctx.call("training_step", "fgsm-rs", model=run.train_model, batch=(inputs, labels),
                        optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_fgsm_step_is_one_step_of_1_25_eps_from_a_uniform_start(tmp_path):
    run = start(tmp_path, ["attack.eps=0.1"])
    x, y = run.splits.train.batch(torch.arange(32))
    run.ctx.generator.manual_seed(3)
    adversarial = advframe_fgsm_rs.fgsm_rs(run.model, x, y, run.config["plugins"]["fgsm-rs"], run.ctx)
    delta = adversarial - x
    assert delta.abs().max() <= 0.1 + 1e-6
    # a 1.25 eps step from a uniform start lands on the ball's surface where the box allows it
    free = (x > 0.1) & (x < 0.9)
    assert (delta[free].abs() > 0.1 - 1e-6).float().mean() > 0.5
    run.ctx.generator.manual_seed(3)
    again = advframe_fgsm_rs.fgsm_rs(run.model, x, y, run.config["plugins"]["fgsm-rs"], run.ctx)
    assert torch.equal(again, adversarial)  # seeded by ctx.generator


def test_guard_restores_weights_and_stops_after_a_collapse(tmp_path):
    run = start(tmp_path, ["attack.eps=0.05"])
    batches = [run.splits.train.batch(torch.arange(i, i + 32)) for i in range(0, 256, 32)]
    for _ in range(2):  # epoch 0 (two passes): learn something, collect the guard batch
        for index, (x, y) in enumerate(batches):
            step(run, 0, index, x, y)
    assert len(run.ctx.state["guard/inputs"]) == 128
    step(run, 1, 0, *batches[0])  # first check: the reference and the snapshot
    snapshot = {k[len("guard/weights/"):]: v.clone() for k, v in run.ctx.state.items()
                if k.startswith("guard/weights/")}
    first = advframe_fgsm_rs._scalar(run.ctx, "last")
    assert first > 0.3, "the model must be somewhat robust before the collapse"
    # a collapse during epoch 1: the classifier's weights are scrambled
    with torch.no_grad():
        for parameter in run.model.classifier.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 3)
    output = step(run, 2, 0, *batches[0])  # the check at the start of epoch 2 sees it
    assert advframe_fgsm_rs._scalar(run.ctx, "last") < first - 0.2
    assert output["guard_triggered"] == 1.0 and output["guard_stopped"] == 1.0
    assert same(weights(run.model), snapshot), "the weights of the last passing check were not restored"
    # stopped: later steps neither change the model nor cost gradient evaluations
    count = run.ctx.counter.count
    step(run, 2, 1, *batches[1])
    assert same(weights(run.model), snapshot) and run.ctx.counter.count == count


def test_rollback_restores_and_keeps_training(tmp_path):
    run = start(tmp_path, ["attack.eps=0.05", "plugins.fgsm-rs.guard=rollback"])
    batches = [run.splits.train.batch(torch.arange(i, i + 32)) for i in range(0, 256, 32)]
    for _ in range(2):
        for index, (x, y) in enumerate(batches):
            step(run, 0, index, x, y)
    step(run, 1, 0, *batches[0])
    snapshot = {k[len("guard/weights/"):]: v.clone() for k, v in run.ctx.state.items()
                if k.startswith("guard/weights/")}
    with torch.no_grad():
        for parameter in run.model.classifier.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 3)
    step(run, 2, 0, *batches[0])
    assert advframe_fgsm_rs._scalar(run.ctx, "triggered") == 1
    step(run, 2, 1, *batches[1])
    assert not same(weights(run.model), snapshot)  # trained on from the restored weights


@pytest.mark.parametrize("reference, fires", [("best", True), ("previous", False)])
def test_reference_best_catches_a_slow_collapse_previous_does_not(tmp_path, monkeypatch, reference, fires):
    run = start(tmp_path, [f"plugins.fgsm-rs.guard_reference={reference}"])
    scripted = iter([0.6, 0.45, 0.3, 0.3])
    monkeypatch.setattr(advframe_fgsm_rs, "guard_accuracy", lambda model, ctx, epoch: next(scripted))
    x, y = run.splits.train.batch(torch.arange(32))
    step(run, 0, 0, x, y)
    for epoch in (1, 2, 3):
        step(run, epoch, 0, x, y)
    assert (advframe_fgsm_rs._scalar(run.ctx, "triggered") > 0) == fires


def test_guard_runs_after_every_epoch_and_reports_in_metrics_and_logs(tmp_path):
    results = tiny_run(advframe_fgsm_rs, "fgsm-rs", tmp_path / "run",
                       overrides=["train.epochs=3", "train.monitor_examples=0"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "guard_pgd_accuracy" not in lines[0]  # nothing to check before the first epoch ends
    assert all("guard_pgd_accuracy" in line and "guard_triggered" in line for line in lines[1:])
    metrics = results["metrics"]
    assert metrics["guard_checks"] == 3.0  # after epochs 1 and 2 (at the next start) and after the last step
    assert 0.0 <= metrics["guard_last_pgd_accuracy"] <= 1.0
    assert metrics["guard_triggered"] == 0.0 and metrics["guard_trigger_epoch"] == 0.0


def test_guard_uses_the_validation_split_when_there_is_one(tmp_path):
    run = start(tmp_path, ["data.validation_size=64", "plugins.fgsm-rs.guard_examples=40"])
    held = run.ctx.state["guard/inputs"]
    assert held.shape[0] == 40
    assert torch.equal(held, run.splits.validation.batch(slice(0, 40))[0])
    x, y = run.splits.train.batch(torch.arange(32))
    step(run, 0, 0, x, y)
    assert torch.equal(run.ctx.state["guard/inputs"], held)  # no training images added


def test_resume_makes_the_same_guard_decisions(tmp_path, monkeypatch):
    from advframe.runner import Run

    overrides = ["train.epochs=3", "train.monitor_examples=0", "plugins.fgsm-rs.guard_threshold=0.01"]
    whole = tiny_run(advframe_fgsm_rs, "fgsm-rs", tmp_path / "whole", overrides=overrides)
    original = advframe_fgsm_rs.fgsm_rs

    def interrupted(model, inputs, labels, settings, ctx):
        if ctx.epoch == 2:
            raise KeyboardInterrupt
        return original(model, inputs, labels, settings, ctx)

    monkeypatch.setattr(advframe_fgsm_rs, "fgsm_rs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(advframe_fgsm_rs, "fgsm-rs", tmp_path / "cut", overrides=overrides)
    monkeypatch.setattr(advframe_fgsm_rs, "fgsm_rs", original)
    host = make_host((advframe_fgsm_rs, "fgsm-rs"))
    resumed = Run.resume(host, tmp_path / "cut").execute()
    assert resumed["metrics"] == whole["metrics"]


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(PluginError, match="guard must be one of"):
        tiny_run(advframe_fgsm_rs, "fgsm-rs", tmp_path / "a", overrides=["plugins.fgsm-rs.guard=halt"])
    with pytest.raises(PluginError, match="step_factor"):
        tiny_run(advframe_fgsm_rs, "fgsm-rs", tmp_path / "b", overrides=["plugins.fgsm-rs.step_factor=0"])
