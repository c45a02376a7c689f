import json

import advframe_adv4adv as a4a
import pytest
import torch
import torch.nn.functional as F

from advframe import PluginError, checkpoint
from advframe.attacks import pgd
from advframe.models import reverse_gradient
from advframe.runner import Run
from advframe.testing import assert_conforms, make_host, tiny_config, tiny_run


def start(tmp_path, overrides=()):
    host = make_host((a4a, "adv4adv"))
    return Run.start(host, tiny_config(host, "adv4adv", list(overrides)), tmp_path / "run")


def step_output(run, inputs, labels):
    return run.ctx.call("training_step", "adv4adv", model=run.train_model, batch=(inputs, labels),
                        optimizer=run.ctx.optimizers["model"], perturb=run.ctx.perturb)


def test_contract(tmp_path):
    assert_conforms(a4a, "adv4adv", tmp_path)


def test_contract_with_feature_discriminators(tmp_path):
    assert_conforms(a4a, "adv4adv", tmp_path, overrides=["plugins.adv4adv.feature_weight=0.1"])


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_the_domain_gradient_reaching_the_model_is_reversed(scale):
    torch.manual_seed(0)
    discriminators = a4a.ClassDiscriminators(10, 10, [50, 20])
    logits = torch.randn(24, 10, requires_grad=True)
    labels = torch.arange(24) % 10
    domains = (torch.arange(24) < 12).float()

    def gradients(reversed_):
        discriminators.zero_grad()
        inputs = reverse_gradient(logits, scale) if reversed_ else logits
        a4a.domain_loss(discriminators(inputs, labels), domains, labels, 10).backward()
        grad, logits.grad = logits.grad.clone(), None
        return grad, [p.grad.clone() for p in discriminators.parameters()]

    to_model, to_discriminators = gradients(True)
    plain_to_model, plain_to_discriminators = gradients(False)
    assert plain_to_model.abs().sum() > 0
    assert torch.equal(to_model, -scale * plain_to_model)  # the model ascends the domain loss ...
    for ours, plain in zip(to_discriminators, plain_to_discriminators):  # ... the discriminators descend it
        assert torch.equal(ours, plain)


def test_in_a_training_step_the_model_gets_minus_gamma_times_the_domain_gradient(tmp_path):
    run = start(tmp_path, ["plugins.adv4adv.gamma=0.5"])
    inputs, labels = run.splits.train.batch(torch.arange(16), run.ctx.device)
    run.model.train()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    full = step_output(run, inputs, labels)["loss"]
    grads_full = torch.autograd.grad(full, list(run.model.parameters()))
    # the same step without the domain term: the difference is the reversed domain gradient
    run.model.load_state_dict(before)  # the step's forward pass moved the BatchNorm statistics
    adversarial = pgd(run.model, inputs, labels, eps=run.config["attack"]["eps"], alpha=run.config["attack"]["eps"],
                      steps=1, random_start="zero")
    logits = run.model(torch.cat([inputs, adversarial]))
    both_labels = torch.cat([labels, labels])
    classification = F.cross_entropy(logits, both_labels)
    domains = torch.cat([torch.ones(16), torch.zeros(16)])
    domain = a4a.domain_loss(run.ctx.models[a4a.LOGITS](logits, both_labels), domains, both_labels, 10)
    grads_ce = torch.autograd.grad(classification, list(run.model.parameters()), retain_graph=True)
    grads_domain = torch.autograd.grad(domain, list(run.model.parameters()))
    for g_full, g_ce, g_domain in zip(grads_full, grads_ce, grads_domain):
        torch.testing.assert_close(g_full, g_ce - 0.5 * g_domain, rtol=1e-4, atol=1e-6)


def test_a_batch_missing_classes_gives_a_finite_loss_and_each_class_its_own_discriminator(tmp_path):
    run = start(tmp_path)
    inputs, labels = run.splits.train.batch(torch.arange(96), run.ctx.device)
    keep = (labels == 0) | (labels == 3)  # only two of ten classes present
    inputs, labels = inputs[keep][:12], labels[keep][:12]
    assert set(labels.tolist()) == {0, 3}
    output = step_output(run, inputs, labels)
    assert torch.isfinite(output["loss"])
    run.ctx.step(output["loss"])
    heads = run.ctx.models[a4a.LOGITS].heads
    for k, head in enumerate(heads):  # class 0 is judged by head 0 (no index shift), absent classes by none
        touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        assert touched == (k in (0, 3)), k
    # a class with no examples adds nothing, and a batch of one class is fine too
    domains = torch.tensor([1.0, 0.0])
    assert torch.isfinite(a4a.domain_loss(torch.tensor([0.3, -0.2]), domains, torch.tensor([7, 7]), 10))


def test_gamma_zero_is_fgsm_at_on_clean_and_adversarial_inputs_with_a_monitor(tmp_path):
    run = start(tmp_path, ["plugins.adv4adv.gamma=0"])
    inputs, labels = run.splits.train.batch(torch.arange(16), run.ctx.device)
    run.model.train()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    output = step_output(run, inputs, labels)
    ours = torch.autograd.grad(output["loss"], list(run.model.parameters()), retain_graph=True)
    monitor = run.ctx.models[a4a.LOGITS]
    assert any(g is not None for g in torch.autograd.grad(output["loss"], list(monitor.parameters()), allow_unused=True))
    run.model.load_state_dict(before)
    adversarial = pgd(run.model, inputs, labels, eps=run.config["attack"]["eps"], alpha=run.config["attack"]["eps"],
                      steps=1, random_start="zero")
    reference = F.cross_entropy(run.model(torch.cat([inputs, adversarial])), torch.cat([labels, labels]))
    for a, b in zip(ours, torch.autograd.grad(reference, list(run.model.parameters()))):
        assert torch.equal(a, b)


def test_discriminators_are_logged_saved_and_restored(tmp_path):
    results = tiny_run(a4a, "adv4adv", tmp_path / "run", overrides=["train.epochs=2", "plugins.adv4adv.probe_steps=50"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(0 <= line["discriminator_accuracy"] <= 1 for line in lines)
    assert 0 <= results["metrics"]["domain_probe_accuracy"] <= 1
    assert 0 <= results["metrics"]["discriminator_accuracy"] <= 1
    tensors, _ = checkpoint.load_tensors(tmp_path / "run" / "model.safetensors")
    assert any(k.startswith(f"{a4a.LOGITS}/heads.9.") for k in tensors)
    host = make_host((a4a, "adv4adv"))
    resumed = Run.resume(host, tmp_path / "run")
    for key, value in resumed.ctx.models[a4a.LOGITS].state_dict().items():
        assert torch.equal(tensors[f"{a4a.LOGITS}/{key}"], value)
    assert "logit_discriminators.state.0.exp_avg" in "".join(
        k.removeprefix("optim/") for k in checkpoint.load_tensors(tmp_path / "run" / "state.safetensors")[0])


def test_source_epochs_train_on_clean_inputs_only(tmp_path):
    run = start(tmp_path, ["train.epochs=2", "plugins.adv4adv.source_epochs=1"])
    inputs, labels = run.splits.train.batch(torch.arange(16), run.ctx.device)
    output = step_output(run, inputs, labels)
    assert "discriminator_accuracy" not in output
    torch.testing.assert_close(output["loss"], F.cross_entropy(run.model(inputs), labels))


@pytest.mark.parametrize("override, message", [
    ("plugins.adv4adv.gamma=-1", "gamma must be >= 0"),
    ("plugins.adv4adv.ce_on=clean", "ce_on must be one of"),
    ("plugins.adv4adv.source_epochs=1", "source_epochs must be in"),
    ("plugins.adv4adv.logit_hidden=[0]", "logit_hidden must be"),
])
def test_bad_settings_say_what_to_change(tmp_path, override, message):
    with pytest.raises(PluginError, match=message):
        start(tmp_path, [override])


def test_cost_counts_the_classifier_passes_not_the_discriminators(tmp_path):
    # by hand, per training example: FGSM (one forward and backward pass of the classifier), then the
    # classifier on the clean and the FGSM copy (two more); the discriminators' passes are not counted
    results = tiny_run(a4a, "adv4adv", tmp_path / "run", overrides=["train.epochs=1", "data.train_size=96"])
    assert results["cost"]["gradient_evaluations"] == 3 * 96
