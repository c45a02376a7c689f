"""The headline robust accuracy: protocols, the per-example worst case, labels, empty attack lists."""

import copy
import types

import pytest
import torch
from torch import nn

from advframe import hookimpl
from advframe.config import PROTOCOLS, dump, load_file, resolve
from advframe.context import RunContext
from advframe.data import ArrayDataset
from advframe.errors import ConfigError
from advframe.plugins import make_plugin_host
from advframe.runner import Run
from advframe.testing import make_host, tiny_config


class LabelReader(nn.Module):
    """Reads the class from pixel (0, 0) (class / 10) unless the marker pixel (0, 1) is set."""

    def forward(self, inputs):
        classes = (inputs[:, 0, 0, 0] * 10).round().long()
        wrong = inputs[:, 0, 0, 1] > 0.5
        predicted = torch.where(wrong, (classes + 1) % 10, classes)
        return nn.functional.one_hot(predicted, 10).float() * 5 + 0 * inputs.flatten(1)[:, :1]


def breaker(name, broken_classes):
    """An attack that breaks exactly the examples of ``broken_classes`` (by setting the marker)."""
    def generate_perturbation(inputs, labels):
        adversarial = inputs.clone()
        hit = torch.isin(labels, torch.tensor(broken_classes))
        adversarial[hit, 0, 0, 1] = 1.0
        return adversarial

    module = types.ModuleType(name)
    module.generate_perturbation = hookimpl(generate_perturbation)
    return module, name


def marker_data():
    inputs = torch.zeros(10, 1, 4, 4)
    labels = torch.arange(10)
    inputs[:, 0, 0, 0] = labels / 10
    return ArrayDataset(inputs, labels, 10, [str(c) for c in range(10)])


def evaluate(attacks, cascade=True):
    host = make_host(breaker("break-low", [0, 1, 2]), breaker("break-mid", [2, 3, 4]))
    config = tiny_config(host, user={"attack": {"eps": 1.0}, "eval": {"attacks": attacks, "cascade": cascade}})
    ctx = RunContext(config, host, device=torch.device("cpu"), num_classes=10, input_shape=(1, 4, 4))
    return ctx.call("evaluate", "accuracy", model=LabelReader(), dataset=marker_data())


@pytest.mark.parametrize("cascade", [True, False])
def test_the_headline_is_the_per_example_worst_case(cascade):
    metrics = evaluate([{"name": "break-low"}, {"name": "break-mid"}], cascade)
    assert metrics["clean_accuracy"] == 1.0
    # each attack alone leaves 7 of 10; together they break 0-4, so 5 of 10 survive both
    assert metrics["robust_accuracy"] == pytest.approx(0.5)
    assert metrics["per_class_robust_accuracy"] == [0.0] * 5 + [1.0] * 5
    assert metrics["worst_class_robust_accuracy"] == 0.0
    if cascade:
        assert metrics["robust_accuracy_after/break-low-linf-1"] == pytest.approx(0.7)
        assert metrics["robust_accuracy_after/break-mid-linf-1"] == pytest.approx(0.5)
        # the second entry attacked only the 7 survivors and broke 2 of them (class 2 was already broken)
        assert metrics["attack_success_rate/break-mid-linf-1"] == pytest.approx(2 / 7)
    else:
        assert metrics["robust_accuracy/break-low-linf-1"] == pytest.approx(0.7)
        assert metrics["robust_accuracy/break-mid-linf-1"] == pytest.approx(0.7)


def test_no_attacks_gives_clean_accuracy_only():
    metrics = evaluate([])
    assert metrics["clean_accuracy"] == 1.0
    assert "robust_accuracy" not in metrics


def test_labels_say_loss_norm_eps_and_steps():
    host = make_host()
    config = tiny_config(host, user={"eval": {"attacks": [{"name": "test-pgd"}, {"name": "test-pgd", "norm": "l2",
                                                                                  "eps": 0.5}]}})
    assert [a["label"] for a in config["eval"]["attacks"]] == ["test-pgd-linf-0.1-3", "test-pgd-l2-0.5-3"]


def test_entries_differing_in_an_unshown_setting_get_distinct_labels():
    host = make_host()
    config = tiny_config(host, user={"eval": {"attacks": [{"name": "test-pgd", "alpha": 0.01},
                                                          {"name": "test-pgd", "alpha": 0.02}]}})
    labels = [a["label"] for a in config["eval"]["attacks"]]
    assert labels == ["test-pgd-linf-0.1-3-alpha0.01", "test-pgd-linf-0.1-3-alpha0.02"]


def test_a_true_duplicate_is_rejected_before_any_work():
    host = make_host()
    with pytest.raises(ConfigError, match=r"eval.attacks\[1\] repeats eval.attacks\[0\]"):
        tiny_config(host, user={"eval": {"attacks": [{"name": "test-pgd", "steps": 5}, {"name": "test-pgd", "steps": 5}]}})


def test_a_label_given_twice_is_rejected_and_a_given_label_is_kept():
    host = make_host()
    with pytest.raises(ConfigError, match="used twice"):
        tiny_config(host, user={"eval": {"attacks": [{"name": "test-pgd", "steps": 5, "label": "mine"},
                                                     {"name": "test-pgd", "steps": 6, "label": "mine"}]}})
    config = tiny_config(host, user={"eval": {"attacks": [{"name": "test-pgd", "label": "mine"}]}})
    assert config["eval"]["attacks"][0]["label"] == "mine"


def test_the_default_protocol_is_quick_and_a_saved_config_resolves_again(tmp_path):
    host = make_plugin_host()
    config = resolve(host, {})
    assert config["eval"]["protocol"] == "quick"
    assert [a["name"] for a in config["eval"]["attacks"]] == [e["name"] for e in PROTOCOLS["quick"]]
    assert [a["label"] for a in config["eval"]["attacks"]] == [
        "pgd-ce-linf-0.2-20", "apgd-ce-linf-0.2-100", "apgd-dlr-targeted-linf-0.2-100"]
    (tmp_path / "config.yaml").write_text(dump(config))
    assert resolve(host, load_file(tmp_path / "config.yaml")) == config
    standard = resolve(host, {"eval": {"protocol": "standard"}})
    assert [a["name"] for a in standard["eval"]["attacks"]] == ["pgd", "apgd", "apgd", "fab", "square"]
    assert standard["eval"]["attacks"][-1]["budget"] == 5000 and standard["eval"]["attacks"][-1]["p_init"] == 0.8


def test_a_list_given_without_a_protocol_is_custom_and_a_conflict_is_an_error(tmp_path):
    host = make_plugin_host()
    config = resolve(host, {"eval": {"attacks": [{"name": "pgd", "steps": 5}]}})
    assert config["eval"]["protocol"] == "custom"
    saved = copy.deepcopy(resolve(host, {}))
    saved["eval"]["attacks"][0]["steps"] = 7
    with pytest.raises(ConfigError, match="eval.protocol=custom"):
        resolve(host, saved)
    with pytest.raises(ConfigError, match="eval.attacks, which is not set"):
        resolve(host, {"eval": {"protocol": "custom"}})


def test_a_missing_protocol_component_is_an_error_that_names_it():
    host = make_host()  # built-ins only: no pgd, apgd, fab or square installed
    with pytest.raises(ConfigError, match="needs the attack plugin 'pgd'.*pip install advframe-pgd"):
        resolve(host, {"attack": {"name": "test-pgd"}})


def test_classification_run_with_no_eval_attacks(tmp_path):
    host = make_host()
    config = tiny_config(host, user={"eval": {"attacks": []}})
    results = Run.start(host, config, tmp_path / "run").execute()
    assert "robust_accuracy" not in results["metrics"] and results["metrics"]["clean_accuracy"] > 0
    assert results["evaluation"]["attacks"] == []


def test_fewshot_run_with_no_eval_attacks_monitors_and_finishes(tmp_path):
    from advframe import models

    def run_defaults():
        return {"data": {"name": "mnist-fewshot"}, "meta": {"ways": 2, "queries": 3, "test_tasks": 4}}

    def adapt_task(model, support):
        inputs, labels = support
        features = models.embed(model, inputs)
        centroids = torch.stack([features[labels == c].mean(0) for c in range(2)])
        return nn.Sequential(model.features, Distance(centroids.detach()))

    module = types.ModuleType("nearest")
    module.run_defaults = hookimpl(run_defaults)
    module.adapt_task = hookimpl(adapt_task)
    host = make_host((module, "nearest"))
    config = tiny_config(host, "nearest", user={"data": {"name": "mnist-fewshot"}, "eval": {"attacks": []},
                                                  "train": {"monitor_examples": 12}})
    results = Run.start(host, config, tmp_path / "run").execute()
    assert "robust_accuracy" not in results["metrics"] and results["metrics"]["clean_accuracy"] > 0


class Distance(nn.Module):
    def __init__(self, centroids):
        super().__init__()
        self.centroids = centroids

    def forward(self, features):
        return -torch.cdist(features, self.centroids)
