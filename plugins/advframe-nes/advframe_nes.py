"""``nes``: the query-limited NES attack (Ilyas, Engstrom, Athalye and Lin, "Black-box Adversarial
Attacks with Limited Queries and Information", ICML 2018, arXiv:1804.08598; code:
labsix/limited-blackbox-attacks).

Natural Evolution Strategies estimate the gradient of the loss from scores alone, with antithetic
Gaussian samples: ``g = 1 / (n sigma) * sum_i L(x + sigma u_i) u_i`` over ``n / 2`` pairs
``(u, -u)``. The attack is projected gradient ascent on that estimate: momentum 0.9 on g, a step of
``lr`` along sign(g) (L-inf; the L2 variant steps along g / ||g||, as the NES-L2 baseline of the
Bandits code), projection into the ``eps`` ball and [0, 1]. ``lr`` is halved (down to
``lr / min_lr_ratio``) when the mean sampled loss has not improved over the last
``plateau_length`` iterations. Loss: cross-entropy of the true class, ascended (untargeted), or
cross-entropy of the target class, descended (targeted, the paper's setting).

Queries (all through :class:`advframe.cost.QueryCounter`, each counted, the budget included): one
on the clean input (it says whether the example counts: initially misclassified examples, or in
targeted mode examples already at the target, are not attacked and not counted), one on
``x + init`` when another method seeds the attack, then per iteration ``samples`` for the estimate
and one at the new iterate (the success check; the official code counts it too). An example stops
when it succeeds or fewer than ``samples + 1`` queries are left. Sampled points are clipped to
[0, 1], so every query is a valid image (the official code queries slightly outside).

Seeding and continuing another method's count (``params["init"/"counter"/"counted"]``, also
arguments of :func:`nes_attack`): as for every query attack, see :func:`advframe.cost.run_query_attack`.

Settings (``plugins.nes`` or per use in ``attack`` / ``eval.attacks``), with defaults::

    budget: 1000           # queries per example, the clean query included
    samples: 50            # samples per gradient estimate (even: antithetic pairs), official 50
    sigma: 0.001           # search variance, official 1e-3
    lr: null               # maximum step; null = eps / 5 (official 0.01 at eps 0.05)
    min_lr_ratio: 200      # the step is never annealed below lr / min_lr_ratio (official 5e-5 = 0.01 / 200)
    momentum: 0.9          # official
    plateau_length: 5      # official
    plateau_drop: 2.0      # official
    targeted: false        # true: the labels passed are target classes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.attacks import ascent_direction, project
from advframe.cost import QueryBatch, QueryCounter, QueryResult, check_query_settings, run_query_attack

DEFAULTS = {"budget": 1000, "samples": 50, "sigma": 0.001, "lr": None, "min_lr_ratio": 200.0, "momentum": 0.9,
            "plateau_length": 5, "plateau_drop": 2.0, "targeted": False}


@hookimpl
def default_config():
    return dict(DEFAULTS)


def objective(scores: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """What NES ascends: CE of the true class, or minus CE of the target class."""
    loss = F.cross_entropy(scores, labels, reduction="none")
    return -loss if targeted else loss


def estimate_gradient(counter, inputs, labels, index, samples, sigma, targeted, generator):
    """Antithetic NES estimate at ``inputs`` (one row per example in ``index``); the mean sampled loss.

    One counter call per sample: a call counts each example once, so its rows must be distinct examples.
    """
    pairs = samples // 2
    noise = torch.randn((pairs, *inputs.shape), generator=generator).to(inputs)
    gradient, total = torch.zeros_like(inputs), torch.zeros(len(inputs), device=inputs.device)
    for u in (*noise, *-noise):
        loss = objective(counter((inputs + sigma * u).clamp(0, 1), index), labels, targeted)
        gradient += loss.view(-1, *[1] * (inputs.dim() - 1)) * u
        total += loss
    return gradient / (samples * sigma), total / samples


def check_settings(params: dict) -> None:
    check_query_settings("nes", params)
    if params["samples"] < 2 or params["samples"] % 2:
        raise PluginError(f"nes: samples must be an even number >= 2 (antithetic pairs), got {params['samples']}")
    if params["sigma"] <= 0 or (params["lr"] is not None and params["lr"] <= 0) or params["min_lr_ratio"] < 1:
        raise PluginError("nes: sigma and lr must be > 0 and min_lr_ratio >= 1")
    if not 0 <= params["momentum"] < 1 or params["plateau_length"] < 2 or params["plateau_drop"] <= 1:
        raise PluginError("nes: momentum must be in [0, 1), plateau_length >= 2, plateau_drop > 1")


def nes_attack(model, inputs, labels, *, eps: float, norm: str = "linf", budget: int = 1000, samples: int = 50,
               sigma: float = 0.001, lr: float | None = None, min_lr_ratio: float = 200.0, momentum: float = 0.9,
               plateau_length: int = 5, plateau_drop: float = 2.0, targeted: bool = False,
               init: torch.Tensor | None = None, generator: torch.Generator | None = None,
               counter: QueryCounter | None = None, counted: torch.Tensor | None = None) -> QueryResult:
    """Run the query-limited NES attack on one batch (inputs in [0, 1]).

    :param init: a starting perturbation (projected into the ball); the ascent starts there.
    :param counter: a :class:`QueryCounter` to continue another method's query count.
    :param counted: which examples to attack, when the caller already knows it (no clean query).
    """
    generator = generator or torch.Generator().manual_seed(0)
    n = len(inputs)
    batch = QueryBatch(model, inputs, labels, targeted=targeted, budget=budget, attack="nes", counter=counter,
                       counted=counted)
    inputs, labels = batch.inputs, batch.labels
    delta = torch.zeros_like(inputs) if init is None else project(init.detach().to(inputs), inputs, eps, norm)
    batch.start(delta, moved=init is not None)  # the ascent's starting point
    max_lr = torch.full((n,), eps / 5 if lr is None else lr, device=inputs.device)
    min_lr = max_lr / min_lr_ratio
    velocity = torch.zeros_like(inputs)
    history = torch.full((n, plateau_length), float("nan"), device=inputs.device)
    while len(todo := batch.active(needed=samples + 1)):  # the estimate and the check at the new iterate
        x = inputs[todo]
        gradient, mean_loss = estimate_gradient(batch.counter, x + delta[todo], labels[todo], todo, samples, sigma,
                                                targeted, generator)
        velocity[todo] = momentum * velocity[todo] + (1 - momentum) * gradient
        # plateau annealing: halve the step when the loss has not risen over the window
        window = torch.cat([history[todo, 1:], mean_loss[:, None]], 1)
        stalled = ~window.isnan().any(1) & (window[:, -1] < window[:, 0])
        max_lr[todo[stalled]] = torch.maximum(max_lr[todo[stalled]] / plateau_drop, min_lr[todo[stalled]])
        window[stalled] = float("nan")
        history[todo] = window
        step = max_lr[todo].view(-1, *[1] * (inputs.dim() - 1)) * ascent_direction(velocity[todo], norm)
        delta[todo] = project(delta[todo] + step, x, eps, norm)
        batch.query(x + delta[todo], todo)
    return batch.result(delta)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    check_settings(params)
    return run_query_attack(nes_attack, model, inputs, labels, params, ctx, DEFAULTS)
