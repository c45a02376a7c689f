"""``autoattack``: the AutoAttack ensemble (Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020, arXiv:2003.01690; code:
fra31/auto-attack, ``autoattack/autoattack.py``).

The components run one after another, each only on the examples that are still robust (clean inputs
already misclassified are never attacked); an example is broken as soon as one component breaks it and
keeps that component's adversarial example, so the robust accuracy is the per-example worst case over
the components, as AutoAttack reports it. The reference's ``standard`` version runs APGD-CE, APGD-T
(9 target classes), FAB-T (9 target classes) and Square (5,000 queries, p_init 0.8). Here:

* ``apgd-ce``, ``apgd-dlr``, ``apgd-t``: this package's APGD (``steps`` iterations, ``apgd_restarts``
  restarts for APGD-CE/DLR, one per target for APGD-T, as the reference);
* ``fab-t``: FAB-T (``advframe_apgd.fab``), ``steps`` iterations for each of the ``target_classes``
  targets, from the clean input, as the reference; an example is broken when a misclassified point
  within ``eps`` is found;
* ``margin-t`` (not in the reference, not in the default list): PGD (``advframe.attacks.pgd``, step
  2.5 eps / steps, uniform start) raising the Carlini-Wagner margin ``z_t - max_{i != t} z_i`` of
  each of the same target classes, stopping at misclassification; a cheaper targeted component;
* ``square``: the ``square`` plugin (another package), called through ``ctx.attack`` with its own
  settings (``plugins.square``) plus the ``square`` overrides below. If it is not installed the run
  stops with an error that names it (never a silent skip under the ensemble's name).

Per-component results (robust accuracy after each component, which component broke how many
examples) are reported by this plugin's ``evaluate`` hook: add ``autoattack`` to
``eval.evaluators`` next to the ``eval.attacks`` entry (an evaluation attack cannot report metrics on
its own in advframe 0.1). The ``rand`` version (EOT for randomised defenses) is not implemented.

Settings (``plugins.autoattack``, or per use in ``eval.attacks``), with defaults::

    components: [apgd-ce, apgd-t, fab-t, square]   # the reference's "standard" order (custom lists allowed)
    steps: 100                # iterations of the APGD, FAB-T and margin-t components (reference 100)
    apgd_restarts: 1          # restarts of apgd-ce / apgd-dlr (reference standard: 1)
    target_classes: 9         # targets of apgd-t, fab-t and margin-t (reference 9; fewer if fewer other classes)
    square: {budget: 5000, p_init: 0.8}   # overrides for the square plugin (the reference's Square)

Threat models L-inf and L2, untargeted (``targeted: true`` is rejected: AutoAttack measures
untargeted robustness).
"""

from __future__ import annotations

import copy
import weakref

import torch

from advframe import PluginError, hookimpl
from advframe.attacks import misclassified, pgd
from advframe.context import attack_label
from advframe.losses import margin
from advframe.models import eval_mode, unwrap
from advframe_apgd import apgd, apgd_targeted, check_settings
from advframe_apgd.fab import fab_targeted

COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "margin-t", "square")
DEFAULTS = {
    "components": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "steps": 100,
    "apgd_restarts": 1,
    "target_classes": 9,
    "square": {"budget": 5000, "p_init": 0.8},
}

# What each batch's run found, per run context and attack settings, for the evaluate hook: a list of
# (labels, index of the component that broke each example; -1 robust, -2 misclassified when clean).
_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ROBUST, CLEAN_WRONG = -1, -2


def settings_key(params: dict) -> str:
    return repr(sorted((k, v) for k, v in params.items() if k != "init"))


def check(params: dict, num_classes: int) -> None:
    unknown = [c for c in params["components"] if c not in COMPONENTS]
    if unknown or not params["components"]:
        raise PluginError(f"autoattack: components must be a non-empty list of {', '.join(COMPONENTS)}; "
                          f"got {params['components']!r}")
    if params.get("targeted"):
        raise PluginError("autoattack: targeted mode is not supported (AutoAttack is untargeted); "
                          "use apgd with targeted: true")
    if not isinstance(params["square"], dict):
        raise PluginError(f"autoattack: square must be a mapping of square settings, got {params['square']!r}")
    components = set(params["components"])
    loss = "dlr-targeted" if "apgd-t" in components else "dlr" if "apgd-dlr" in components else "ce"
    check_settings({"norm": params["norm"], "steps": params["steps"], "rho": 0.75, "momentum": 0.75, "loss": loss,
                    "target_classes": params["target_classes"]}, num_classes, "autoattack")
    if params["target_classes"] < 1:
        raise PluginError(f"autoattack: target_classes must be >= 1, got {params['target_classes']}")


def square_params(ctx, params: dict) -> dict:
    """The square plugin's settings for this run; an error naming it when it is not installed."""
    if "square" not in ctx.host.available("attack"):
        raise PluginError("autoattack: the component square needs the square plugin, which is not installed: "
                          "pip install advframe-square, or leave square out of plugins.autoattack.components")
    known = ctx.host.default_config("square")
    unknown = sorted(set(params["square"]) - set(known))
    if unknown:
        raise PluginError(f"autoattack: square has no setting {', '.join(unknown)}; its settings are "
                          f"{', '.join(sorted(known))}")
    return ctx.attack_settings("square", **params["square"], eps=params["eps"], norm=params["norm"])


def run_square(ctx, model, inputs, labels, settings) -> torch.Tensor:
    """Square through the core, without letting its query records count as this attack's queries."""
    with ctx.unrecorded_queries():
        return ctx.attack(model, inputs, labels, settings)


def ensemble(model, inputs, labels, params, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the components in order on the still-robust examples. Returns the adversarial batch and the
    index of the component that broke each example (``ROBUST`` / ``CLEAN_WRONG``)."""
    model = unwrap(model)
    with eval_mode(model):
        with torch.no_grad():
            clean_logits = model(inputs)
        broken_by = torch.full((len(inputs),), ROBUST, dtype=torch.long, device=inputs.device)
        broken_by[misclassified(clean_logits, labels)] = CLEAN_WRONG
        adversarial = inputs.clone()
        targets = min(params["target_classes"], ctx.num_classes - 1)
        common = {"eps": params["eps"], "norm": params["norm"], "steps": params["steps"], "stop_on_success": True,
                  "generator": ctx.generator}
        for position, component in enumerate(params["components"]):
            todo = (broken_by == ROBUST).nonzero().flatten()
            if len(todo) == 0:
                break
            x, y = inputs[todo], labels[todo]
            if component in ("apgd-ce", "apgd-dlr"):
                found = apgd(model, x, y, loss=component[5:], restarts=params["apgd_restarts"], **common).adversarial
            elif component == "apgd-t":
                found = apgd_targeted(model, x, y, target_classes=targets, **common).adversarial
            elif component == "fab-t":
                found, _ = fab_targeted(model, x, y, eps=params["eps"], norm=params["norm"], steps=params["steps"],
                                        target_classes=targets)
            elif component == "margin-t":
                found = targeted_margin(model, x, y, params, ctx)
            else:
                found = run_square(ctx, model, x, y, square_params(ctx, params))
            with torch.no_grad():
                hit = misclassified(model(found), y)
            adversarial[todo[hit]] = found[hit]
            broken_by[todo[hit]] = position
    return adversarial, broken_by


def toward(rank: int):
    """PGD loss pulling the class ranked ``rank`` at the clean input above all others: ``z_t - max_{i!=t} z_i``.

    The target is read from the clean logits the core passes for each row still attacked, so the walk
    can stop, as AutoAttack's components do, as soon as the example is misclassified (as any class)."""
    def loss(logits, labels, clean_logits):
        return -margin(logits, clean_logits.argsort(1, descending=True)[:, rank])
    return loss


def targeted_margin(model, inputs, labels, params, ctx) -> torch.Tensor:
    """The FAB-T stand-in: margin PGD towards each of the top ``target_classes`` other classes in turn,
    each on the examples no earlier target broke."""
    result = inputs.clone()
    todo = torch.arange(len(inputs), device=inputs.device)
    eps, steps = params["eps"], params["steps"]
    for rank in range(1, min(params["target_classes"], ctx.num_classes - 1) + 1):
        if len(todo) == 0:
            break
        found = pgd(model, inputs[todo], labels[todo], eps=eps, alpha=2.5 * eps / steps, steps=steps,
                    norm=params["norm"], loss=toward(rank), stop_on_success=True, generator=ctx.generator)
        with torch.no_grad():
            hit = misclassified(model(found), labels[todo])
        result[todo[hit]] = found[hit]
        todo = todo[~hit]
    return result


@hookimpl
def default_config():
    return copy.deepcopy(DEFAULTS)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    check(params, ctx.num_classes)
    adversarial, broken_by = ensemble(model, inputs, labels, params, ctx)
    _RECORDS.setdefault(ctx, {}).setdefault(settings_key(params), []).append((labels.detach().cpu(), broken_by.cpu()))
    return adversarial


def runs(model, dataset, ctx) -> list[tuple[dict, torch.Tensor]]:
    """Each ``autoattack`` entry of ``eval.attacks`` with the examples it attacked (run by the core,
    shared with the accuracy evaluator); without one, this plugin's settings run on every example."""
    listed = [(position, entry) for position, entry in enumerate(ctx.config["eval"]["attacks"])
              if entry["name"] == "autoattack"]
    if listed:
        result = ctx.robustness(model, dataset)
        return [(entry, result.attacked[position]) for position, entry in listed]
    params = ctx.attack_settings("autoattack")
    params["label"] = attack_label(params)
    ctx.predictions(model, dataset, params)
    return [(params, torch.ones(len(dataset), dtype=torch.bool))]


@hookimpl
def evaluate(model, dataset, ctx):
    """Robust accuracy after each component (cumulative, as AutoAttack prints it, and after the
    ``eval.attacks`` entries before it) and what each component broke.

    Runs only when ``autoattack`` is listed in ``eval.evaluators`` (not merely because it is the run's
    attack)."""
    metrics = {}
    if "autoattack" not in ctx.config["eval"]["evaluators"]:
        return metrics
    for params, attacked in runs(model, dataset, ctx):
        records = _RECORDS.get(ctx, {}).get(settings_key(params), [])
        broken_by = latest_run(records, dataset.labels[attacked])
        if broken_by is None:  # e.g. sharded across processes: the core's rows hold the overall number
            continue
        for position, component in enumerate(params["components"]):
            still = torch.zeros(len(dataset), dtype=torch.bool)
            still[attacked] = (broken_by == ROBUST) | (broken_by > position)
            metrics[f"{params['label']}/robust_accuracy_after/{component}"] = still.float().mean().item()
            metrics[f"{params['label']}/broken_by/{component}"] = float((broken_by == position).sum())
        metrics[f"{params['label']}/robust_accuracy"] = still.float().mean().item()
    return metrics


def latest_run(records, labels: torch.Tensor):
    """The records of the most recent run over exactly ``labels`` (batches in order), or None."""
    total, tail = 0, []
    for record in reversed(records):
        tail.insert(0, record)
        total += len(record[0])
        if total >= len(labels):
            break
    if total != len(labels) or not torch.equal(torch.cat([r[0] for r in tail]), labels.cpu()):
        return None
    return torch.cat([r[1] for r in tail])
