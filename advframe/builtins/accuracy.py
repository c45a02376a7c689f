"""``accuracy``: clean and robust accuracy, overall and per class, under the ``eval.attacks`` entries.

The headline ``robust_accuracy`` (with ``worst_class_robust_accuracy`` and
``per_class_robust_accuracy``) is the per-example worst case over all entries: an example counts as
robust only if no entry breaks it (as AutoAttack reports). ``results.json`` names the entries under
``evaluation``. Each entry adds its own rows under its label:

* ``robust_accuracy_after/<label>``: robust under this entry and every earlier one (the entries run
  as a cascade, each on the examples still robust, as AutoAttack's components do); with
  ``eval.cascade: false`` every entry attacks every example the model gets right, and its row is
  ``robust_accuracy/<label>``, that attack alone;
* ``attack_success_rate/<label>``: the fraction of the examples it attacked that it broke;
* for query-based attacks that report their queries (``ctx.record_queries``):
  ``mean_queries``, ``median_queries`` (over its successes) and ``attacked_examples``.

Few-shot runs report the same over their fixed test tasks (mean and 95% confidence interval; every
attack's row is that attack alone); few-shot segmentation reports Dice, the headline being each
task's lowest Dice over the attacks.
"""

import math

import torch

from advframe.episodes import mean_and_ci95
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
    from advframe.segmentation import dice

    def per_task(predictions):
        return torch.stack([dice(p, t.query_labels).mean() for p, t in zip(predictions, ctx.test_tasks)])

    clean = ctx.task_predictions(model)
    mean, ci = mean_and_ci95(per_task(clean))
    pixels = torch.stack([(p == t.query_labels).float().mean() for p, t in zip(clean, ctx.test_tasks)])
    metrics = {"dice": mean, "dice_ci95": ci, "pixel_accuracy": pixels.mean().item(), "test_tasks": float(len(clean))}
    worst = None
    for attack in ctx.config["eval"]["attacks"]:
        scores = per_task(ctx.task_predictions(model, attack))
        worst = scores if worst is None else torch.minimum(worst, scores)
        metrics[f"robust_dice/{attack['label']}"], metrics[f"robust_dice_ci95/{attack['label']}"] = mean_and_ci95(scores)
    if worst is not None:  # per task, its perturbation that hurt most
        metrics["robust_dice"], metrics["robust_dice_ci95"] = mean_and_ci95(worst)
    return metrics


def episodic_metrics(model, ctx) -> dict:
    """Few-shot runs: accuracy over the fixed test tasks, mean and 95% confidence interval."""
    if ctx.test_tasks and ctx.test_tasks[0].query_labels.dim() == 3:
        return segmentation_metrics(model, ctx)

    clean = ctx.task_correct(model)
    mean, ci = mean_and_ci95(torch.stack([c.float().mean() for c in clean]))
    metrics = {"clean_accuracy": mean, "clean_accuracy_ci95": ci, "test_tasks": float(len(clean))}
    worst = list(clean)
    for attack in ctx.config["eval"]["attacks"]:
        robust = [a & c for a, c in zip(ctx.task_correct(model, attack), clean)]
        worst = [w & r for w, r in zip(worst, robust)]
        mean, ci = mean_and_ci95(torch.stack([r.float().mean() for r in robust]))
        metrics[f"robust_accuracy/{attack['label']}"], metrics[f"robust_accuracy_ci95/{attack['label']}"] = mean, ci
    if ctx.config["eval"]["attacks"]:
        metrics["robust_accuracy"], metrics["robust_accuracy_ci95"] = mean_and_ci95(
            torch.stack([w.float().mean() for w in worst]))
    return metrics


@hookimpl
def evaluate(model, dataset, ctx):
    if ctx.episodic:
        return episodic_metrics(model, ctx)
    num_classes = ctx.num_classes
    result = ctx.robustness(model, dataset)
    clean = result.clean
    per_class_clean = per_class_accuracy(clean.correct, clean.labels, num_classes)
    metrics = {
        "clean_accuracy": clean.correct.float().mean().item(),
        "worst_class_clean_accuracy": worst_class(per_class_clean),
        "per_class_clean_accuracy": per_class_clean,
    }
    attacks = ctx.config["eval"]["attacks"]
    metrics.update(result.rows(attacks, ctx.config["eval"]["cascade"]))
    if attacks:
        per_class = per_class_accuracy(result.correct, clean.labels, num_classes)
        metrics["worst_class_robust_accuracy"] = worst_class(per_class)
        metrics["per_class_robust_accuracy"] = per_class
    for position, attack in enumerate(attacks):
        label = attack["label"]
        attacked = result.attacked[position].sum()
        metrics[f"attack_success_rate/{label}"] = (result.broken[position].sum() / attacked).item() \
            if attacked else float("nan")
        for key, value in (result.queries[position] or {}).items():
            metrics[f"{key}/{label}"] = value
    return metrics
