import json

import pytest
import torch
import torch.nn.functional as F

import advframe_free_at
from advframe import PluginError
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run


def test_contract(tmp_path):
    assert_conforms(advframe_free_at, "free-at", tmp_path)


def start(tmp_path, overrides=()):
    from advframe.runner import Run

    host = make_host((advframe_free_at, "free-at"))
    return Run.start(host, tiny_config(host, "free-at", list(overrides)), tmp_path / "run")


def step(run, inputs, labels):
    run.model.train()
    return run.ctx.call("training_step", "free-at", model=run.train_model, batch=(inputs, labels),
                        optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)


def test_replays_each_minibatch_m_times_and_carries_delta_across_batches(tmp_path):
    run = start(tmp_path, ["plugins.free-at.replays=3"])
    ctx, eps = run.ctx, run.config["attack"]["eps"]
    optimizer = ctx.optimizers["model"]
    steps, seen = [], []
    original = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    run.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))

    x1, y1 = run.splits.train.batch(torch.arange(0, 32))
    step(run, x1, y1)
    assert len(steps) == 3 and len(seen) == 3  # m optimizer steps, m forward passes
    delta1 = ctx.state["delta"][:32].clone()
    assert delta1.abs().max() > 0, "delta never moved"
    assert delta1.abs().max() <= eps + 1e-6
    # the replays saw the same images with a perturbation that grew replay by replay
    assert torch.equal(seen[0], x1)  # delta starts at zero
    assert not torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[1])

    x2, y2 = run.splits.train.batch(torch.arange(32, 64))
    step(run, x2, y2)
    assert len(steps) == 6
    # batch 2 starts from batch 1's perturbation, projected into its own box
    carried = torch.max(torch.min(delta1.clamp(-eps, eps), 1 - x2), -x2)
    assert torch.allclose(seen[3] - x2, carried, atol=1e-6)
    assert (seen[3] - x2).abs().max() > 0


def test_smaller_last_batch_uses_the_first_rows_of_delta(tmp_path):
    run = start(tmp_path, ["plugins.free-at.replays=2"])
    x, y = run.splits.train.batch(torch.arange(0, 32))
    step(run, x, y)
    before = run.ctx.state["delta"].clone()
    small_x, small_y = run.splits.train.batch(torch.arange(32, 42))
    step(run, small_x, small_y)
    assert torch.equal(run.ctx.state["delta"][10:], before[10:])
    assert not torch.equal(run.ctx.state["delta"][:10], before[:10])


def test_gradient_reaches_delta_on_black_pixels(tmp_path):
    """The pitfall: clamping x + delta in the forward pass kills the gradient where x = 0."""
    run = start(tmp_path)
    eps = run.config["attack"]["eps"]
    x, y = run.splits.train.batch(torch.arange(0, 32))
    black = x == 0
    assert black.float().mean() > 0.2
    # a perturbation carried from another batch, negative everywhere
    run.ctx.state["delta"] = torch.full((32, *x.shape[1:]), -eps)
    delta = advframe_free_at.project(run.ctx.state["delta"], x, eps, "linf")
    run.model.train()
    loss, _, leaf = advframe_free_at.replay_loss(run.model, x, y, delta)
    loss.backward()
    assert (leaf.grad[black] != 0).float().mean() > 0.5
    # the clamp-in-forward variant: exactly zero there, which this plugin must not do
    clamped = torch.full_like(x, -eps).requires_grad_(True)
    F.cross_entropy(run.model((x + clamped).clamp(0, 1)), y).backward()
    assert (clamped.grad[black] == 0).all()
    # end to end: after a step, black pixels hold delta in [0, eps] and many moved up to eps
    step(run, x, y)
    after = run.ctx.state["delta"][:32]
    assert after[black].min() >= 0
    assert (after[black] > eps / 2).float().mean() > 0.1


def test_epochs_are_divided_by_m_so_cost_matches_natural_training(tmp_path):
    results = tiny_run(advframe_free_at, "free-at", tmp_path / "run",
                       overrides=["train.epochs=4", "plugins.free-at.replays=2", "train.monitor_examples=0"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # ceil(4 / 2) data passes
    # one forward/backward per example per replay: what natural training of 4 epochs costs
    assert results["cost"]["gradient_evaluations"] == 4 * results["train_examples"]
    assert json.loads(lines[-1])["replay_accuracy"] > 0


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(PluginError, match="replays"):
        tiny_run(advframe_free_at, "free-at", tmp_path / "a", overrides=["plugins.free-at.replays=0"])
    with pytest.raises(PluginError, match="step_size"):
        tiny_run(advframe_free_at, "free-at", tmp_path / "b", overrides=["plugins.free-at.step_size=-1"])
