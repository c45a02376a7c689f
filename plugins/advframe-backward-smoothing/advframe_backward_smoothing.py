"""``backward-smoothing``: efficient robust training by backward smoothing (J. Chen, Y. Cheng, Z. Gan,
Q. Gu, J. Liu, "Efficient Robust Training via Backward Smoothing", AAAI 2022, arXiv:2010.01278;
code: jinghuichen/BackwardSmoothing, ``trades_backward.py`` and ``train_trades_backward.py``).

Single-step adversarial training works because its random start acts like randomised smoothing of
the inner maximisation. Backward smoothing puts the noise in the *output* space instead: it draws
logit noise ``r ~ U(-gamma, gamma)^K`` around the clean logits and takes one step *backwards* from
the clean input towards an input whose prediction matches the noisy output; from that start it takes
``steps`` TRADES steps and trains on the TRADES objective::

    z = sg f(x) (eval mode),   q = softmax(z + r)
    x_0 = Proj( x - alpha * sign grad_x KL(q || p(x)) )                   # descends towards q
    x_t = Proj( x_{t-1} + alpha * sign grad KL(p(x) || p(x_{t-1})) ),  t = 1..steps
    loss = CE(f(x), y) + beta * KL(p(x) || p(x_steps))                    # train mode, as TRADES

The attack runs with the model in eval mode; the outer loss in train mode with the clean logits not
detached, as in the official code. A batch costs ``steps + 3`` gradient evaluations per example
(1 smoothing step, ``steps`` KL steps, clean and adversarial outer passes): 4 with the default
``steps: 1``, against 12 for TRADES with its PGD-10 inner solver.

``init: uniform`` is the ablation behind the method ("FGSM-RS on TRADES", the official
``trades_fast.py``): the same solver and outer loss, but the start is uniform noise in the input
ball and no smoothing step is taken, so it costs one gradient evaluation less per example
(``steps + 2``); ``init: uniform`` with ``steps: 2`` spends exactly the budget of the default.

Eps and norm come from the run's ``attack`` section (the threat model the run is evaluated on).

Settings (``plugins.backward-smoothing``)::

    beta: 6.0          # TRADES weight of the boundary term (official default; its README uses 10 for ResNet-18)
    gamma: 1.0         # half-width of the uniform noise on the clean logits (logit units, not probabilities)
    steps: 1           # k: TRADES KL steps after the start (official default 1)
    alpha: null        # step size of every step; null = eps (official: alpha = eps)
    init: backward     # backward (the method) | uniform (input-space random start: the ablation)

With ``gamma: 0`` the smoothing step is the sign of a zero gradient (round-off only): use ``gamma > 0``.

``evaluate`` measures the mechanism on the evaluation split: how far each inner solver gets on the
trained model, as the mean ``KL(p(x) || p(x'))`` it reaches: ``inner_kl/backward`` (this solver),
``inner_kl/uniform`` (the ablation's, same steps) and ``inner_kl/trades`` (TRADES' multi-step solver
with the ``attack`` section's steps and step size from a 0.001 N(0, I) start). Add
``eval.evaluators=[backward-smoothing]`` to measure them on any other method's model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.attacks import pgd, step_size
from advframe.losses import kl_to_clean
from advframe.models import eval_mode

INITS = ("backward", "uniform")


@hookimpl
def default_config():
    return {"beta": 6.0, "gamma": 1.0, "steps": 1, "alpha": None, "init": "backward"}


def solver_settings(settings: dict, attack: dict) -> dict:
    """The inner solver's arguments from the plugin's settings and the run's threat model; checks them."""
    if settings["init"] not in INITS:
        raise PluginError(f"backward-smoothing: init must be one of {', '.join(INITS)}, got {settings['init']!r}")
    if settings["gamma"] < 0:
        raise PluginError(f"backward-smoothing: gamma must be >= 0 (logit noise half-width), got {settings['gamma']}")
    alpha = settings["alpha"]
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise PluginError(f"backward-smoothing: alpha must be a positive number or null (= eps), got {alpha!r}")
    return {"eps": attack["eps"], "norm": attack["norm"], "alpha": attack["eps"] if alpha is None else float(alpha),
            "steps": settings["steps"], "gamma": settings["gamma"], "init": settings["init"]}


class NoisyTarget:
    """The smoothing step's objective ``KL(softmax(z + r) || p(x'))`` with ``r ~ U(-gamma, gamma)``.

    The noise is drawn once, at the first call, from the clean logits' shape; ``target_logits``
    keeps ``z + r`` so callers can check what the step moved towards.
    """

    def __init__(self, gamma: float, generator: torch.Generator | None):
        self.gamma, self.generator = gamma, generator
        self.target_logits: torch.Tensor | None = None

    def __call__(self, logits, labels, clean_logits):
        if self.target_logits is None:
            noise = torch.rand(clean_logits.shape, generator=self.generator).mul(2).sub(1).to(clean_logits)
            self.target_logits = clean_logits.detach() + self.gamma * noise
        return kl_to_clean(logits, self.target_logits)


def smoothing_step(model, inputs, labels, *, eps, alpha, norm, gamma, generator=None):
    """The backward-smoothing start ``x_0`` and the noisy target logits ``z + r`` it descended towards.

    One step from the clean input (no input-space random start) that *descends* the KL to the noisy
    output (``targeted`` in the core's PGD): the official code ascends the negative KL.
    """
    target = NoisyTarget(gamma, generator)
    start = pgd(model, inputs, labels, eps=eps, alpha=alpha, steps=1, norm=norm, random_start="zero",
                loss=target, targeted=True, generator=generator)
    return start, target.target_logits


def inner_maximisation(model, inputs, labels, *, eps, alpha, norm, steps, gamma, init, generator=None):
    """Adversarial inputs of one batch: the start (``init``), then ``steps`` TRADES KL steps."""
    start = None
    if init == "backward":
        start = smoothing_step(model, inputs, labels, eps=eps, alpha=alpha, norm=norm, gamma=gamma,
                               generator=generator)[0] - inputs
    return pgd(model, inputs, labels, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start="uniform",
               loss="kl", init=start, generator=generator)


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    solver = solver_settings(ctx.settings, ctx.attack_params)
    adversarial = inner_maximisation(model, inputs, labels, generator=ctx.generator, **solver)
    clean_logits, adversarial_logits = model(inputs), model(adversarial)
    natural = F.cross_entropy(clean_logits, labels)
    boundary = kl_to_clean(adversarial_logits, clean_logits).mean()  # sum over classes, mean over the batch
    return {
        "loss": natural + ctx.settings["beta"] * boundary,
        "natural_loss": natural.item(),
        "robust_loss": boundary.item(),
        "adversarial_accuracy": adversarial_logits.argmax(1).eq(labels).float().mean().item(),
    }


@hookimpl
def evaluate(model, dataset, ctx):
    solver = solver_settings(ctx.settings, ctx.attack_params)
    attack = ctx.attack_params
    trades = dict(eps=attack["eps"], alpha=step_size(attack), steps=attack["steps"], norm=attack["norm"],
                  random_start="normal", loss="kl")
    solvers = {
        "backward": lambda x, y: inner_maximisation(model, x, y, generator=ctx.generator, **{**solver, "init": "backward"}),
        "uniform": lambda x, y: inner_maximisation(model, x, y, generator=ctx.generator, **{**solver, "init": "uniform"}),
        "trades": lambda x, y: pgd(model, x, y, generator=ctx.generator, **trades),
    }
    totals = dict.fromkeys(solvers, 0.0)
    with eval_mode(model):
        for inputs, labels in dataset.batches(ctx.config["eval"]["batch_size"], ctx.device):
            with torch.no_grad():
                clean = model(inputs)
            for name, solve in solvers.items():
                adversarial = solve(inputs, labels)
                with torch.no_grad():
                    totals[name] += kl_to_clean(model(adversarial), clean).sum().item()
    return {f"inner_kl/{name}": total / max(len(dataset), 1) for name, total in totals.items()}
