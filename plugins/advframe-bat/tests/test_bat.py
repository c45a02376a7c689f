import math

import torch

import advframe_bat
from advframe.losses import uniform_kl
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run

SETTINGS = ["data.train_size=1000", "data.test_size=300", "train.epochs=6", "train.lr=0.005",
            "model.args={width: 16, hidden: 64}", "attack.eps=0.15", "attack.steps=5", "attack.alpha=0.05",
            "eval.attacks=[{name: test-pgd, steps: 10, alpha: 0.03}]", "train.monitor_examples=0"]


def test_contract(tmp_path):
    assert_conforms(advframe_bat, "bat", tmp_path)


def test_bat_trains_a_robust_model_and_reports_fairness(tmp_path):
    # ten small steps resolve where each example meets the boundary
    bat = tiny_run(advframe_bat, "bat", tmp_path / "bat", SETTINGS + ["attack.steps=10", "attack.alpha=0.025"])["metrics"]
    plain = tiny_run(advframe_bat, "bat", tmp_path / "erm", SETTINGS + ["train.method=erm",
                                                                        "eval.evaluators=[bat]"])["metrics"]
    assert bat["robust_accuracy"] > plain["robust_accuracy"] + 0.2
    assert bat["worst_class_robust_accuracy"] > plain["worst_class_robust_accuracy"]
    # the mechanism: every last-clean point is still correct, every stopped first-adversarial point is wrong
    assert bat["last_clean_correct_fraction"] == 1.0
    assert bat["first_adversarial_wrong_fraction"] == 1.0
    # per-class attack strength differs (classes need different numbers of steps to the boundary)
    assert bat["boundary_steps_class_spread"] >= 1.0
    assert 0 < bat["adversarial_target_entropy"] <= 1
    steps = bat["per_class_boundary_steps"]
    assert len(steps) == 10 and max(steps) - min(steps) == bat["boundary_steps_class_spread"]


def test_the_loss_has_the_papers_four_terms(tmp_path):
    host = make_host((advframe_bat, "bat"))
    run = Run.start(host, tiny_config(host, "bat", ["plugins.bat.beta=3", "plugins.bat.uniform_weight=0.5"]),
                    tmp_path / "r")
    inputs, labels = run.splits.train.batch(torch.arange(32))
    run.model.train()
    output = run.ctx.call("training_step", "bat", model=run.model, batch=(inputs, labels),
                          optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    expected = output["natural_loss"] + 3 * output["robust_loss"] + 0.5 * output["uniform_loss"]
    assert math.isclose(output["loss"].item(), expected, rel_tol=1e-5)
    assert output["uniform_loss"] >= 0


def test_uniform_term_is_zero_only_for_the_uniform_prediction():
    assert torch.allclose(uniform_kl(torch.zeros(3, 10)), torch.zeros(3), atol=1e-6)
    assert (uniform_kl(torch.randn(3, 10) * 5) > 0).all()
