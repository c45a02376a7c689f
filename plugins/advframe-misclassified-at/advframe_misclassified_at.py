"""``misclassified-at``: A3T, accuracy-aware adversarial training (Altinisik, Messaoud, Sencar and
Chawla, "A3T: Accuracy Aware Adversarial Training", Machine Learning 112(9):3191-3210, 2023,
arXiv:2211.16316; no official code was published).

Standard adversarial training attacks every example with its true label. For an example the model
already misclassifies, that pushes it even further past the decision boundary into a region that is
hard to fit, which bends the boundary and causes robust overfitting. A3T generates adversarial
examples differently for misclassified and correctly classified examples: the prediction is taken on
the clean input, in eval mode, before the attack; correct examples are attacked as in PGD-AT, while
misclassified ones are kept near the boundary. The training loss always uses the training label::

    y_hat = argmax f(x)                (eval mode, clean input, no gradient)
    y_att = y if y_hat == y else rule(y_hat)
    x'    = attack(x, y_att)           (the run's training attack, ``attack`` section)
    L     = CE(f(x'), y)

``misclassified_mode`` chooses the rule for misclassified examples [reconstruction: the paper's
text and code could not be read, so both readings are kept]:

* ``pred_label`` (default): attack with the predicted (wrong) label, i.e. ascend CE(f(x'), y_hat),
  which moves the example back towards the boundary instead of away from it;
* ``clean``: do not attack misclassified examples (x' = x);
* ``true_label``: attack every example with its true label, which is exactly PGD-AT (the control).

The paper covers vision, NLP and tabular tasks. The rule only needs the run's attack, so it works on
every kind of data the core provides: images; tabular sets (``data.name: breast-cancer``, ``wine``,
``iris`` with ``model.name: mlp``: feature-space attacks, each feature scaled to [0, 1] by its range);
text (``data.name: text`` with ``model.name: text-classifier``: the attack perturbs the embeddings, and
an unattacked misclassified example in ``clean`` mode is its clean embedding).

Robust overfitting shows most clearly with noisy labels, which the core's data options do not
offer; ``label_noise`` flips a fixed fraction of the training labels inside ``training_step``
(symmetric noise: a flipped label moves to one of the other classes uniformly). The batch carries no
example indices, so each example is recognised by a hash of its (quantised) input values: the same
image gets the same noisy label in every epoch and in every run with the same ``label_noise_seed``,
whatever the run's seed. This needs ``data.augment: none``.

Settings (``plugins.misclassified-at``)::

    misclassified_mode: pred_label   # pred_label | clean | true_label (= PGD-AT)
    label_noise: 0.0                 # fraction of training labels flipped (symmetric), 0 = none
    label_noise_seed: 0              # which labels are flipped (fixed across runs and methods)

Training logs ``misclassified_fraction`` (of the batch, against the training label, before the
attack), ``adversarial_accuracy`` and, with label noise, ``noisy_label_fraction``.

``evaluate`` reads the run's per-epoch held-out robust accuracy (``test_robust_accuracy``, or
``validation_robust_accuracy`` with ``data.validation_size > 0``, written by the runner's monitor to
``metrics.jsonl``) and reports ``best_robust_accuracy``, ``last_robust_accuracy`` and
``robust_overfitting_gap`` (best minus last) with ``best_robust_epoch``. It works for any training
method, so ``eval.evaluators=[misclassified-at]`` gives PGD-AT runs the same columns in a bench.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.models import eval_mode, unwrap

MODES = ("pred_label", "clean", "true_label")
_HASH_MODULUS = 1_000_003  # a prime: the hash of an input modulo it is close to uniform


@hookimpl
def default_config():
    return {"misclassified_mode": "pred_label", "label_noise": 0.0, "label_noise_seed": 0}


def check_settings(settings, config) -> None:
    if settings["misclassified_mode"] not in MODES:
        raise PluginError(f"misclassified-at: misclassified_mode must be one of {', '.join(MODES)}, "
                          f"got {settings['misclassified_mode']!r}")
    if not 0.0 <= settings["label_noise"] < 1.0:
        raise PluginError(f"misclassified-at: label_noise is a fraction in [0, 1), got {settings['label_noise']}")
    if settings["label_noise"] and config["data"]["augment"] != "none":
        raise PluginError("misclassified-at: label_noise recognises examples by their pixels, which augmentation "
                          "changes; set data.augment=none")


# -- label noise --------------------------------------------------------------------------------

def example_hashes(inputs: torch.Tensor, seed: int, salt: int) -> torch.Tensor:
    """A stable integer in [0, 1_000_003) per example, from its input values (quantised to 1/65535;
    token ids are used as they are)."""
    flat = inputs.detach().flatten(1)
    quantised = (flat.clamp(0, 1) * 65535).round().long() if flat.dtype.is_floating_point else flat.long()
    generator = torch.Generator().manual_seed(seed * 7 + salt)
    weights = torch.randint(1, 2 ** 16, (flat.shape[1],), generator=generator).to(quantised.device)
    return (quantised * weights).sum(1).remainder(_HASH_MODULUS)


def noisy_labels(inputs: torch.Tensor, labels: torch.Tensor, rate: float, seed: int, num_classes: int):
    """Symmetric label noise fixed per example: (new labels, which were flipped)."""
    if rate <= 0 or num_classes < 2:
        return labels, torch.zeros_like(labels, dtype=torch.bool)
    flip = example_hashes(inputs, seed, 1).double() / _HASH_MODULUS < rate
    shift = 1 + example_hashes(inputs, seed, 2).remainder(num_classes - 1)
    return torch.where(flip, (labels + shift).remainder(num_classes), labels), flip


# -- the misclassified-sample rule --------------------------------------------------------------

def attack_space(model, inputs: torch.Tensor) -> torch.Tensor:
    """The clean inputs where the attack works: the inputs themselves, or for token ids the model's
    embeddings (as the core's attacks see them, detached)."""
    if inputs.dtype.is_floating_point:
        return inputs.clone()
    with torch.no_grad():
        return unwrap(model).embed(inputs)


def attack_examples(model, inputs, labels, perturb, mode: str):
    """Adversarial examples under the A3T rule; (x', misclassified mask, attack labels)."""
    with torch.no_grad(), eval_mode(model):
        predicted = model(inputs).argmax(1)
    wrong = predicted != labels
    if mode == "true_label" or not wrong.any():
        return perturb(model, inputs, labels), wrong, labels
    if mode == "pred_label":
        attack_labels = torch.where(wrong, predicted, labels)
        return perturb(model, inputs, attack_labels), wrong, attack_labels
    adversarial = attack_space(model, inputs)  # "clean": misclassified examples stay where they are
    if (~wrong).any():
        adversarial[~wrong] = perturb(model, inputs[~wrong], labels[~wrong])
    return adversarial, wrong, labels


@hookimpl
def training_step(model, batch, perturb, ctx):
    inputs, labels = batch
    settings = ctx.settings
    check_settings(settings, ctx.config)
    labels, flipped = noisy_labels(inputs, labels, settings["label_noise"], settings["label_noise_seed"],
                                   ctx.num_classes)
    adversarial, wrong, _ = attack_examples(model, inputs, labels, perturb, settings["misclassified_mode"])
    logits = model(adversarial)
    logs = {
        "misclassified_fraction": wrong.float().mean().item(),
        "adversarial_accuracy": (logits.argmax(1) == labels).float().mean().item(),
    }
    if settings["label_noise"]:
        logs["noisy_label_fraction"] = flipped.float().mean().item()
    return {"loss": F.cross_entropy(logits, labels), **logs}


# -- robust overfitting from the run's per-epoch monitor -----------------------------------------

def overfitting_gap(lines: list[dict]) -> dict[str, float]:
    """Best, last and best-minus-last held-out robust accuracy over the epochs of one run."""
    key = next((k for k in ("validation_robust_accuracy", "test_robust_accuracy") if lines and k in lines[0]), None)
    if key is None:
        return {}
    series = [line[key] for line in lines]
    best = max(range(len(series)), key=lambda i: series[i])
    return {"best_robust_accuracy": series[best], "last_robust_accuracy": series[-1],
            "robust_overfitting_gap": series[best] - series[-1], "best_robust_epoch": float(best + 1)}


@hookimpl
def evaluate(model, dataset, ctx):
    path = ctx.out_dir / "metrics.jsonl" if ctx.out_dir is not None else None
    if path is None or not path.is_file():
        return {}  # `advframe eval` of a finished run: no training history here
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return overfitting_gap(lines)
