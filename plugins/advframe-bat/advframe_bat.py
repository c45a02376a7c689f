"""``bat``: Balance Adversarial Training (Sun et al., "Improving Robust Fairness via Balance
Adversarial Training", AAAI 2023, arXiv:2209.07534; code:
silvercherry/Improving-Robust-Fairness-via-Balance-Adversarial-Training).

Adversarial training is unfair across classes in two ways, and BAT answers each:

* source-class fairness: a fixed-strength attack pushes easy classes far past the decision boundary.
  BAT stops each example's attack at the boundary (early-stopped KL-PGD), which adapts the attack
  strength per example and so per class. The natural term is trained on the *last clean* point and
  the TRADES boundary term on the *first adversarial* point, ``extra_steps`` past the crossing.
* target-class fairness: adversarial examples flow into a few target classes. BAT adds a uniform
  constraint, KL(p || uniform), on both boundary points so none of them favours a target class::

    L = CE(f(x_lc), y) + beta * KL(p(x) || p(x_fa)) + w * [KL(p(x_lc) || u) + KL(p(x_fa) || u)]

Eps, step size and maximum steps come from the ``attack`` section. The official code finds the two
points with two runs from independent 0.001 N(0, I) starts; by default both come from one
trajectory here (same points up to that tiny start noise, half the cost); ``separate_runs: true``
does what the official code does.

Settings (``plugins.bat``)::

    beta: 6.0              # weight of the boundary (TRADES) term, as the official code
    uniform_weight: 1.0    # weight of the two uniform terms (hard-coded 1 in the official code)
    extra_steps: 1         # tau: steps past the first misclassification for the first-adversarial point
    random_start: normal   # normal (official) | uniform | zero
    separate_runs: false   # true: two independent attack runs, as the official code

``evaluate`` adds the fairness metrics: the spread of class-wise robust accuracy
(``robust_accuracy_class_std``, ``robust_fairness_gap``), the normalised entropy of the classes
adversarial examples land in (``adversarial_target_entropy``; 1 = uniform), and the boundary
mechanism on the test set: mean attack steps to the boundary per class and checks that every last
clean point is still correct and every stopped first-adversarial point is wrong.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from advframe import hookimpl
from advframe.attacks import boundary_pgd, step_size
from advframe.losses import kl_to_clean, uniform_kl
from advframe.models import eval_mode


@hookimpl
def default_config():
    return {"beta": 6.0, "uniform_weight": 1.0, "extra_steps": 1, "random_start": "normal", "separate_runs": False}


def boundary_points(model, inputs, labels, ctx):
    attack, settings = ctx.attack_params, ctx.settings
    run = dict(eps=attack["eps"], alpha=step_size(attack), steps=attack["steps"], norm=attack["norm"],
               random_start=settings["random_start"], loss="kl", extra_steps=settings["extra_steps"],
               generator=ctx.generator)
    points = boundary_pgd(model, inputs, labels, **run)
    if settings["separate_runs"]:
        points.first_adversarial = boundary_pgd(model, inputs, labels, **run).first_adversarial
    return points


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    settings = ctx.settings
    points = boundary_points(model, inputs, labels, ctx)
    last_clean_logits = model(points.last_clean)
    first_adversarial_logits = model(points.first_adversarial)
    clean_logits = model(inputs)
    natural = F.cross_entropy(last_clean_logits, labels)
    robust = kl_to_clean(first_adversarial_logits, clean_logits).mean()
    uniform = uniform_kl(last_clean_logits).mean() + uniform_kl(first_adversarial_logits).mean()
    crossed = points.flip_step >= 0
    return {
        "loss": natural + settings["beta"] * robust + settings["uniform_weight"] * uniform,
        "natural_loss": natural.item(),
        "robust_loss": robust.item(),
        "uniform_loss": uniform.item(),
        "crossed_fraction": crossed.float().mean().item(),
        "mean_boundary_step": points.flip_step[crossed].float().mean().item() if crossed.any() else float(ctx.attack_params["steps"]),
    }


def normalised_entropy(counts: torch.Tensor) -> float:
    total = counts.sum()
    if total == 0 or len(counts) < 2:
        return float("nan")
    p = counts.float() / total
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(len(counts)))


def boundary_statistics(model, dataset, ctx) -> dict[str, object]:
    """Per-class attack steps to the boundary, and the last-clean / first-adversarial invariants."""
    steps = ctx.attack_params["steps"]
    boundary_step = torch.zeros(len(dataset))
    last_clean_ok, first_adv_ok, stopped, clean_correct, crossed_later = [], [], [], [], []
    batch_size = ctx.config["eval"]["batch_size"]
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            inputs, labels = dataset.batch(slice(start, start + batch_size), ctx.device)
            points = boundary_points(model, inputs, labels, ctx)
            with torch.no_grad():
                clean = model(inputs).argmax(1) == labels
                last_clean_ok.append(model(points.last_clean).argmax(1) == labels)
                first_adv_ok.append(model(points.first_adversarial).argmax(1) != labels)
            flip = points.flip_step.float().cpu()
            boundary_step[start:start + len(labels)] = torch.where(flip >= 0, flip, torch.tensor(float(steps)))
            stopped.append(points.stopped.cpu())
            crossed_later.append((points.flip_step > 0).cpu())
            clean_correct.append(clean.cpu())
    last_clean_ok, first_adv_ok = torch.cat(last_clean_ok).cpu(), torch.cat(first_adv_ok).cpu()
    stopped, clean_correct, crossed_later = torch.cat(stopped), torch.cat(clean_correct), torch.cat(crossed_later)
    per_class = []
    for cls in range(ctx.num_classes):
        members = (dataset.labels == cls) & clean_correct
        per_class.append(float(boundary_step[members].mean()) if members.any() else float("nan"))
    present = [v for v in per_class if v == v]
    return {
        "per_class_boundary_steps": per_class,
        "boundary_steps_class_spread": max(present) - min(present) if present else float("nan"),
        # checked where a last-clean point exists: the walk crossed after at least one correct step
        "last_clean_correct_fraction": float(last_clean_ok[crossed_later].float().mean()) if crossed_later.any() else float("nan"),
        "first_adversarial_wrong_fraction": float(first_adv_ok[stopped].float().mean()) if stopped.any() else float("nan"),
    }


@hookimpl
def evaluate(model, dataset, ctx):
    clean = ctx.predictions(model, dataset)
    attack = ctx.config["eval"]["attacks"][0]
    adversarial = ctx.predictions(model, dataset, attack)
    robust = adversarial.correct & clean.correct
    per_class = torch.stack([robust[clean.labels == c].float().mean() for c in range(ctx.num_classes)
                             if (clean.labels == c).any()])
    # where do successful adversarial examples of correctly classified inputs land?
    flipped = clean.correct & ~adversarial.correct
    targets = torch.bincount(adversarial.predicted[flipped], minlength=ctx.num_classes)
    return {
        "robust_accuracy_class_std": float(per_class.std(unbiased=False)),
        "robust_fairness_gap": float(per_class.max() - per_class.min()),
        "adversarial_target_entropy": normalised_entropy(targets),
        **boundary_statistics(model, dataset, ctx),
    }
