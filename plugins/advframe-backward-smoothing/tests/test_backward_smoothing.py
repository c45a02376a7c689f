import pytest
import torch

import advframe_backward_smoothing as bs
from advframe import PluginError
from advframe.cost import GradientCounter
from advframe.losses import kl_to_clean
from advframe.models import eval_mode
from advframe.testing import assert_conforms, tiny_run

SOLVER = dict(eps=0.1, alpha=0.1, norm="linf")


def test_contract(tmp_path):
    assert_conforms(bs, "backward-smoothing", tmp_path)


def test_contract_of_the_uniform_ablation(tmp_path):
    assert_conforms(bs, "backward-smoothing", tmp_path, overrides=["plugins.backward-smoothing.init=uniform"])


def kl_to_target(model, inputs, target_logits):
    with torch.no_grad(), eval_mode(model):
        return kl_to_clean(model(inputs), target_logits)


def test_smoothing_step_descends_towards_the_noisy_output(tiny_model, tiny_batch):
    """The sign pitfall: the first step must move the prediction towards softmax(z + r), not away."""
    inputs, labels = tiny_batch
    generator = torch.Generator().manual_seed(0)
    start, target = bs.smoothing_step(tiny_model, inputs, labels, gamma=2.0, generator=generator, **SOLVER)
    with torch.no_grad(), eval_mode(tiny_model):
        clean_logits = tiny_model(inputs)
    noise = target - clean_logits
    assert noise.abs().max() <= 2.0 + 1e-5 and noise.abs().max() > 1.0  # U(-gamma, gamma) in logit units
    before = kl_to_target(tiny_model, inputs, target)
    after = kl_to_target(tiny_model, start, target)
    flipped = kl_to_target(tiny_model, (2 * inputs - start).clamp(0, 1), target)  # the step with the wrong sign
    assert after.mean() < before.mean()
    assert (after < before).float().mean() > 0.8
    assert after.mean() < flipped.mean()


def test_zero_noise_targets_the_clean_output(tiny_model, tiny_batch):
    """gamma = 0: the target is the clean prediction itself, so the step has nothing to descend."""
    inputs, labels = tiny_batch
    _, target = bs.smoothing_step(tiny_model, inputs, labels, gamma=0.0, **SOLVER)
    with torch.no_grad(), eval_mode(tiny_model):
        assert torch.allclose(target, tiny_model(inputs))
    assert kl_to_target(tiny_model, inputs, target).abs().max() < 1e-5


@pytest.mark.parametrize("init", bs.INITS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbation_stays_in_the_ball_and_the_box(tiny_model, tiny_batch, init, norm):
    inputs, labels = tiny_batch
    eps = 0.1 if norm == "linf" else 1.0
    adversarial = bs.inner_maximisation(tiny_model, inputs, labels, eps=eps, alpha=eps, norm=norm, steps=2,
                                        gamma=1.0, init=init, generator=torch.Generator().manual_seed(1))
    delta = (adversarial - inputs).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert size.min() > 0.5 * eps  # it did move (alpha = eps: the first step reaches the sphere)


def test_inner_steps_raise_the_trades_kl(tiny_model, tiny_batch):
    """The k TRADES steps after the start ascend KL(p(x) || p(x'))."""
    inputs, labels = tiny_batch
    run = dict(gamma=1.0, init="backward", **SOLVER)
    start = bs.inner_maximisation(tiny_model, inputs, labels, steps=0, generator=torch.Generator().manual_seed(2), **run)
    stepped = bs.inner_maximisation(tiny_model, inputs, labels, steps=1, generator=torch.Generator().manual_seed(2), **run)
    with torch.no_grad(), eval_mode(tiny_model):
        clean = tiny_model(inputs)
        assert kl_to_clean(tiny_model(stepped), clean).mean() > kl_to_clean(tiny_model(start), clean).mean()


@pytest.mark.parametrize(("init", "steps", "per_example"), [("backward", 1, 4), ("backward", 3, 6), ("uniform", 1, 3)])
def test_cost_per_batch_is_what_the_paper_says(tmp_path, init, steps, per_example):
    """Backward smoothing: 1 smoothing step + k KL steps + 2 outer passes; the ablation skips the first."""
    from advframe.runner import Run
    from advframe.testing import make_host, tiny_config

    host = make_host((bs, "backward-smoothing"))
    config = tiny_config(host, "backward-smoothing", [f"plugins.backward-smoothing.init={init}",
                                                      f"plugins.backward-smoothing.steps={steps}"])
    run = Run.start(host, config, tmp_path / "run")
    inputs, labels = run.splits.train.batch(torch.arange(20), run.ctx.device)
    counter = GradientCounter()
    counter.attach(run.model)
    run.model.train()
    run.ctx.call("training_step", "backward-smoothing", model=run.model, batch=(inputs, labels),
                 optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    assert counter.count == per_example * len(labels)


@pytest.mark.parametrize(("key", "value", "message"), [("init", "gaussian", "init must be one of"),
                                                        ("gamma", -1.0, "gamma must be >= 0"),
                                                        ("alpha", 0.0, "alpha must be a positive")])
def test_bad_settings_are_one_line_errors(tmp_path, key, value, message):
    with pytest.raises(PluginError, match=message):
        tiny_run(bs, "backward-smoothing", tmp_path / "run", overrides=[f"plugins.backward-smoothing.{key}={value}"])

