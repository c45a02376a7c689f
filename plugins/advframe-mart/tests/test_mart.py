import pytest
import torch
import torch.nn.functional as F

import advframe_mart
from advframe import PluginError
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run


def test_contract(tmp_path):
    assert_conforms(advframe_mart, "mart", tmp_path)


def test_strongest_wrong_class_skips_the_label():
    probs = torch.tensor([[0.6, 0.3, 0.1],    # top is the label 0 -> runner-up 1
                          [0.2, 0.5, 0.3],    # top is 1, label 2 -> 1
                          [0.1, 0.2, 0.7]])   # top is the label 2 -> runner-up 1
    labels = torch.tensor([0, 2, 2])
    assert advframe_mart.strongest_wrong_class(probs, labels).tolist() == [1, 1, 1]


def test_boosted_cross_entropy_adds_the_strongest_wrong_class_term():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 0.5]])
    labels = torch.tensor([0, 2])
    probs = logits.softmax(1)
    expected = F.cross_entropy(logits, labels, reduction="none") - torch.log(
        1.0001 - torch.stack([probs[0, 1], probs[1, 1]]) + 1e-12)
    assert torch.allclose(advframe_mart.boosted_cross_entropy(logits, labels), expected)
    # the boost makes the loss larger than plain CE
    assert (expected > F.cross_entropy(logits, labels, reduction="none")).all()


def trained_logits(tmp_path):
    """Clean logits of a model trained one tiny epoch on digits, on 128 held-out images."""
    from advframe.runner import Run

    host = make_host((advframe_mart, "mart"))
    config = tiny_config(host, "erm", ["train.epochs=3", "data.train_size=512", "data.test_size=128",
                                       "train.monitor_examples=0"])
    run = Run.start(host, config, tmp_path / "natural")
    run.train()
    inputs, labels = run.splits.test.batch(torch.arange(128))
    run.model.eval()
    with torch.no_grad():
        return run.model(inputs), labels


def test_misclassified_examples_get_a_larger_kl_weight(tmp_path):
    clean_logits, labels = trained_logits(tmp_path)
    wrong = clean_logits.argmax(1) != labels
    assert 0 < wrong.sum() < len(labels), "need both correct and misclassified examples"
    terms = advframe_mart.mart_terms(clean_logits, clean_logits + torch.randn_like(clean_logits), labels)
    weight = terms["weight"]
    assert torch.allclose(weight, 1 - clean_logits.softmax(1)[torch.arange(len(labels)), labels], atol=1e-6)
    # misclassified examples weigh more than correct ones on average, and more than every correct
    # example the model gives more than half its probability mass
    assert weight[wrong].mean() > weight[~wrong].mean()
    confident = ~wrong & (clean_logits.softmax(1).max(1).values > 0.5)
    assert confident.any()
    assert weight[wrong].min() > weight[confident].max()


def test_weight_carries_a_gradient_unless_detached():
    clean_logits = torch.randn(8, 10, requires_grad=True)
    labels = torch.randint(0, 10, (8,))
    kept = advframe_mart.mart_terms(clean_logits, torch.randn(8, 10), labels)["weight"]
    assert kept.requires_grad
    cut = advframe_mart.mart_terms(clean_logits, torch.randn(8, 10), labels, detach_weight=True)["weight"]
    assert not cut.requires_grad


def test_bad_random_start_is_a_one_line_error(tmp_path):
    with pytest.raises(PluginError, match="random_start"):
        tiny_run(advframe_mart, "mart", tmp_path / "run", overrides=["plugins.mart.random_start=gauss"])
