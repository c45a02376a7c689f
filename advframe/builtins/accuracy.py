"""``accuracy``: clean and robust accuracy, overall and per class, under every ``eval.attacks`` entry.

The first evaluation attack gives ``robust_accuracy``, ``worst_class_robust_accuracy`` and
``per_class_robust_accuracy``; every attack also gives ``robust_accuracy/<label>``; with more than one
attack, ``robust_accuracy/worst_case`` counts an example as robust only if it survives all of them
(per-example worst case, as AutoAttack reports). Query-based attacks that report their queries
(``ctx.record_queries``) add ``attack_success_rate``, ``mean_queries`` and ``median_queries`` (over
successful examples, initially misclassified ones excluded) for their label.
"""

import math

import torch

from advframe.context import attack_label
from advframe.hookspecs import hookimpl


def per_class_accuracy(correct: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    hits = torch.zeros(num_classes).index_add_(0, labels, correct.float())
    counts = torch.bincount(labels, minlength=num_classes).float()
    return [float(h / c) if c else float("nan") for h, c in zip(hits, counts)]


def worst_class(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]  # NaN: a class absent from the split
    return min(present) if present else float("nan")


def segmentation_metrics(model, ctx) -> dict:
    """Few-shot segmentation: Dice of the query masks over the fixed test tasks, clean and attacked."""
    from advframe.episodes import mean_and_ci95
    from advframe.segmentation import dice

    def per_task(predictions):
        return torch.stack([dice(p, t.query_labels).mean() for p, t in zip(predictions, ctx.test_tasks)])

    clean = ctx.task_predictions(model)
    mean, ci = mean_and_ci95(per_task(clean))
    pixels = torch.stack([(p == t.query_labels).float().mean() for p, t in zip(clean, ctx.test_tasks)])
    metrics = {"dice": mean, "dice_ci95": ci, "pixel_accuracy": pixels.mean().item(), "test_tasks": float(len(clean))}
    for index, attack in enumerate(ctx.config["eval"]["attacks"]):
        mean, ci = mean_and_ci95(per_task(ctx.task_predictions(model, attack)))
        metrics[f"robust_dice/{attack_label(attack)}"] = mean
        metrics[f"robust_dice_ci95/{attack_label(attack)}"] = ci
        if index == 0:
            metrics["robust_dice"], metrics["robust_dice_ci95"] = mean, ci
    return metrics


def episodic_metrics(model, ctx) -> dict:
    """Few-shot runs: accuracy over the fixed test tasks, mean and 95% confidence interval."""
    from advframe.episodes import mean_and_ci95

    if ctx.test_tasks and ctx.test_tasks[0].query_labels.dim() == 3:
        return segmentation_metrics(model, ctx)

    clean = ctx.task_correct(model)
    mean, ci = mean_and_ci95(torch.stack([c.float().mean() for c in clean]))
    metrics = {"clean_accuracy": mean, "clean_accuracy_ci95": ci, "test_tasks": float(len(clean))}
    for index, attack in enumerate(ctx.config["eval"]["attacks"]):
        robust = [(a & c).float().mean() for a, c in zip(ctx.task_correct(model, attack), clean)]
        mean, ci = mean_and_ci95(torch.stack(robust))
        label = attack_label(attack)
        metrics[f"robust_accuracy/{label}"], metrics[f"robust_accuracy_ci95/{label}"] = mean, ci
        if index == 0:
            metrics["robust_accuracy"], metrics["robust_accuracy_ci95"] = mean, ci
    return metrics


@hookimpl
def evaluate(model, dataset, ctx):
    if ctx.episodic:
        return episodic_metrics(model, ctx)
    num_classes = ctx.num_classes
    clean = ctx.predictions(model, dataset)
    per_class_clean = per_class_accuracy(clean.correct, clean.labels, num_classes)
    metrics = {
        "clean_accuracy": clean.correct.float().mean().item(),
        "worst_class_clean_accuracy": worst_class(per_class_clean),
        "per_class_clean_accuracy": per_class_clean,
    }
    robust_all = clean.correct.clone()
    for index, attack in enumerate(ctx.config["eval"]["attacks"]):
        # a clean mistake is a robust mistake too, whatever the attack returned
        correct = ctx.predictions(model, dataset, attack).correct & clean.correct
        robust_all &= correct
        label = attack_label(attack)
        metrics[f"robust_accuracy/{label}"] = correct.float().mean().item()
        broken = clean.correct & ~correct  # over the examples the model gets right before the attack
        metrics[f"attack_success_rate/{label}"] = (broken.sum() / clean.correct.sum()).item() \
            if clean.correct.any() else float("nan")
        queries = ctx.query_statistics(model, dataset, attack)
        for key, value in (queries or {}).items():
            metrics[f"{key}/{label}"] = value
        if index == 0:
            per_class = per_class_accuracy(correct, clean.labels, num_classes)
            metrics["robust_accuracy"] = correct.float().mean().item()
            metrics["worst_class_robust_accuracy"] = worst_class(per_class)
            metrics["per_class_robust_accuracy"] = per_class
    if len(ctx.config["eval"]["attacks"]) > 1:
        metrics["robust_accuracy/worst_case"] = robust_all.float().mean().item()
    return metrics
