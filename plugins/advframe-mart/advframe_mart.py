"""``mart``: Misclassification Aware adveRsarial Training (Wang, Zou, Yi, Bailey, Ma and Gu,
"Improving Adversarial Robustness Requires Revisiting Misclassified Examples", ICLR 2020,
OpenReview rklOg6EFwS; code: YisenWang/MART, ``mart.py``).

Misclassified clean examples matter more for robustness than correctly classified ones, so MART
(1) replaces the adversarial cross-entropy by a *boosted* cross-entropy that also pushes down the
strongest wrong class, and (2) weights the TRADES-style consistency term of each example by how
wrong its clean prediction is::

    L = CE(f(x'), y) - log(1 - max_{k != y} p_k(x'))
        + beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i))

``x'`` comes from PGD on the cross-entropy from a 0.001 N(0, I) start (eps, step size and steps from
the ``attack`` section: PGD-10 by default), with the model in eval mode; the outer loss runs in train
mode. The "strongest wrong class" is the top class of p(x'), or the second one where the top one is
``y``. The numerical guards of the official code are kept (1.0001 - p inside the boosted term's log,
1.0000001 - p_y for the weight). The official code lets the gradient flow through the weight
``1 - p_y(x)``; ``detach_weight: true`` makes it a fixed per-example weight instead.

Settings (``plugins.mart``)::

    beta: 6.0               # weight of the misclassification-weighted KL term (official: 6 for WRN, 5 for ResNet-18)
    random_start: normal    # start of the inner PGD: normal (official 0.001 N(0, I)) | uniform | zero
    detach_weight: false    # true: no gradient through the weight 1 - p_y(x) (official: false)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.attacks import pgd, step_size
from advframe.losses import kl_to_clean

RANDOM_STARTS = ("normal", "uniform", "zero")


@hookimpl
def default_config():
    return {"beta": 6.0, "random_start": "normal", "detach_weight": False}


def check_settings(settings: dict) -> None:
    if settings["random_start"] not in RANDOM_STARTS:
        raise PluginError(f"mart: random_start must be one of {', '.join(RANDOM_STARTS)}, "
                          f"got {settings['random_start']!r}")


@hookimpl
def setup(ctx):
    check_settings(ctx.settings)


def strongest_wrong_class(adversarial_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The most probable class other than the label: the top class, or the runner-up where the top is ``y``."""
    top2 = adversarial_probs.topk(2, dim=1).indices
    return torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])


def boosted_cross_entropy(adversarial_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(f(x'), y) - log(1 - p_{k*}(x')) per example, k* the strongest wrong class."""
    probs = adversarial_logits.softmax(1)
    wrong = strongest_wrong_class(probs, labels)
    margin_term = -torch.log(1.0001 - probs.gather(1, wrong[:, None]).squeeze(1) + 1e-12)
    return F.cross_entropy(adversarial_logits, labels, reduction="none") + margin_term


def misclassification_weight(clean_logits: torch.Tensor, labels: torch.Tensor, detach: bool = False) -> torch.Tensor:
    """1 - p_y(x) per example: large where the clean prediction is wrong or unsure."""
    true_probs = clean_logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    weight = 1.0000001 - true_probs
    return weight.detach() if detach else weight


def mart_terms(clean_logits: torch.Tensor, adversarial_logits: torch.Tensor, labels: torch.Tensor,
               detach_weight: bool = False) -> dict[str, torch.Tensor]:
    """MART's per-example pieces: boosted CE, KL(p(x) || p(x')) and its weight."""
    return {
        "boosted": boosted_cross_entropy(adversarial_logits, labels),
        "kl": kl_to_clean(adversarial_logits, clean_logits),
        "weight": misclassification_weight(clean_logits, labels, detach_weight),
    }


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    settings, attack = ctx.settings, ctx.attack_params
    check_settings(settings)
    adversarial = pgd(model, inputs, labels, eps=attack["eps"], alpha=step_size(attack), steps=attack["steps"],
                      norm=attack["norm"], random_start=settings["random_start"], loss="ce",
                      generator=ctx.generator)
    clean_logits = model(inputs)
    adversarial_logits = model(adversarial)
    terms = mart_terms(clean_logits, adversarial_logits, labels, settings["detach_weight"])
    boosted = terms["boosted"].mean()
    robust = (terms["kl"] * terms["weight"]).mean()  # per-example KL summed over classes, / B: official
    with torch.no_grad():
        clean_wrong = clean_logits.argmax(1) != labels
    return {
        "loss": boosted + settings["beta"] * robust,
        "boosted_loss": boosted.item(),
        "robust_loss": robust.item(),
        "mean_weight": terms["weight"].mean().item(),
        "clean_error": clean_wrong.float().mean().item(),
        "adversarial_accuracy": (adversarial_logits.argmax(1) == labels).float().mean().item(),
    }
