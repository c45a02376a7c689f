import advframe_cw
import advframe_cw_paper
import pytest
import torch

from advframe import PluginError
from advframe.config import resolve
from advframe.losses import margin
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_contract_cw_inf(tmp_path):
    assert_conforms(advframe_cw, "cw", tmp_path, overrides=["plugins.cw.steps=5"])


def test_contract_cw_l2(tmp_path):
    assert_conforms(advframe_cw, "cw", tmp_path, overrides=["attack.norm=l2", "attack.eps=1.0", "plugins.cw.steps=10",
                                                            "plugins.cw.binary_search_steps=3"])


def test_contract_cw_paper(tmp_path):
    assert_conforms(advframe_cw_paper, "cw-paper", tmp_path,
                    overrides=["attack.norm=l2", "attack.eps=1.0", "plugins.cw-paper.steps=10",
                               "plugins.cw-paper.binary_search_steps=2"])


def test_the_paper_setting_is_the_papers_optimiser_and_labels_show_every_budget():
    host = make_host((advframe_cw, "cw"), (advframe_cw_paper, "cw-paper"))
    entries = [{"name": "cw-paper"}, {"name": "cw"}, {"name": "cw", "steps": 10000, "lr": 0.01},
               {"name": "cw", "norm": "linf", "eps": 0.3, "steps": 20}]
    config = resolve(host, {"attack": {"name": "cw", "norm": "l2", "eps": 1.0}, "eval": {"attacks": entries}})
    paper, capped, long, inf = config["eval"]["attacks"]
    # Carlini & Wagner's l2_attack.py: MAX_ITERATIONS, LEARNING_RATE, BINARY_SEARCH_STEPS, INITIAL_CONST, ...
    assert {key: paper[key] for key in ("steps", "lr", "binary_search_steps", "initial_const", "abort_early",
                                        "confidence", "targeted")} == \
        {"steps": 10000, "lr": 0.01, "binary_search_steps": 9, "initial_const": 0.001, "abort_early": True,
         "confidence": 0.0, "targeted": False}
    assert (capped["steps"], capped["lr"]) == (100, 0.1)  # the capped default is not the paper's
    assert [e["label"] for e in (paper, capped, long, inf)] == \
        ["cw-paper-l2-1-10000", "cw-l2-1-100", "cw-l2-1-10000", "cw-linf-0.3-20"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A natural model trained on digits for a few epochs through the real runner."""
    host = make_host((advframe_cw, "cw"), (advframe_cw_paper, "cw-paper"))
    config = tiny_config(host, "erm", ["data.train_size=1000", "data.test_size=200", "train.epochs=6",
                                       "train.lr=0.003", "train.monitor_examples=0", "attack.name=cw",
                                       "eval.attacks=[{name: cw}]"])
    run = Run.start(host, config, tmp_path_factory.mktemp("erm") / "run")
    run.train()
    run.model.eval()
    return run


def batch(run, size=100):
    return run.splits.test.batch(torch.arange(size))


def predict(model, inputs):
    with torch.no_grad():
        return model(inputs)


def attack(run, inputs, labels, **overrides):
    return run.ctx.attack(run.model, inputs, labels, run.ctx.attack_settings("cw", **overrides))


L2 = {"norm": "l2", "steps": 30, "binary_search_steps": 5, "lr": 0.1}


def test_cw_l2_stays_under_its_cap_and_in_the_box_and_lowers_accuracy(trained):
    inputs, labels = batch(trained)
    adversarial = attack(trained, inputs, labels, eps=1.5, **L2)
    assert (adversarial - inputs).flatten(1).norm(dim=1).max() <= 1.5 * (1 + 1e-5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    clean = (predict(trained.model, inputs).argmax(1) == labels).float().mean()
    robust = (predict(trained.model, adversarial).argmax(1) == labels).float().mean()
    assert clean > 0.8 and robust < clean - 0.4


def test_binary_search_on_c_finds_smaller_perturbations_than_a_large_fixed_c(trained):
    inputs, labels = batch(trained, 60)
    _, searched = advframe_cw.cw_l2(trained.model, inputs, labels, eps=1e9, steps=30, lr=0.1,
                                    binary_search_steps=6, initial_const=0.01)
    _, fixed = advframe_cw.cw_l2(trained.model, inputs, labels, eps=1e9, steps=30, lr=0.1,
                                 binary_search_steps=1, initial_const=100.0)
    both = torch.isfinite(searched) & torch.isfinite(fixed)
    assert both.float().mean() > 0.8
    assert searched[both].median() < 0.8 * fixed[both].median()
    assert (searched[both] <= fixed[both] + 1e-4).float().mean() > 0.8


def test_stopping_on_success_leaves_robust_accuracy_unchanged(trained):
    inputs, labels = batch(trained)
    robust = [predict(trained.model, attack(trained, inputs, labels, eps=0.8, stop_on_success=stop, **L2))
              .argmax(1) == labels for stop in (False, True)]
    assert 0 < robust[0].float().mean() < 1
    assert torch.equal(robust[0], robust[1])


def test_confidence_is_the_margin_of_every_capped_success(trained):
    inputs, labels = batch(trained, 50)
    adversarial, distance = advframe_cw.cw_l2(trained.model, inputs, labels, eps=3.0, steps=30, lr=0.1,
                                              binary_search_steps=5, confidence=2.0)
    won = distance <= 3.0
    assert won.float().mean() > 0.5
    assert (margin(predict(trained.model, adversarial[won]), labels[won]) >= 2.0 - 1e-4).all()


@pytest.mark.parametrize("norm, eps", [("l2", 3.0), ("linf", 0.3)])
def test_targeted_cw_reaches_the_targets(trained, norm, eps):
    inputs, labels = batch(trained, 60)
    targets = (labels + 3) % 10
    settings = L2 if norm == "l2" else {"norm": "linf", "steps": 30}
    adversarial = attack(trained, inputs, targets, eps=eps, targeted=True, **{**settings, "norm": norm})
    assert (predict(trained.model, adversarial).argmax(1) == targets).float().mean() > 0.7


def test_cw_loss_inside_pgd_stays_in_the_linf_ball_and_lowers_accuracy(trained):
    inputs, labels = batch(trained)
    adversarial = attack(trained, inputs, labels, norm="linf", eps=0.15, steps=20, stop_on_success=True)
    assert (adversarial - inputs).abs().max() <= 0.15 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    clean = (predict(trained.model, inputs).argmax(1) == labels).float().mean()
    assert (predict(trained.model, adversarial).argmax(1) == labels).float().mean() < clean - 0.3


def test_cw_inf_is_seeded(trained):
    inputs, labels = batch(trained, 32)
    results = []
    for _ in range(2):
        trained.ctx.generator.manual_seed(5)
        results.append(attack(trained, inputs, labels, norm="linf", eps=0.1, steps=5, restarts=2))
    assert torch.equal(*results)


def test_bad_settings_are_user_errors(trained):
    inputs, labels = batch(trained, 4)
    with pytest.raises(PluginError, match="confidence"):
        attack(trained, inputs, labels, confidence=-1.0)
    with pytest.raises(PluginError, match="binary_search_steps"):
        attack(trained, inputs, labels, norm="l2", binary_search_steps=0)
    with pytest.raises(PluginError, match="random_start"):
        attack(trained, inputs, labels, random_start="gauss")


def test_evaluate_reports_the_uncapped_perturbation_sizes(trained, monkeypatch):
    settings = {**trained.config["plugins"]["cw"], "steps": 30, "binary_search_steps": 4}
    monkeypatch.setitem(trained.config["plugins"], "cw", settings)
    dataset = trained.splits.test.subset(torch.arange(60))
    # the run attacks with cw but does not list it as an evaluator: no uncapped run
    assert trained.ctx.call("evaluate", "cw", model=trained.model, dataset=dataset) == {}
    monkeypatch.setitem(trained.config["eval"], "evaluators", ["cw"])
    metrics = trained.ctx.call("evaluate", "cw", model=trained.model, dataset=dataset)
    inputs, labels = dataset.batch(torch.arange(60))
    right = predict(trained.model, inputs).argmax(1) == labels
    assert metrics["cw_l2/attacked_examples"] == right.sum().item()
    assert metrics["cw_l2/success_rate"] > 0.9
    # the same examples under PGD-L2 at the median CW distance: about half of them survive
    median = metrics["cw_l2/median_distance"]
    assert 0 < median < metrics["cw_l2/mean_distance"] * 2
    adversarial = attack(trained, inputs[right], labels[right], norm="l2", eps=median, stop_on_success=True,
                         **{k: v for k, v in L2.items() if k != "norm"})
    survived = (predict(trained.model, adversarial).argmax(1) == labels[right]).float().mean()
    assert 0.3 < survived < 0.7


def test_cw_paper_is_cw_l2_with_the_papers_defaults(trained):
    inputs, labels = batch(trained, 20)
    short = {"steps": 20, "binary_search_steps": 3}  # the paper's 10,000 steps take minutes
    paper = trained.ctx.attack(trained.model, inputs, labels,
                               trained.ctx.attack_settings("cw-paper", norm="l2", eps=1.0, **short))
    same = attack(trained, inputs, labels, norm="l2", eps=1.0, lr=0.01, **short)
    faster = attack(trained, inputs, labels, norm="l2", eps=1.0, lr=0.1, **short)
    assert torch.equal(paper, same)
    assert not torch.equal(paper, faster)


def test_cw_paper_takes_only_the_l2_norm(trained):
    inputs, labels = batch(trained, 4)
    with pytest.raises(PluginError, match="norm: l2"):
        trained.ctx.attack(trained.model, inputs, labels, trained.ctx.attack_settings("cw-paper", norm="linf"))


def test_cw_paper_evaluator_reports_cws_distances_with_the_papers_settings(trained, monkeypatch):
    short = {"steps": 30, "binary_search_steps": 3}
    monkeypatch.setitem(trained.config["plugins"], "cw-paper", {**advframe_cw_paper.DEFAULTS, **short})
    monkeypatch.setitem(trained.config["plugins"], "cw", {**trained.config["plugins"]["cw"], **short, "lr": 0.01})
    monkeypatch.setitem(trained.config["eval"], "evaluators", ["cw", "cw-paper"])
    dataset = trained.splits.test.subset(torch.arange(40))
    paper = trained.ctx.call("evaluate", "cw-paper", model=trained.model, dataset=dataset)
    cw = trained.ctx.call("evaluate", "cw", model=trained.model, dataset=dataset)
    assert paper == {key.replace("cw_l2/", "cw_paper_l2/"): value for key, value in cw.items()}
    assert paper["cw_paper_l2/attacked_examples"] > 30
