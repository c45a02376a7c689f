"""``bandits``: Bandits-TD (Ilyas, Engstrom and Madry, "Prior Convictions: Black-Box Adversarial
Attacks with Bandits and Priors", ICLR 2019, arXiv:1807.07978; code: MadryLab/blackbox-bandits).

Gradient estimation as a bandit problem with two priors:

* time prior: successive gradients are correlated, so a latent gradient estimate v (the prior) is
  kept across iterations and refined online;
* data prior: gradients are spatially smooth, so v lives at low resolution (``prior_size`` x
  ``prior_size`` per channel, "tiling") and is upsampled (nearest) to the image.

Each iteration draws exploration noise ``u = exploration * N(0, I) / sqrt(dim v)``, estimates the
directional derivative of the loss along ``v + u`` versus ``v - u`` with two queries at
``x + fd_eta * up(v +- u) / ||up(v +- u)||``, turns it into a gradient estimate of v and updates v:
exponentiated gradient (v in [-1, 1]) for L-inf, a plain gradient step for L2. The image then takes a
projected step along up(v): ``lr * sign`` (L-inf) or ``lr * up(v) / ||up(v)||`` (L2). The loss is
cross-entropy of the true class, ascended (untargeted; the official code), or of the target class,
descended (targeted).

Queries (all through :class:`advframe.cost.QueryCounter`, each counted, the budget included): one
on the clean input (it says whether the example counts: initially misclassified examples, or in
targeted mode examples already at the target, are not attacked and not counted), one on
``x + init`` when another method seeds the attack, then three per iteration: the two
finite-difference probes and the success check at the new iterate. The official code checks
success with a model call it does not count, so its reported queries are 2 per iteration; ours are
the honest 3. Probes are clipped to [0, 1] so every query is a valid image (the official code does
not clip them). The exponentiated-gradient step is computed in its equivalent logistic form
(sigmoid(logit((v + 1) / 2) + 2 lr g)), which cannot overflow.

Seeding and continuing another method's count (``params["init"/"counter"/"counted"]``, also
arguments of :func:`bandits_attack`): as for every query attack, see :func:`advframe.cost.run_query_attack`.

Settings (``plugins.bandits`` or per use in ``attack`` / ``eval.attacks``), with defaults (null
takes the official value for the norm)::

    budget: 1000        # queries per example, the clean query included
    tiling: true        # data prior: v at prior_size x prior_size; false: full resolution
    prior_size: 7       # side of the prior (the official tile_size argument: 50 for 224-299 px
                        # ImageNet, tiles of ~4.5-6 px; 7 gives 4 x 4 px tiles on 28 x 28)
    fd_eta: null        # finite-difference step (L2 size); null = 0.1 L-inf / 0.01 L2 (official)
    lr: null            # image step; null = eps / 5 L-inf (official 0.01 at eps 0.05) / eps / 10 L2 (0.5 at eps 5)
    online_lr: null     # prior step; null = L2: 0.1 (official); L-inf: 100 * sqrt(dim / 7500), the
                        # official 100 for its 3 x 50 x 50 prior, scaled so that each coordinate of
                        # a smaller prior moves as much per step (7 x 7 x 1 on MNIST: 8.1); with the
                        # literal 100 the EG step saturates a 49-coordinate prior at +-1 in a few
                        # iterations and the walk freezes (see README)
    exploration: null   # delta; null = 1.0 L-inf / 0.01 L2 (official)
    targeted: false     # true: the labels passed are target classes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.attacks import ascent_direction, project
from advframe.cost import QueryBatch, QueryCounter, QueryResult, check_query_settings, run_query_attack

DEFAULTS = {"budget": 1000, "tiling": True, "prior_size": 7, "fd_eta": None, "lr": None, "online_lr": None,
            "exploration": None, "targeted": False}
# the official values; lr as a fraction of eps, the L-inf online_lr for the official prior size
OFFICIAL = {"linf": {"fd_eta": 0.1, "lr": 0.2, "online_lr": 100.0, "exploration": 1.0},
            "l2": {"fd_eta": 0.01, "lr": 0.1, "online_lr": 0.1, "exploration": 0.01}}
OFFICIAL_PRIOR_DIM = 3 * 50 * 50


@hookimpl
def default_config():
    return dict(DEFAULTS)


def objective(scores: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """What the attack ascends: CE of the true class, or minus CE of the target class."""
    loss = F.cross_entropy(scores, labels, reduction="none")
    return -loss if targeted else loss


def flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, *[1] * (t.dim() - 1))


def exponentiated_gradient(prior: torch.Tensor, gradient: torch.Tensor, lr: float) -> torch.Tensor:
    """The official EG step on v in [-1, 1], as sigmoid(logit((v + 1) / 2) + 2 lr g) * 2 - 1."""
    real = ((prior + 1) / 2).clamp(0, 1)
    return torch.sigmoid(torch.logit(real) + 2 * lr * gradient) * 2 - 1


def resolve(norm: str, fd_eta=None, lr=None, online_lr=None, exploration=None, eps: float = 0.0,
            dim: int = OFFICIAL_PRIOR_DIM) -> dict:
    """Fill the unset step sizes with the official values for ``norm``: lr relative to eps, the L-inf
    online_lr scaled to a prior of ``dim`` coordinates (same per-coordinate EG step)."""
    official = dict(OFFICIAL[norm])
    if norm == "linf":
        official["online_lr"] *= (dim / OFFICIAL_PRIOR_DIM) ** 0.5
    return {"fd_eta": official["fd_eta"] if fd_eta is None else fd_eta,
            "lr": official["lr"] * eps if lr is None else lr,
            "online_lr": official["online_lr"] if online_lr is None else online_lr,
            "exploration": official["exploration"] if exploration is None else exploration}


def check_settings(params: dict) -> None:
    check_query_settings("bandits", params)
    if params["prior_size"] < 1:
        raise PluginError(f"bandits: prior_size must be >= 1, got {params['prior_size']}")
    for key in ("fd_eta", "lr", "online_lr", "exploration"):
        if params[key] is not None and params[key] <= 0:
            raise PluginError(f"bandits: {key} must be > 0 (or null for the official value), got {params[key]}")


def bandits_attack(model, inputs, labels, *, eps: float, norm: str = "linf", budget: int = 1000, tiling: bool = True,
                   prior_size: int = 7, fd_eta: float | None = None, lr: float | None = None,
                   online_lr: float | None = None, exploration: float | None = None, targeted: bool = False,
                   init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   counter: QueryCounter | None = None, counted: torch.Tensor | None = None) -> QueryResult:
    """Run Bandits-TD on one batch (inputs ``(N, C, H, W)`` in [0, 1]).

    :param init: a starting perturbation (projected into the ball); the walk starts there.
    :param counter: a :class:`QueryCounter` to continue another method's query count.
    :param counted: which examples to attack, when the caller already knows it (no clean query).
    """
    if inputs.dim() != 4:
        raise PluginError(f"bandits needs image batches (N, C, H, W), got shape {tuple(inputs.shape)}")
    generator = generator or torch.Generator().manual_seed(0)
    n, c, h, w = inputs.shape
    side = (prior_size, prior_size) if tiling else (h, w)
    dim = c * side[0] * side[1]
    steps = resolve(norm, fd_eta, lr, online_lr, exploration, eps, dim)
    batch = QueryBatch(model, inputs, labels, targeted=targeted, budget=budget, attack="bandits", counter=counter,
                       counted=counted)
    inputs, labels = batch.inputs, batch.labels
    delta = torch.zeros_like(inputs) if init is None else project(init.detach().to(inputs), inputs, eps, norm)
    batch.start(delta, moved=init is not None)  # the walk's starting point
    prior = torch.zeros(n, c, *side, device=inputs.device)

    def upsample(t):
        return F.interpolate(t, size=(h, w), mode="nearest")

    while len(todo := batch.active(needed=3)):  # two probes and the check at the new iterate
        x, y, v = inputs[todo] + delta[todo], labels[todo], prior[todo]
        noise = steps["exploration"] * torch.randn(v.shape, generator=generator).to(v) / dim ** 0.5
        up_plus, up_minus = upsample(v + noise), upsample(v - noise)
        # two calls: a counter call counts each example once, so its rows must be distinct examples
        plus, minus = ((x + steps["fd_eta"] * up / flat_norm(up)).clamp(0, 1) for up in (up_plus, up_minus))
        losses = [objective(batch.counter(probe, todo), y, targeted) for probe in (plus, minus)]
        derivative = (losses[0] - losses[1]) / (steps["fd_eta"] * steps["exploration"])
        gradient = derivative.view(-1, 1, 1, 1) * noise
        if norm == "linf":
            prior[todo] = exponentiated_gradient(v, gradient, steps["online_lr"])
        else:
            prior[todo] = v + steps["online_lr"] * gradient
        step = steps["lr"] * ascent_direction(upsample(prior[todo]), norm)
        delta[todo] = project(delta[todo] + step, inputs[todo], eps, norm)
        batch.query(inputs[todo] + delta[todo], todo)
    return batch.result(delta)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    check_settings(params)
    return run_query_attack(bandits_attack, model, inputs, labels, params, ctx, DEFAULTS)
