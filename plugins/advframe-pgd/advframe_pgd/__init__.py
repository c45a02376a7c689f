"""``pgd``: projected gradient descent (Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018, arXiv:1706.06083).

Threat models L-inf, L2 and L1 (``attack.norm``), random start, restarts, untargeted or targeted
(``targeted: true``; the labels passed are then the target classes). For evaluation,
``stop_on_success`` freezes an example at its first misclassified iterate: the robust accuracy is
the same or lower (an example counts as broken once any iterate breaks it) and the time falls.

Settings (``plugins.pgd`` or per use in ``attack`` / ``eval.attacks``), with defaults::

    alpha: null            # step size; null = 2.5 * eps / steps
    steps: 10
    random_start: uniform  # uniform | normal (TRADES' 0.001 N(0, I)) | zero
    restarts: 1
    loss: ce               # ce | margin (Carlini-Wagner) | kl (to the clean prediction)
    targeted: false
    stop_on_success: false
"""

from advframe import PluginError, hookimpl
from advframe.attacks import LOSSES, pgd, step_size

DEFAULTS = {
    "alpha": None,
    "steps": 10,
    "random_start": "uniform",
    "restarts": 1,
    "loss": "ce",
    "targeted": False,
    "stop_on_success": False,
}


@hookimpl
def default_config():
    return dict(DEFAULTS)


def run_pgd(model, inputs, labels, params, ctx):
    if params["loss"] not in LOSSES:
        raise PluginError(f"pgd: loss must be one of {', '.join(LOSSES)}, got {params['loss']!r}")
    if params["random_start"] not in ("uniform", "normal", "zero"):
        raise PluginError(f"pgd: random_start must be uniform, normal or zero, got {params['random_start']!r}")
    return pgd(model, inputs, labels, eps=params["eps"], alpha=step_size(params), steps=params["steps"],
               norm=params["norm"], random_start=params["random_start"], loss=params["loss"],
               targeted=params["targeted"], restarts=params["restarts"],
               stop_on_success=params["stop_on_success"], generator=ctx.generator, bounds=ctx.input_bounds)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    return run_pgd(model, inputs, labels, params, ctx)
