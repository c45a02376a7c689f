"""panet: the contract pieces on a tiny mnist-segmentation run, prototypes from the support only,
PAR, and learning that transfers to unseen digits.

``assert_conforms`` is not used: it feeds classification batches (digits, integer labels) to
``training_step`` and ``adapt_task``, which a segmentation method rejects by design; the same
contract pieces are checked here on segmentation episodes."""

import advframe_panet
import pytest
import torch

from advframe import PluginError
from advframe.runner import Run
from advframe.segmentation import support_prototypes
from advframe.testing import make_host, tiny_config

USER = {"data": {"name": "mnist-segmentation", "train_size": 120, "test_size": 60},
        "model": {"name": "seg-encoder", "args": {"width": 16}},
        "meta": {"tasks_per_epoch": 20, "tasks_per_batch": 4, "test_tasks": 6},
        "train": {"lr": 0.003, "monitor_examples": 0},
        "eval": {"attacks": [{"name": "test-pgd", "steps": 3, "alpha": 0.05}]}}


def start(tmp_path, overrides=(), name="run"):
    host = make_host((advframe_panet, "panet"))
    return Run.start(host, tiny_config(host, "panet", overrides, USER), tmp_path / name)


def test_run_defaults_make_a_fewshot_segmentation_run():
    host = make_host((advframe_panet, "panet"))
    config = tiny_config(host, "panet", user={"data": {"name": "mnist-segmentation"}, "model": {"name": "seg-encoder"}})
    meta = config["meta"]
    assert config["meta"]["learner"] == "panet" and config["train"]["method"] == "panet"
    assert meta["episodic_training"] and meta["ways"] == 1 and meta["queries"] == 1 and meta["tasks_per_batch"] == 5
    defaults = advframe_panet.run_defaults()
    assert [a["name"] for a in defaults["eval"]["attacks"]] == ["fgsm", "pgd"]
    assert all(a["stop_on_success"] is False for a in defaults["eval"]["attacks"])


def test_a_tiny_run_trains_and_reports_clean_and_attacked_dice(tmp_path):
    run = start(tmp_path)
    model = run.model
    before = [p.detach().clone() for p in model.parameters()]
    results = run.execute()
    metrics = results["metrics"]
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert metrics["test_tasks"] == 6 and 0 <= metrics["dice"] <= 1 and metrics["dice_ci95"] >= 0
    assert metrics["robust_dice"] <= metrics["dice"]
    # one gradient evaluation per image per forward: 20 episodes x (1 support + 1 query)
    assert results["cost"]["gradient_evaluations"] == 20 * 2


def test_prototypes_come_from_the_support_only_and_adaptation_leaves_the_model_alone(tmp_path):
    run = start(tmp_path)
    ctx, model, task = run.ctx, run.model, run.ctx.test_tasks[0]
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = ctx.call("adapt_task", "panet", model=model, support=task.support)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert adapted.prototypes.shape == (2, 16) and not adapted.prototypes.requires_grad
    model.eval()
    with torch.no_grad():
        features = model(task.support_inputs)
        mask = task.support_labels[:, None].float()
        up = torch.nn.functional.interpolate(features, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        foreground = (up * mask).sum((0, 2, 3)) / mask.sum()
    assert torch.allclose(adapted.prototypes[1], foreground, atol=1e-5)
    # the query never enters the prototypes; a different support changes them
    other = ctx.call("adapt_task", "panet", model=model, support=task.support)
    assert torch.equal(other.prototypes, adapted.prototypes)
    shifted = (task.support_inputs.roll(7, dims=-1), task.support_labels.roll(7, dims=-1))
    assert not torch.allclose(ctx.call("adapt_task", "panet", model=model, support=shifted).prototypes,
                              adapted.prototypes)
    logits = adapted(torch.rand(3, 1, 56, 56))
    assert logits.shape == (3, 2, 56, 56)
    # training: the episode's prototypes do not depend on the query images
    first = support_prototypes(model(task.support_inputs), task.support_labels)
    noise_query = torch.cat([task.support_inputs, torch.rand_like(task.query_inputs)])
    assert torch.allclose(support_prototypes(model(noise_query)[:1], task.support_labels), first, atol=1e-6)


def test_alignment_term_is_logged_and_switches_off(tmp_path):
    run = start(tmp_path)
    task = run.ctx.test_tasks[0]
    loss, logs = advframe_panet.episode_loss(run.model, task, {"scale": 20.0, "align_weight": 1.0})
    plain, plain_logs = advframe_panet.episode_loss(run.model, task, {"scale": 20.0, "align_weight": 0.0})
    assert logs["align_loss"] > 0 and "align_loss" not in plain_logs
    assert loss.item() == pytest.approx(plain.item() + logs["align_loss"], rel=1e-5)


def test_training_transfers_to_unseen_digits(tmp_path):
    run = start(tmp_path, ["meta.tasks_per_epoch=160", "train.epochs=2", "meta.test_tasks=16"])
    with run.ctx.evaluation_randomness(0):
        untrained = [p for p in run.ctx.task_predictions(run.model)]
    from advframe.segmentation import dice

    untrained_dice = torch.stack([dice(p, t.query_labels).mean() for p, t in zip(untrained, run.ctx.test_tasks)]).mean()
    run.ctx.clear_predictions()
    metrics = run.execute()["metrics"]
    assert metrics["dice"] > untrained_dice + 0.1 and metrics["dice"] > 0.4


def test_bad_settings_and_models_raise_one_clear_error(tmp_path):
    with pytest.raises(PluginError, match="align_weight"):
        start(tmp_path, ["plugins.panet.align_weight=-1"], "bad")
    with pytest.raises(PluginError, match="feature maps"):
        start(tmp_path, ["model.name=small-cnn"], "cnn")
