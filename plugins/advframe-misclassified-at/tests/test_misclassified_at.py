import json

import advframe_misclassified_at as a3t
import pytest
import torch
import torch.nn.functional as F

from advframe import PluginError
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run

NAME = "misclassified-at"


@pytest.mark.parametrize("mode", ["pred_label", "clean", "true_label"])
def test_contract(tmp_path, mode):
    assert_conforms(a3t, NAME, tmp_path, overrides=[f"plugins.{NAME}.misclassified_mode={mode}"])


def test_contract_with_label_noise(tmp_path):
    assert_conforms(a3t, NAME, tmp_path, overrides=[f"plugins.{NAME}.label_noise=0.3"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A briefly trained model: it gets some training examples right and some wrong."""
    host = make_host((a3t, NAME))
    config = tiny_config(host, "erm", ["data.train_size=300", "train.epochs=1", "train.monitor_examples=0",
                                       "attack.eps=0.2", "attack.steps=5",
                                       f"plugins.{NAME}.misclassified_mode=pred_label"])
    run = Run.start(host, config, tmp_path_factory.mktemp("a3t") / "run")
    run.train()
    run.model.eval()
    return run


def attacked(run, mode, inputs, labels):
    run.ctx.generator.manual_seed(0)
    return a3t.attack_examples(run.model, inputs, labels, run.ctx.perturb, mode)


def test_rule_treats_misclassified_and_correct_examples_differently(run):
    inputs, labels = run.splits.train.batch(torch.arange(200))
    a3t_x, wrong, attack_labels = attacked(run, "pred_label", inputs, labels)
    pgd_x, _, _ = attacked(run, "true_label", inputs, labels)
    clean_x, _, _ = attacked(run, "clean", inputs, labels)
    assert 0 < wrong.sum() < len(wrong), "the fixture model must get some examples right and some wrong"
    with torch.no_grad():
        predicted = run.model(inputs).argmax(1)
    # correct examples: every rule attacks them exactly as PGD-AT does
    assert torch.equal(a3t_x[~wrong], pgd_x[~wrong])
    run.ctx.generator.manual_seed(0)  # "clean" attacks only the correct ones (its random start covers those)
    assert torch.equal(clean_x[~wrong], run.ctx.perturb(run.model, inputs[~wrong], labels[~wrong]))
    # misclassified examples: attacked with the predicted label, or left clean
    assert torch.equal(attack_labels[wrong], predicted[wrong])
    assert torch.equal(clean_x[wrong], inputs[wrong])
    assert not torch.equal(a3t_x[wrong], pgd_x[wrong])

    def ce(x, y):
        with torch.no_grad():
            return F.cross_entropy(run.model(x[wrong]), y[wrong], reduction="none")

    # A3T raises the loss of the (wrong) predicted class, moving the example back towards the boundary ...
    assert ce(a3t_x, predicted).mean() > ce(inputs, predicted).mean()
    # ... and so lands it far less deep in the wrong region than PGD-AT, which ascends the true label's loss
    assert ce(a3t_x, labels).mean() < ce(pgd_x, labels).mean()
    assert ce(pgd_x, labels).mean() > ce(inputs, labels).mean()


def test_training_step_logs_the_misclassified_fraction(run):
    inputs, labels = run.splits.train.batch(torch.arange(64))
    with torch.no_grad():
        expected = (run.model(inputs).argmax(1) != labels).float().mean().item()
    run.model.train()
    try:
        output = run.ctx.call("training_step", NAME, model=run.model, batch=(inputs, labels),
                              optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)
    finally:
        run.model.eval()
    assert output["misclassified_fraction"] == pytest.approx(expected)


def test_true_label_mode_is_pgd_at(run):
    """The control: attack every example with its true label and train on CE(f(x'), y), as pgd-at does."""
    inputs, labels = run.splits.train.batch(torch.arange(64))
    run.ctx.config["plugins"][NAME]["misclassified_mode"] = "true_label"
    try:
        run.ctx.generator.manual_seed(0)
        ours = run.ctx.call("training_step", NAME, model=run.model, batch=(inputs, labels),
                            optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)["loss"]
    finally:
        run.ctx.config["plugins"][NAME]["misclassified_mode"] = "pred_label"
    run.ctx.generator.manual_seed(0)
    reference = F.cross_entropy(run.model(run.ctx.perturb(run.model, inputs, labels)), labels)
    assert torch.equal(ours, reference)


def test_label_noise_is_fixed_per_example():
    from advframe import data

    splits = data.load({"name": "digits", "validation_size": 0})
    inputs, labels = splits.train.batch(torch.arange(len(splits.train)))
    noisy, flipped = a3t.noisy_labels(inputs, labels, 0.2, seed=0, num_classes=10)
    assert abs(flipped.float().mean().item() - 0.2) < 0.04
    assert torch.equal(noisy != labels, flipped)  # a flipped label always moves to another class
    # the same example gets the same label whichever batch it comes in, and another seed flips others
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))[:100]
    again, _ = a3t.noisy_labels(inputs[order], labels[order], 0.2, seed=0, num_classes=10)
    assert torch.equal(again, noisy[order])
    _, other = a3t.noisy_labels(inputs, labels, 0.2, seed=1, num_classes=10)
    assert not torch.equal(other, flipped)
    assert torch.equal(a3t.noisy_labels(inputs, labels, 0.0, seed=0, num_classes=10)[0], labels)


def test_evaluate_reports_best_minus_last_robust_accuracy(tmp_path):
    results = tiny_run(a3t, NAME, tmp_path / "run", overrides=["train.epochs=3", "train.monitor_examples=32"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    series = [line["test_robust_accuracy"] for line in lines]
    metrics = results["metrics"]
    assert metrics["robust_overfitting_gap"] == pytest.approx(max(series) - series[-1])
    assert metrics["last_robust_accuracy"] == pytest.approx(series[-1])
    assert series[int(metrics["best_robust_epoch"]) - 1] == max(series)


def test_overfitting_gap_prefers_the_validation_split():
    lines = [{"test_robust_accuracy": 0.9, "validation_robust_accuracy": 0.5},
             {"test_robust_accuracy": 0.1, "validation_robust_accuracy": 0.4}]
    assert a3t.overfitting_gap(lines)["robust_overfitting_gap"] == pytest.approx(0.1)
    assert a3t.overfitting_gap([]) == {}


@pytest.mark.parametrize("mode", ["pred_label", "clean"])
def test_runs_on_tabular_features_with_an_mlp(tmp_path, mode):
    """Feature-space attacks on scikit-learn's breast-cancer set with the core's MLP."""
    results = tiny_run(a3t, NAME, tmp_path / "run", overrides=[
        "data.name=breast-cancer", "data.train_size=null", "data.test_size=null", "model.name=mlp",
        "model.args={hidden: [32]}", "attack.eps=0.05", "train.epochs=3", "train.monitor_examples=0",
        f"plugins.{NAME}.misclassified_mode={mode}", f"plugins.{NAME}.label_noise=0.1"])
    assert results["metrics"]["clean_accuracy"] > 0.8
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < line["noisy_label_fraction"] < 0.3 and "misclassified_fraction" in line


def write_text_data(root):
    """72 distinct short reviews (label noise hashes by content, so repeated texts would share a label)."""
    good, bad = ["wonderful", "delightful", "great", "moving", "superb", "charming"], \
        ["dull", "boring", "awful", "terrible", "tedious", "clumsy"]
    rows = [f"{label}\t{a} and {b} film" for label, words in (("pos", good), ("neg", bad)) for a in words for b in words]
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    (root / "test.tsv").write_text("pos\tgreat wonderful film\nneg\tboring awful mess\npos\tgreat great moving\n")


@pytest.mark.parametrize("mode", ["pred_label", "clean"])
def test_runs_on_text_with_embedding_space_attacks(tmp_path, mode):
    write_text_data(tmp_path)
    results = tiny_run(a3t, NAME, tmp_path / "run", overrides=[
        "data.name=text", f"data.root={tmp_path}", "data.max_length=6", "data.train_size=null",
        "data.test_size=null", "model.name=text-classifier", "model.args={embedding_dim: 16, channels: 16}",
        "train.epochs=5", "attack.eps=1.0", "attack.norm=l2", "train.monitor_examples=0",
        "eval.attacks=[{name: test-pgd, steps: 5, alpha: 0.3}]", f"plugins.{NAME}.misclassified_mode={mode}",
        f"plugins.{NAME}.label_noise=0.2"])
    assert 0.0 <= results["metrics"]["robust_accuracy"] <= results["metrics"]["clean_accuracy"]
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < line["noisy_label_fraction"] < 0.5  # token ids hash to stable noisy labels too


@pytest.mark.parametrize("overrides", [[f"plugins.{NAME}.misclassified_mode=boundary"],
                                       [f"plugins.{NAME}.label_noise=1.5"],
                                       [f"plugins.{NAME}.label_noise=0.2", "data.augment=flip"]])
def test_bad_settings_raise_one_clear_error(tmp_path, overrides):
    with pytest.raises(PluginError, match="misclassified-at"):
        tiny_run(a3t, NAME, tmp_path / "run", overrides=overrides)
