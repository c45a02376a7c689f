"""r-pnode: the regularisers are zero where they must be and positive otherwise, they reach the
training loss and the gradients, the model is the core's ODE encoder (tests/test_ode.py),
prototypes come from the support only, and a tiny run reports Dice.

``assert_conforms`` is not used: it feeds classification batches (digits, integer labels) to
``training_step`` and ``adapt_task``, which a segmentation method rejects by design; the same
contract pieces are checked here on segmentation episodes."""

import json

import advframe_r_pnode as rp
import pytest
import torch

from advframe import PluginError
from advframe.ode import ODEEncoder
from advframe.runner import Run
from advframe.segmentation import support_prototypes
from advframe.testing import make_host, tiny_config

USER = {"data": {"name": "mnist-segmentation", "train_size": 120, "test_size": 60},
        "model": {"name": "seg-encoder", "args": {"width": 8}},
        "meta": {"tasks_per_epoch": 8, "tasks_per_batch": 4, "test_tasks": 4},
        "train": {"lr": 0.003, "monitor_examples": 0},
        "eval": {"attacks": [{"name": "test-pgd", "steps": 2, "alpha": 0.05}]},
        "plugins": {"r-pnode": {"steps": 2}}}


def start(tmp_path, overrides=(), name="run"):
    host = make_host((rp, "r-pnode"))
    return Run.start(host, tiny_config(host, "r-pnode", overrides, USER), tmp_path / name)


def test_cluster_loss_is_zero_on_tight_clusters_and_positive_otherwise():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[:, :, :4] = 1
    features = torch.zeros(2, 2, 8, 8)
    features[:, 1, :, :4] = 3.0  # foreground pixels point along p_fg
    features[:, 0, :, 4:] = 2.0  # background pixels along p_bg
    assert rp.cluster_loss(features, masks, centres).item() == pytest.approx(0.0, abs=1e-6)
    features[:, 0, :, :4] = 3.0  # foreground pixels now 45 degrees off their prototype
    assert rp.cluster_loss(features, masks, centres).item() == pytest.approx(1 - 2 ** -0.5, abs=1e-5)


def test_separation_and_consistency_are_zero_or_positive_where_they_must_be():
    assert rp.separation_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == 0.0
    assert rp.separation_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.2]])).item() == 0.0  # already apart
    assert rp.separation_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(2 ** -0.5, abs=1e-6)
    features = torch.randn(3, 4, 5, 5)
    logits = torch.randn(1, 2, 8, 8)
    assert rp.consistency_loss(features, features.clone()).item() == 0.0
    assert rp.consistency_loss(features, features + 0.1).item() == pytest.approx(4 * 0.01, rel=1e-4)
    assert rp.consistency_loss(None, None, logits, logits.clone(), "kl").item() == pytest.approx(0.0, abs=1e-6)
    assert rp.consistency_loss(None, None, logits, logits.flip(1), "kl").item() > 0


@pytest.mark.parametrize("kind", ["features", "kl"])
def test_the_episode_losses_are_zero_without_noise_and_reach_the_gradients(tmp_path, kind):
    run = start(tmp_path, [f"plugins.r-pnode.consistency={kind}", "plugins.r-pnode.separation_weight=1"])
    model, task = run.model, run.ctx.test_tasks[0]
    settings = dict(run.config["plugins"]["r-pnode"])
    generator = torch.Generator().manual_seed(0)
    losses = rp.episode_losses(model, task, {**settings, "noise_std": 0.0}, generator)
    assert set(losses) == {"seg_loss", "cluster_loss", "separation_loss", "consistency_loss"}
    assert losses["consistency_loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["cluster_loss"].item() > 0 and losses["seg_loss"].item() > 0
    losses = rp.episode_losses(model, task, settings, generator)
    assert losses["consistency_loss"].item() > 0
    encoder_weight = model.encoder.features[0].weight
    for name in ("cluster_loss", "consistency_loss"):
        grad, = torch.autograd.grad(losses[name], encoder_weight, retain_graph=True)
        assert grad.abs().sum() > 0, name
    off = rp.episode_losses(model, task, {**settings, "cluster_weight": 0.0, "consistency_weight": 0.0,
                                          "separation_weight": 0.0}, generator)
    assert set(off) == {"seg_loss"}  # with both weights 0, r-pnode trains exactly pnode's objective


def test_training_logs_every_term_and_the_ode_is_trained_and_saved(tmp_path):
    run = start(tmp_path)
    assert isinstance(run.model, ODEEncoder)
    before = [p.detach().clone() for p in run.model.ode.parameters()]
    results = run.execute()
    assert any(not torch.equal(b, p) for b, p in zip(before, run.model.ode.parameters()))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["cluster_loss"] > 0 and line["consistency_loss"] > 0 and line["nfe"] == 16.0  # clean + noisy pass
    metrics = results["metrics"]
    assert metrics["test_tasks"] == 4 and 0 <= metrics["dice"] <= 1 and metrics["robust_dice"] <= metrics["dice"]
    # clean and noisy forward passes are both counted: 8 episodes x 2 images x 2 passes
    assert results["cost"]["gradient_evaluations"] == 8 * 2 * 2


def test_prototypes_come_from_the_support_only(tmp_path):
    run = start(tmp_path)
    ctx, model, task = run.ctx, run.model, run.ctx.test_tasks[0]
    adapted = ctx.call("adapt_task", "r-pnode", model=model, support=task.support)
    with torch.no_grad():
        expected = support_prototypes(model(task.support_inputs), task.support_labels)
        mixed = model(torch.cat([task.support_inputs, torch.rand_like(task.query_inputs)]))
    assert torch.allclose(adapted.prototypes, expected, atol=1e-6) and not adapted.prototypes.requires_grad
    assert torch.allclose(support_prototypes(mixed[:1], task.support_labels), expected, atol=1e-5)


def test_bad_settings_raise_one_clear_error(tmp_path):
    with pytest.raises(PluginError, match="consistency"):
        start(tmp_path, ["plugins.r-pnode.consistency=l1"], "bad")
    with pytest.raises(PluginError, match="cluster_weight"):
        start(tmp_path, ["plugins.r-pnode.cluster_weight=-0.5"], "neg")
