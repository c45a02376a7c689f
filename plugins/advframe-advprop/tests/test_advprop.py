import pytest
import torch

import advframe_advprop as advprop
from advframe import PluginError
from advframe.checkpoint import load_tensors
from advframe.cost import GradientCounter
from advframe.models import DualBatchNorm, batchnorm_route, eval_mode
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config

SHORT = ["data.train_size=128", "train.epochs=1"]


def start(tmp_path, overrides=(), name="run"):
    host = make_host((advprop, "advprop"))
    return host, Run.start(host, tiny_config(host, "advprop", [*SHORT, *overrides]), tmp_path / name)


def test_contract(tmp_path):
    assert_conforms(advprop, "advprop", tmp_path)


def test_every_batchnorm_gets_a_twin_and_a_model_without_one_is_refused(tmp_path):
    _, run = start(tmp_path)
    dual = [m for m in run.model.modules() if isinstance(m, DualBatchNorm)]
    assert len(dual) == 2  # small-cnn's two BatchNorm layers
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not isinstance(parent, DualBatchNorm)
                   for parent in run.model.modules() for m in parent.children())
    with pytest.raises(PluginError, match="model.args.batch_norm=true"):
        start(tmp_path, ["model.args={width: 8, hidden: 32, batch_norm: false}"], name="no-bn")


def test_the_attack_runs_on_the_auxiliary_bn_in_eval_mode(tiny_model, tiny_batch):
    model = advprop.with_auxiliary_bn(tiny_model)
    model.train()
    inputs, labels = tiny_batch
    seen = {"main": 0, "aux": 0}
    for layer in (m for m in model.modules() if isinstance(m, DualBatchNorm)):
        layer.main.register_forward_hook(lambda *a: seen.__setitem__("main", seen["main"] + 1))
        layer.aux.register_forward_hook(lambda *a: seen.__setitem__("aux", seen["aux"] + 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = advprop.check_settings({**advprop.default_config(), "eps": 0.1, "steps": 2, "noise_start": 0.0})
    adversarial = advprop.adversarial_examples(model, inputs, labels, settings, 10)
    assert seen["main"] == 0 and seen["aux"] > 0
    assert model.training and all(m.route == "main" for m in model.modules() if isinstance(m, DualBatchNorm))
    for key, value in model.state_dict().items():  # no running statistic absorbed the attack's iterates
        assert torch.equal(before[key], value), key
    assert (adversarial - inputs).abs().max() <= 0.1 + 1e-6 and (adversarial - inputs).abs().max() > 0.05


def test_random_targets_are_always_a_wrong_class(tiny_model, tiny_batch, monkeypatch):
    model = advprop.with_auxiliary_bn(tiny_model)
    inputs, labels = tiny_batch
    settings = advprop.check_settings({**advprop.default_config(), "random_target": True})
    drawn = []
    original = advprop.pgd

    def spy(model, inputs, targets, **kwargs):
        drawn.append((targets, kwargs["targeted"]))
        return original(model, inputs, targets, **kwargs)

    monkeypatch.setattr(advprop, "pgd", spy)
    advprop.adversarial_examples(model, inputs, labels, settings, 10, torch.Generator().manual_seed(0))
    targets, targeted = drawn[0]
    assert targeted and (targets != labels).all() and len(targets.unique()) > 3


def test_two_bn_sets_hold_different_statistics_after_training(tmp_path):
    _, run = start(tmp_path)
    run.execute()
    weights, _ = load_tensors(tmp_path / "run" / "model.safetensors")
    pairs = [(key, key.replace(".main.", ".aux.")) for key in weights if ".main.running_var" in key]
    assert pairs and all(aux in weights for _, aux in pairs)
    for main, aux in pairs:
        assert not torch.allclose(weights[aux], torch.ones_like(weights[aux]), atol=1e-3), f"{aux} never updated"
        assert not torch.allclose(weights[main], weights[aux], rtol=0, atol=1e-4), main
    gaps = advprop.running_statistic_gaps(run.model)  # what evaluate reports (METHODS.md check 2, on real data)
    assert gaps["bn_running_var_gap"] > 1e-4 and gaps["bn_running_mean_gap"] > 1e-4


def test_evaluation_uses_the_main_batchnorms_and_survives_advframe_eval(tmp_path):
    host, run = start(tmp_path)
    results = run.execute()
    inputs, labels = run.splits.test.batch(slice(None), run.ctx.device)
    with torch.no_grad(), eval_mode(run.model):
        default = run.model(inputs)
        with batchnorm_route(run.model, "main"):
            main = run.model(inputs)
        with batchnorm_route(run.model, "aux"):
            aux = run.model(inputs)
    assert torch.equal(default, main) and not torch.allclose(main, aux)
    clean_accuracy = (main.argmax(1) == labels).float().mean().item()
    assert results["metrics"]["clean_accuracy"] == pytest.approx(clean_accuracy)
    assert results["metrics"]["aux_clean_accuracy"] == pytest.approx((aux.argmax(1) == labels).float().mean().item())
    # advframe eval: setup rebuilds the twins, then the saved weights (both sets) load into them
    loaded = Run.load(host, tmp_path / "run", run.config)
    for key, value in run.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    again = loaded.evaluate()["metrics"]
    for key in ("clean_accuracy", "aux_clean_accuracy", "bn_running_var_gap"):
        assert again[key] == pytest.approx(results["metrics"][key])


@pytest.mark.parametrize(("overrides", "per_example"), [([], 3), (["plugins.advprop.steps=3"], 5),
                                                        (["plugins.advprop.auxiliary_bn=false"], 3)])
def test_cost_per_batch(tmp_path, overrides, per_example):
    _, run = start(tmp_path, overrides)
    inputs, labels = run.splits.train.batch(torch.arange(20), run.ctx.device)
    counter = GradientCounter()
    counter.attach(run.model)
    run.model.train()
    output = run.ctx.call("training_step", "advprop", model=run.model, batch=(inputs, labels),
                          optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    assert counter.count == per_example * len(labels)
    assert output["loss"].item() == pytest.approx((output["clean_loss"] + output["adversarial_loss"]) / 2, rel=1e-5)


def test_shared_bn_ablation_keeps_the_model_as_built(tmp_path):
    _, run = start(tmp_path, ["plugins.advprop.auxiliary_bn=false"])
    assert not advprop.has_auxiliary_bn(run.model)
    metrics = run.execute()["metrics"]
    assert "aux_clean_accuracy" not in metrics


@pytest.mark.parametrize(("key", "value", "message"), [("combine", "max", "combine must be one of"),
                                                        ("noise_start", 1.5, "probability"),
                                                        ("steps", 0, "steps must be >= 1")])
def test_bad_settings_are_one_line_errors(tmp_path, key, value, message):
    with pytest.raises(PluginError, match=message):
        start(tmp_path, [f"plugins.advprop.{key}={value}"])
