import pytest
import torch

import advframe_pgd
import advframe_pgd.fgsm as fgsm
from advframe.errors import PluginCallError
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config


def test_pgd_contract(tmp_path):
    assert_conforms(advframe_pgd, "pgd", tmp_path)


def test_fgsm_contract(tmp_path):
    assert_conforms(fgsm, "fgsm", tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A natural model trained on digits for a few epochs through the real runner."""
    host = make_host((advframe_pgd, "pgd"), (fgsm, "fgsm"))
    config = tiny_config(host, "erm", ["data.train_size=1000", "data.test_size=200", "train.epochs=6",
                                       "train.lr=0.003", "attack.name=pgd", "eval.attacks=[{name: pgd}]"])
    run = Run.start(host, config, tmp_path_factory.mktemp("erm") / "run")
    run.train()
    run.model.eval()
    return host, run


def attack(run, name, **overrides):
    inputs, labels = run.splits.test.batch(torch.arange(200))
    params = run.ctx.attack_settings(name, **overrides)
    adversarial = run.ctx.attack(run.model, inputs, labels, params)
    with torch.no_grad():
        clean = (run.model(inputs).argmax(1) == labels).float().mean().item()
        robust = (run.model(adversarial).argmax(1) == labels).float().mean().item()
    return inputs, labels, adversarial, clean, robust


@pytest.mark.parametrize("norm, eps", [("linf", 0.15), ("l2", 1.2), ("l1", 6.0)])
def test_pgd_lowers_accuracy_inside_its_ball(trained, norm, eps):
    _, run = trained
    inputs, _, adversarial, clean, robust = attack(run, "pgd", norm=norm, eps=eps, steps=10)
    assert clean > 0.8 and robust < clean - 0.3
    delta = (adversarial - inputs).flatten(1)
    assert {"linf": delta.abs().amax(1), "l2": delta.norm(dim=1), "l1": delta.abs().sum(1)}[norm].max() <= eps * 1.0001


def test_more_steps_and_restarts_never_weaken_pgd(trained):
    _, run = trained
    *_, one_step = attack(run, "pgd", eps=0.1, steps=1, stop_on_success=True)
    *_, many = attack(run, "pgd", eps=0.1, steps=20, restarts=2, stop_on_success=True)
    assert many <= one_step


def test_fgsm_is_one_signed_step_of_size_eps(trained):
    _, run = trained
    inputs, _, adversarial, clean, robust = attack(run, "fgsm", eps=0.1)
    delta = (adversarial - inputs).abs()
    moved = delta[delta > 1e-6]
    assert robust < clean
    # one step of size eps from the clean image: every moved pixel moved by eps unless the box cut it
    assert ((moved - 0.1).abs() < 1e-5).float().mean() > 0.5


def test_targeted_pgd_moves_towards_the_target(trained):
    _, run = trained
    inputs, labels = run.splits.test.batch(torch.arange(100))
    targets = (labels + 3) % 10
    params = run.ctx.attack_settings("pgd", eps=0.3, steps=20, targeted=True)
    adversarial = run.ctx.attack(run.model, inputs, targets, params)
    with torch.no_grad():
        assert (run.model(adversarial).argmax(1) == targets).float().mean() > 0.5


def test_bad_settings_are_user_errors(trained):
    _, run = trained
    inputs, labels = run.splits.test.batch(torch.arange(4))
    with pytest.raises(Exception, match="loss must be one of"):
        run.ctx.attack(run.model, inputs, labels, run.ctx.attack_settings("pgd", loss="hinge"))
    with pytest.raises(PluginCallError):
        run.ctx.attack(run.model, inputs, labels, {**run.ctx.attack_settings("pgd"), "norm": "l3"})
