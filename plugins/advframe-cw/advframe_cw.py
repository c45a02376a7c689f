"""``cw``: the Carlini-Wagner attack (Carlini & Wagner, "Towards Evaluating the Robustness of Neural
Networks", IEEE S&P 2017, arXiv:1608.04644; code: carlini/nn_robust_attacks, ``l2_attack.py``).

CW-L2 (``norm: l2``) looks for the smallest L2 perturbation that changes the decision. It optimises in
tanh space, ``x' = (tanh(w) + 1) / 2`` (always inside [0, 1], no clipping), with Adam on::

    ||x' - x||_2^2 + c * f(x'),   f(x') = max(z_y(x') - max_{i != y} z_i(x') + kappa, 0)

(targeted: ``f = max(max_{i != t} z_i - z_t + kappa, 0)``), and a binary search on ``c`` per example:
after each optimisation ``c`` is halved towards the last failure when it succeeded, multiplied by 10
(or bisected once an upper bound is known) when it failed. Each optimisation restarts Adam and ``w``
from the clean input, and stops early when its objective has not fallen by 0.01% over a tenth of the
iterations (per example here; the reference checks its whole batch, which is one example by default).
An iterate counts as a success when it is misclassified with margin at least ``kappa`` (targeted:
the target wins by ``kappa``); the reference's untargeted test subtracts ``kappa`` from the true
logit, which makes ``kappa`` loosen instead of tighten the test: the consistent form is used here.

CW-L2 is a minimum-norm attack, so its perturbation has no bound by design. advframe attacks answer a
threat model, so ``eps`` is a cap: each example returns its smallest successful perturbation if that is
inside the L2 ball of radius ``eps``; otherwise the best successful point (or, with no success, the last
iterate) projected onto the ball, which may or may not still fool the model. Robust accuracy under
``cw`` is then the accuracy against CW-L2 examples of norm at most ``eps``; set a huge ``eps`` for the
unbounded attack. With ``stop_on_success`` (evaluation) an example is frozen at its first success inside
the cap and the binary search skips it: the robust accuracy is unchanged, the distances are not minimal.

With ``norm: linf`` (or ``l1``) the CW loss is used inside PGD, the "CW-inf" attack of the adversarial
training literature: ``advframe.attacks.pgd`` ascending ``-f`` (descending ``f`` when targeted) with
``steps`` steps of size ``alpha`` (default 2.5 eps / steps), ``random_start`` and ``restarts``.

The paper reports the size of the perturbations CW-L2 needs; with ``eval.evaluators: [cw]`` the
``evaluate`` hook runs CW-L2 without a cap (the ``plugins.cw`` settings) on every correctly classified
evaluation example and reports ``cw_l2/success_rate``, ``cw_l2/median_distance`` and
``cw_l2/mean_distance`` (over successful examples) and ``cw_l2/attacked_examples``.

The defaults are a capped budget (100 Adam iterations per search step at lr 0.1), labelled by its steps
(``cw-l2-1-100``) so it is never mistaken for the paper's attack. The paper's optimiser settings (up to
10,000 iterations at lr 0.01, ``PAPER``) are one word away: the attack ``cw-paper``
(``advframe_cw_paper``, labelled ``cw-paper-l2-1-10000``), or ``steps: 10000, lr: 0.01`` here
(``cw-l2-1-10000``).

Settings (``plugins.cw``, or per use in ``attack`` / ``eval.attacks``), with defaults::

    steps: 100                 # Adam iterations per binary-search step (L2; reference 10,000 with early abort)
                               # or PGD steps (linf / l1)
    confidence: 0.0            # kappa: required logit margin of a success
    targeted: false            # true: the labels passed are the target classes
    stop_on_success: false     # true: freeze an example at its first success inside the eps cap
    binary_search_steps: 9     # L2: searches on c (reference 9; with 10 or more the last uses the upper bound)
    initial_const: 0.001       # L2: first c (reference 1e-3)
    lr: 0.1                    # L2: Adam learning rate in tanh space (reference 1e-2 with 10,000 steps;
                               # at 100 steps 1e-2 leaves pixels at 0 or 1 almost frozen, see README)
    abort_early: true          # L2: stop an optimisation that no longer improves
    alpha: null                # linf / l1: PGD step size; null = 2.5 * eps / steps
    random_start: uniform      # linf / l1: uniform | normal | zero
    restarts: 1                # linf / l1: random restarts on the still-robust examples
"""

from __future__ import annotations

import torch

from advframe import PluginError, hookimpl
from advframe.attacks import misclassified, pgd, project, step_size
from advframe.losses import margin
from advframe.models import eval_mode, unwrap

DEFAULTS = {
    "steps": 100,
    "confidence": 0.0,
    "targeted": False,
    "stop_on_success": False,
    "binary_search_steps": 9,
    "initial_const": 0.001,
    "lr": 0.1,
    "abort_early": True,
    "alpha": None,
    "random_start": "uniform",
    "restarts": 1,
}
# Carlini & Wagner's own optimiser settings (l2_attack.py): the ``cw-paper`` attack's defaults
PAPER = {
    "steps": 10000,
    "lr": 0.01,
    "binary_search_steps": 9,
    "initial_const": 0.001,
    "abort_early": True,
    "confidence": 0.0,
}
L2_KEYS = ("steps", "confidence", "targeted", "stop_on_success", "binary_search_steps", "initial_const", "lr",
           "abort_early")
NO_BOUND = 1e10  # the reference's "no upper bound on c yet"


def cw_objective(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, confidence: float) -> torch.Tensor:
    """The CW function ``f`` per example (minimised; 0 once the margin reaches ``confidence``).

    ``margin`` is best-other minus label logit: the untargeted ``f`` wants it at least ``kappa``, the
    targeted one (labels are targets) wants it at most ``-kappa``."""
    gap = margin(logits, labels)
    return (gap + confidence).clamp_min(0) if targeted else (confidence - gap).clamp_min(0)


def succeeded(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, confidence: float) -> torch.Tensor:
    gap = margin(logits, labels)
    reached = gap <= -confidence if targeted else gap >= confidence
    return misclassified(logits, labels, targeted) & reached


class Adam:
    """Adam on a batch of independent rows (the reference's optimiser, TF defaults), so rows can leave."""

    def __init__(self, like: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m, self.v, self.t = torch.zeros_like(like), torch.zeros_like(like), 0

    def step(self, w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        rate = self.lr * (1 - b2 ** self.t) ** 0.5 / (1 - b1 ** self.t)
        return w - rate * self.m / (self.v.sqrt() + self.eps)

    def keep(self, rows: torch.Tensor) -> None:
        self.m, self.v = self.m[rows], self.v[rows]


def to_tanh_space(inputs: torch.Tensor) -> torch.Tensor:
    return torch.atanh((2 * inputs - 1) * 0.999999)


def from_tanh_space(w: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(w) + 1) / 2


def cw_l2(model, inputs, labels, *, eps: float, steps: int, confidence: float = 0.0, targeted: bool = False,
          binary_search_steps: int = 9, initial_const: float = 1e-3, lr: float = 0.1, abort_early: bool = True,
          stop_on_success: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CW-L2 with the binary search on ``c``; returns ``(adversarial capped at eps, smallest successful
    L2 distance per example, inf where none succeeded)``."""
    model = unwrap(model)
    n, device = len(inputs), inputs.device
    shape = (-1,) + (1,) * (inputs.dim() - 1)
    w_clean = to_tanh_space(inputs)
    const = torch.full((n,), float(initial_const), device=device)
    lower, upper = torch.zeros(n, device=device), torch.full((n,), NO_BOUND, device=device)
    best_distance = torch.full((n,), float("inf"), device=device)
    best_point = inputs.clone()  # smallest successful perturbation found so far
    last_point = inputs.clone()  # last iterate, for examples that never succeed
    done = torch.zeros(n, dtype=torch.bool, device=device)  # stop_on_success: a success inside the cap
    check_every = max(steps // 10, 1)
    with eval_mode(model), torch.enable_grad():
        for search in range(binary_search_steps):
            if binary_search_steps >= 10 and search == binary_search_steps - 1:
                const = torch.where(upper < NO_BOUND, upper, const)  # the reference repeats at the upper bound
            rows = (~done).nonzero().flatten()
            if len(rows) == 0:
                break
            w, adam = w_clean[rows].clone(), Adam(w_clean[rows], lr)
            found = torch.zeros(len(rows), dtype=torch.bool, device=device)  # success in this search step
            previous = torch.full((len(rows),), float("inf"), device=device)
            active = torch.arange(len(rows), device=device)  # positions in `rows` still optimising
            for iteration in range(steps):
                w.requires_grad_(True)
                x_adv = from_tanh_space(w)
                target = rows[active]
                logits = model(x_adv)
                distance = (x_adv - inputs[target]).flatten(1).pow(2).sum(1)
                objective = distance + const[target] * cw_objective(logits, labels[target], targeted, confidence)
                grad, = torch.autograd.grad(objective.sum(), w)
                x_adv, distance, objective = x_adv.detach(), distance.detach(), objective.detach()
                hit = succeeded(logits.detach(), labels[target], targeted, confidence)
                found[active[hit]] = True
                closer = hit & (distance.sqrt() < best_distance[target])
                best_distance[target[closer]] = distance[closer].sqrt()
                best_point[target[closer]] = x_adv[closer]
                last_point[target] = x_adv
                stop = torch.zeros_like(hit)
                if stop_on_success:
                    stop |= hit & (distance.sqrt() <= eps)
                    done[target[stop]] = True
                if abort_early and iteration % check_every == 0:
                    stalled = objective > previous * 0.9999
                    previous = torch.where(stalled, previous, objective)
                    stop |= stalled
                w = adam.step(w.detach(), grad)
                if stop.any():
                    keep = ~stop
                    active, w, previous = active[keep], w[keep], previous[keep]
                    adam.keep(keep)
                    if len(active) == 0:
                        break
            # binary search on c, per example of this search step
            c = const[rows]
            lo, up = lower[rows], upper[rows]
            up = torch.where(found, torch.minimum(up, c), up)
            lo = torch.where(found, lo, torch.maximum(lo, c))
            bounded = up < NO_BOUND
            const[rows] = torch.where(bounded, (lo + up) / 2, c * 10)
            lower[rows], upper[rows] = lo, up
    capped = best_distance <= eps
    start = torch.where(torch.isfinite(best_distance).view(shape), best_point, last_point)
    adversarial = torch.where(capped.view(shape), best_point, inputs + project(start - inputs, inputs, eps, "l2"))
    return adversarial.detach(), best_distance


def check(params: dict) -> None:
    if params["steps"] < 1:
        raise PluginError(f"cw: steps must be >= 1, got {params['steps']}")
    if params["confidence"] < 0:
        raise PluginError(f"cw: confidence (kappa) must be >= 0, got {params['confidence']}")
    if params["norm"] == "l2":
        if params["binary_search_steps"] < 1 or params["initial_const"] <= 0 or params["lr"] <= 0:
            raise PluginError("cw: binary_search_steps must be >= 1, initial_const and lr > 0")
    elif params["random_start"] not in ("uniform", "normal", "zero"):
        raise PluginError(f"cw: random_start must be uniform, normal or zero, got {params['random_start']!r}")


@hookimpl
def default_config():
    return dict(DEFAULTS)


def attack_l2(model, inputs, labels, params: dict) -> torch.Tensor:
    """CW-L2 with the ``L2_KEYS`` of ``params``, capped at ``params["eps"]``."""
    adversarial, _ = cw_l2(model, inputs, labels, eps=params["eps"], **{key: params[key] for key in L2_KEYS})
    return adversarial


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    check(params)
    targeted, confidence = params["targeted"], params["confidence"]
    if params["norm"] == "l2":
        return attack_l2(model, inputs, labels, params)

    def loss(logits, targets, clean_logits):  # pgd ascends it, or descends it when targeted
        value = cw_objective(logits, targets, targeted, confidence)
        return value if targeted else -value

    return pgd(model, inputs, labels, eps=params["eps"], alpha=step_size(params), steps=params["steps"],
               norm=params["norm"], random_start=params["random_start"], loss=loss, targeted=targeted,
               restarts=params["restarts"], stop_on_success=params["stop_on_success"], generator=ctx.generator)


def distance_metrics(model, dataset, ctx, settings: dict, prefix: str) -> dict[str, float]:
    """Uncapped, untargeted CW-L2 with ``settings`` on every correctly classified example of ``dataset``:
    success rate, median and mean distance of the successes, examples attacked (keys ``prefix/...``)."""
    l2 = {key: settings[key] for key in L2_KEYS if key not in ("targeted", "stop_on_success")}
    distances = []
    for inputs, labels in dataset.batches(ctx.config["eval"]["batch_size"], ctx.device):
        with torch.no_grad():
            right = model(inputs).argmax(1) == labels
        _, distance = cw_l2(model, inputs[right], labels[right], eps=float("inf"), **l2)
        distances.append(distance.cpu())
    distance = torch.cat(distances)
    found = distance[torch.isfinite(distance)]
    nan = float("nan")
    return {f"{prefix}/success_rate": float(torch.isfinite(distance).float().mean()) if len(distance) else nan,
            f"{prefix}/median_distance": float(found.median()) if len(found) else nan,
            f"{prefix}/mean_distance": float(found.mean()) if len(found) else nan,
            f"{prefix}/attacked_examples": float(len(distance))}


@hookimpl
def evaluate(model, dataset, ctx):
    """The paper's measure: the smallest L2 perturbation CW-L2 finds per example, without a cap.

    Runs only when ``cw`` is listed in ``eval.evaluators`` (not merely because it is the run's attack),
    with the ``plugins.cw`` settings; examples misclassified when clean are left out."""
    if "cw" not in ctx.config["eval"]["evaluators"]:
        return {}
    settings = {**ctx.settings, "norm": "l2"}
    check(settings)
    return distance_metrics(model, dataset, ctx, settings, "cw_l2")
