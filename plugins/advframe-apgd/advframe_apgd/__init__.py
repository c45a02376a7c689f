"""``apgd``: Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, arXiv:2003.01690; code: fra31/auto-attack,
``autoattack/autopgd_base.py``).

APGD is PGD without a step size to tune. It starts with step ``2 eps``, adds momentum (0.75) and, at
checkpoints spaced 22%, then ever closer (down by 3% of the budget to at least 6%) of the iterations,
halves the step of every example whose loss rose in at most ``rho`` of the steps since the last
checkpoint, or whose best loss did not improve while its step was not halved at the last one; such an
example restarts from its best point. Three losses:

* ``ce``: cross-entropy (APGD-CE);
* ``dlr``: the difference of logits ratio, ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)``, invariant to
  shifting and rescaling the logits (APGD-DLR);
* ``dlr-targeted``: APGD-T, the targeted DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` run once
  for each of the ``target_classes`` classes ranked highest after the true one at the clean input,
  each run only on the points no earlier run broke (success = misclassified, as in AutoAttack).

Threat models L-inf and L2 (the 2020 paper's; APGD-L1 of Croce & Hein 2021 is not implemented: use
``pgd`` with ``norm: l1``). Targeted mode with your own targets (``targeted: true``; the labels passed are
the targets; success = the target class is predicted): ``ce`` descends the cross-entropy to the target,
``dlr`` uses the targeted DLR with the strongest other class in place of the true class (the hook does
not receive the true class then).

Evaluation shortcuts, both leaving the robust accuracy exactly as it is (the runs of different examples
never interact: the model is in eval mode): with ``stop_on_success`` an example whose clean input is
already misclassified is returned as it is (as the reference does) and an example is frozen at its first
successful iterate; restarts run only on the examples no earlier restart broke. An example that is
never broken is returned at its highest-loss iterate (the reference returns the clean input; the
highest-loss point is the useful one when APGD serves as a training attack).

Settings (``plugins.apgd``, or per use in ``attack`` / ``eval.attacks``), with defaults::

    steps: 100               # iterations per run (reference 100)
    restarts: 1              # random restarts, each on the still-robust examples (AutoAttack: 1; "plus": 5)
    loss: ce                 # ce | dlr | dlr-targeted (APGD-T)
    target_classes: 9        # dlr-targeted: how many target classes to try (fewer when the model has fewer others)
    rho: 0.75                # checkpoint condition: halve the step if the loss rose in <= rho of the steps
    momentum: 0.75           # weight of the new step (the reference's alpha = 0.75; 1 = no momentum)
    targeted: false          # true: the labels passed are the target classes
    stop_on_success: true    # evaluation: freeze examples at their first success (false for training)

The starting point is random (uniform in the L-inf ball scaled so its largest coordinate is ``eps``, or
Gaussian scaled to the L2 sphere of radius ``eps``, then clipped to [0, 1]), as the reference; a
programmatic ``params["init"]`` replaces it in the first restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.attacks import ascent_direction, misclassified, project
from advframe.losses import margin
from advframe.models import eval_mode, unwrap

DEFAULTS = {
    "steps": 100,
    "restarts": 1,
    "loss": "ce",
    "target_classes": 9,
    "rho": 0.75,
    "momentum": 0.75,
    "targeted": False,
    "stop_on_success": True,
}
LOSSES = ("ce", "dlr", "dlr-targeted")
NORMS = ("linf", "l2")


# -- losses (maximised) -------------------------------------------------------------------------

def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: the margin divided by the gap between the first and third largest
    logits, so rescaling or shifting the logits does not change it (needs at least 3 classes)."""
    ranked = logits.sort(1, descending=True).values
    return margin(logits, labels) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def dlr_targeted(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: ``(z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (needs at least 4 classes)."""
    ranked = logits.sort(1, descending=True).values
    gap = logits.gather(1, targets[:, None]).squeeze(1) - logits.gather(1, labels[:, None]).squeeze(1)
    return gap / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12)


def strongest_other(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The highest-scoring class other than ``targets`` (the competitor in user-targeted DLR)."""
    return logits.scatter(1, targets[:, None], float("-inf")).argmax(1)


# -- one APGD run -------------------------------------------------------------------------------

def random_start(inputs: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """The reference's start: a random direction scaled to the ball's surface, then clipped to [0, 1]."""
    if norm == "linf":
        direction = torch.rand(inputs.shape, generator=generator).mul_(2).sub_(1)
        direction /= direction.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (inputs.dim() - 1))
    else:
        direction = ascent_direction(torch.randn(inputs.shape, generator=generator), "l2")
    return project(eps * direction.to(inputs), inputs, eps, norm)


@dataclass
class Outcome:
    """Per example: the returned point, whether it succeeded, and the best loss reached."""

    adversarial: torch.Tensor
    success: torch.Tensor
    best_loss: torch.Tensor


def single_run(model, inputs, index, objective, succeeded, *, eps, norm, steps, rho, momentum,
               stop_on_success, start) -> Outcome:
    """One APGD run from ``inputs + start``. ``objective(logits, index)`` is the per-example loss to
    maximise and ``succeeded(logits, index)`` the success test, where ``index`` says which examples of
    the caller's batch the rows are."""
    n, device = len(inputs), inputs.device
    shape = (-1,) + (1,) * (inputs.dim() - 1)  # one value per example, broadcast over its pixels
    adversarial = (inputs + start).detach()
    success = torch.zeros(n, dtype=torch.bool, device=device)
    best_loss = torch.full((n,), float("-inf"), device=device)
    checkpoint = max(int(0.22 * steps), 1)
    shortest, shrink = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)

    def forward(points, rows):
        points = points.detach().requires_grad_(True)
        logits = model(points)
        values = objective(logits, index[rows])
        grad, = torch.autograd.grad(values.sum(), points)
        return logits.detach(), values.detach(), grad.detach()

    rows = torch.arange(n, device=device)
    logits, loss, grad = forward(adversarial, rows)
    # the state of the examples still running, one row each, filtered together when some stop
    s = {"rows": rows, "x": inputs, "adv": adversarial.clone(), "prev": adversarial.clone(), "grad": grad,
         "best": adversarial.clone(), "best_grad": grad, "best_loss": loss, "last_loss": loss, "best_at_check": loss,
         "step": torch.full((n,), 2.0 * eps, device=device, dtype=inputs.dtype).view(shape),
         "rises": torch.zeros(n, device=device), "halved_last": torch.ones(n, dtype=torch.bool, device=device)}

    def record(logits, s):
        """Note successes; with stop_on_success, drop the examples that just succeeded."""
        hit = succeeded(logits, index[s["rows"]])
        if hit.any():
            adversarial[s["rows"][hit]] = s["adv"][hit]
            success[s["rows"][hit]] = True
            if stop_on_success:
                best_loss[s["rows"][hit]] = s["best_loss"][hit]
                s = {key: value[~hit] for key, value in s.items()}
        return s

    s = record(logits, s)
    since_check = 0
    for i in range(steps):
        if len(s["rows"]) == 0:
            break
        x, adv = s["x"], s["adv"]
        weight = momentum if i > 0 else 1.0
        previous_move = adv - s["prev"]
        s["prev"] = adv
        z = x + project(adv + s["step"] * ascent_direction(s["grad"], norm) - x, x, eps, norm)
        adv = s["adv"] = x + project(adv + weight * (z - adv) + (1 - weight) * previous_move - x, x, eps, norm)
        logits, loss, s["grad"] = forward(adv, s["rows"])
        s["rises"] += (loss > s["last_loss"]).float()
        s["last_loss"] = loss
        better = loss > s["best_loss"]
        s["best"] = torch.where(better.view(shape), adv, s["best"])
        s["best_grad"] = torch.where(better.view(shape), s["grad"], s["best_grad"])
        s["best_loss"] = torch.where(better, loss, s["best_loss"])
        s = record(logits, s)
        since_check += 1
        if since_check == checkpoint:  # halve the step where the loss oscillates or stalled; go back to the best
            halve = (s["rises"] <= checkpoint * rho) | (~s["halved_last"] & (s["best_at_check"] >= s["best_loss"]))
            s["halved_last"], s["best_at_check"] = halve, s["best_loss"]
            mask = halve.view(shape)
            s["step"] = torch.where(mask, s["step"] / 2, s["step"])
            s["adv"] = torch.where(mask, s["best"], s["adv"])
            s["grad"] = torch.where(mask, s["best_grad"], s["grad"])
            s["rises"] = torch.zeros_like(s["rises"])
            since_check = 0
            checkpoint = max(checkpoint - shrink, shortest)
    # examples still running: successful ones keep their latest successful iterate, the others their best
    left = s["rows"]
    keep_best = ~success[left]
    adversarial[left[keep_best]] = s["best"][keep_best]
    best_loss[left] = s["best_loss"]
    return Outcome(adversarial, success, best_loss)


def run_apgd(model, inputs, objective, succeeded, *, eps, norm, steps, restarts=1, rho=0.75,
             momentum=0.75, stop_on_success=True, generator=None, init=None,
             result: Outcome | None = None) -> Outcome:
    """APGD with restarts; each restart attacks only the examples not broken yet.

    ``result`` (updated in place and returned) holds what earlier runs found for the whole batch; its
    successful examples are not attacked.
    """
    model = unwrap(model)
    n = len(inputs)
    if result is None:
        result = Outcome(inputs.clone(), torch.zeros(n, dtype=torch.bool, device=inputs.device),
                         torch.full((n,), float("-inf"), device=inputs.device))
    todo = torch.arange(n, device=inputs.device)
    with eval_mode(model), torch.enable_grad():
        for restart in range(restarts):
            todo = todo[~result.success[todo]]
            if len(todo) == 0:
                break
            x = inputs[todo]
            if restart == 0 and init is not None:
                start = project(init[todo].detach().to(inputs) - x, x, eps, norm)
            else:
                start = random_start(x, eps, norm, generator)
            outcome = single_run(model, x, todo, objective, succeeded, eps=eps, norm=norm, steps=steps, rho=rho,
                                 momentum=momentum, stop_on_success=stop_on_success, start=start)
            better = outcome.success | (outcome.best_loss > result.best_loss[todo])
            result.adversarial[todo[better]] = outcome.adversarial[better]
            result.best_loss[todo[better]] = outcome.best_loss[better]
            result.success[todo[outcome.success]] = True
    return result


def clean_misclassified(model, inputs, labels, targeted=False) -> torch.Tensor:
    """Examples whose clean input already counts as a success (the reference does not attack them)."""
    with torch.no_grad(), eval_mode(unwrap(model)):
        return misclassified(model(inputs), labels, targeted)


def apgd(model, inputs, labels, *, eps, norm="linf", steps=100, loss="ce", restarts=1, rho=0.75, momentum=0.75,
         targeted=False, stop_on_success=True, generator=None, init=None) -> Outcome:
    """APGD-CE / APGD-DLR, untargeted or towards the given targets (``targeted``: ``labels`` are targets)."""
    if targeted:
        if loss == "ce":
            def objective(logits, rows):
                return -F.cross_entropy(logits, labels[rows], reduction="none")
        else:
            def objective(logits, rows):
                return dlr_targeted(logits, strongest_other(logits.detach(), labels[rows]), labels[rows])
    elif loss == "ce":
        def objective(logits, rows):
            return F.cross_entropy(logits, labels[rows], reduction="none")
    else:
        def objective(logits, rows):
            return dlr(logits, labels[rows])

    def succeeded(logits, rows):
        return misclassified(logits, labels[rows], targeted)

    result = None
    if stop_on_success:
        done = clean_misclassified(model, inputs, labels, targeted)
        result = Outcome(inputs.clone(), done, torch.full((len(inputs),), float("-inf"), device=inputs.device))
    return run_apgd(model, inputs, objective, succeeded, eps=eps, norm=norm, steps=steps, restarts=restarts,
                    rho=rho, momentum=momentum, stop_on_success=stop_on_success, generator=generator, init=init,
                    result=result)


def apgd_targeted(model, inputs, labels, *, eps, norm="linf", steps=100, target_classes=9, restarts=1, rho=0.75,
                  momentum=0.75, stop_on_success=True, generator=None, init=None) -> Outcome:
    """APGD-T: targeted DLR towards the 2nd, 3rd, ... most likely classes at the clean input, each target
    (with ``restarts`` restarts) run only on the examples still correctly classified."""
    model = unwrap(model)
    with torch.no_grad(), eval_mode(model):
        ranking = model(inputs).argsort(1, descending=True)
    done = ranking[:, 0] != labels if stop_on_success else torch.zeros_like(labels, dtype=torch.bool)
    result = Outcome(inputs.clone(), done, torch.full((len(inputs),), float("-inf"), device=inputs.device))

    def succeeded(logits, rows):
        return misclassified(logits, labels[rows])

    for rank in range(1, target_classes + 1):
        targets = ranking[:, rank]

        def objective(logits, rows, targets=targets):
            return dlr_targeted(logits, labels[rows], targets[rows])

        # best losses of different targets are not comparable: start each target's record afresh
        result.best_loss.fill_(float("-inf"))
        run_apgd(model, inputs, objective, succeeded, eps=eps, norm=norm, steps=steps, restarts=restarts,
                 rho=rho, momentum=momentum, stop_on_success=stop_on_success, generator=generator,
                 init=init if rank == 1 else None, result=result)
    return result


# -- settings and the hook -------------------------------------------------------------------------

def check_settings(params: dict, num_classes: int, name: str = "apgd") -> None:
    if params["norm"] not in NORMS:
        raise PluginError(f"{name}: norm must be linf or l2 (APGD-L1 is not implemented; use pgd with norm l1), "
                          f"got {params['norm']!r}")
    if params.get("loss", "ce") not in LOSSES:
        raise PluginError(f"{name}: loss must be one of {', '.join(LOSSES)}, got {params['loss']!r}")
    if params["steps"] < 1:
        raise PluginError(f"{name}: steps must be >= 1, got {params['steps']}")
    if not 0 < params["rho"] <= 1 or not 0 < params["momentum"] <= 1:
        raise PluginError(f"{name}: rho and momentum must be in (0, 1], got {params['rho']} and {params['momentum']}")
    loss = params.get("loss", "ce")
    if loss == "dlr-targeted" and params.get("targeted"):
        raise PluginError(f"{name}: loss dlr-targeted picks its own targets; use loss ce or dlr with targeted: true")
    if loss == "dlr-targeted" and params["target_classes"] < 1:
        raise PluginError(f"{name}: target_classes must be >= 1, got {params['target_classes']}")
    needed = 4 if loss == "dlr-targeted" or (loss == "dlr" and params.get("targeted")) else 3 if loss == "dlr" else 2
    if num_classes < needed:
        raise PluginError(f"{name}: loss {loss} needs at least {needed} classes, the model has {num_classes}; "
                          f"use loss ce")


@hookimpl
def default_config():
    return dict(DEFAULTS)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    check_settings(params, ctx.num_classes)
    common = {"eps": params["eps"], "norm": params["norm"], "steps": params["steps"], "restarts": params["restarts"],
              "rho": params["rho"], "momentum": params["momentum"], "stop_on_success": params["stop_on_success"],
              "generator": ctx.generator, "init": params.get("init")}
    if params["loss"] == "dlr-targeted":
        targets = min(params["target_classes"], ctx.num_classes - 1)  # "at most": AutoAttack's 9 on 5-way tasks
        return apgd_targeted(model, inputs, labels, target_classes=targets, **common).adversarial
    return apgd(model, inputs, labels, loss=params["loss"], targeted=params["targeted"], **common).adversarial
