"""``square``: Square Attack (Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV 2020, arXiv:1912.00049;
code: max-andr/square-attack).

A score-based random search that needs no gradient estimate. Each iteration changes the
perturbation inside one random square window and keeps the change only if the attack loss falls:

* L-inf: start from vertical stripes (each column and channel at +eps or -eps); a step sets the
  window to one random +eps/-eps per channel (drawn again while it would not change the image).
* L2: start from a 5x5 grid of "pseudo-Gaussian" bumps with random signs, scaled to norm eps; a
  step moves the mass of a second random window into the first, adds a new two-lobed bump there
  and rescales the whole perturbation back to norm eps.
* The window side shrinks with a piecewise-constant schedule of ``p`` (the fraction of pixels
  changed), halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 queries,
  rescaled to ``budget``.
* Loss: the logit margin f_y - max_{k != y} f_k untargeted, cross-entropy to the target targeted.

Queries (all through :class:`advframe.cost.QueryCounter`, each counted, the budget included): one
on the clean input (it says whether the example counts: initially misclassified examples, or in
targeted mode examples already at the target, are not attacked and not counted), one on the
starting point (stripes, bumps, or ``params["init"]`` projected into the ball), then one per
iteration until the example succeeds or its budget is spent. The official code does not count the
clean query, so counts here are the paper's plus one.

Settings (``plugins.square`` or per use in ``attack`` / ``eval.attacks``), with defaults::

    budget: 1000      # queries per example, the clean query included
    p_init: null      # initial fraction of pixels changed; null = 0.05 (L-inf) / 0.1 (L2), the
                      # official values for undefended models (the paper uses 0.3-0.8 on robust MNIST)
    targeted: false   # true: the labels passed are target classes

Threat model: ``norm`` linf or l2 and ``eps`` (from the ``attack`` section). Seeding and continuing
another method's count (``params["init"/"counter"/"counted"]``, also arguments of
:func:`square_attack`): as for every query attack, see :func:`advframe.cost.run_query_attack`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.attacks import project
from advframe.cost import QueryBatch, QueryCounter, QueryResult, check_query_settings, run_query_attack
from advframe.losses import margin

DEFAULTS = {"budget": 1000, "p_init": None, "targeted": False}
P_INIT = {"linf": 0.05, "l2": 0.1}
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@hookimpl
def default_config():
    return dict(DEFAULTS)


def p_schedule(p_init: float, iteration: int, budget: int) -> float:
    """The official piecewise-constant schedule, on a 10,000-query scale rescaled to ``budget``."""
    scaled = int(iteration / budget * 10000)
    return p_init / 2 ** sum(scaled > mark for mark in HALVINGS)


def attack_loss(scores: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """What the search lowers: the margin to the label, or cross-entropy to the target."""
    if targeted:
        return F.cross_entropy(scores, labels, reduction="none")
    return -margin(scores, labels)


def rectangle_bump(rows: int, cols: int) -> torch.Tensor:
    """Nested centred rectangles weighted 1/(k+1)^2 (the official pseudo-Gaussian), unit L2 norm."""
    radius = max(rows // 2 + 1, cols // 2 + 1)
    weights = 1.0 / torch.arange(1, radius + 1, dtype=torch.float64) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum of weights from ring d outwards
    distance = torch.maximum((torch.arange(rows) - rows // 2).abs()[:, None],
                             (torch.arange(cols) - cols // 2).abs()[None, :])
    bump = tail[distance]
    return (bump / bump.norm()).float()


def two_lobe_bump(side: int, count: int, generator) -> torch.Tensor:
    """``count`` bumps of ``side`` x ``side``: a positive and a negative half, randomly transposed."""
    bump = torch.cat([rectangle_bump(side // 2, side), -rectangle_bump(side - side // 2, side)])
    bump = bump / bump.norm()
    flip = torch.rand(count, generator=generator) < 0.5
    return torch.where(flip[:, None, None], bump.T, bump)[:, None]


def random_signs(shape, generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).float().mul_(2).sub_(1)


def window_index(rows: torch.Tensor, cols: torch.Tensor, side: int, channels: int, device):
    """Advanced-indexing tuple selecting each example's ``side`` x ``side`` window, all channels."""
    steps = torch.arange(side)
    r, c = rows[:, None] + steps, cols[:, None] + steps
    index = (torch.arange(len(rows))[:, None, None, None], torch.arange(channels)[None, :, None, None],
             r[:, None, :, None], c[:, None, None, :])
    return tuple(i.to(device) for i in index)


def random_windows(count: int, side: int, height: int, width: int, generator):
    rows = torch.randint(0, height - side + 1, (count,), generator=generator)
    cols = torch.randint(0, width - side + 1, (count,), generator=generator)
    return rows, cols


def initial_delta(inputs: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    """Vertical stripes (L-inf) or a 5x5 grid of bumps scaled to norm eps (L2)."""
    n, c, h, w = inputs.shape
    if norm == "linf":
        return (random_signs((n, c, 1, w), generator) * eps).expand(n, c, h, w).to(inputs)
    side = max(h // 5, 1)
    delta = torch.zeros(n, c, h, w)
    start = (h - 5 * side) // 2
    for i in range(h // side):
        for j in range(w // side):
            top, left = start + i * side, start + j * side
            if top + side > h or left + side > w:
                continue
            bump = two_lobe_bump(side, n, generator) * random_signs((n, c, 1, 1), generator)
            delta[:, :, top:top + side, left:left + side] += bump
    delta = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * eps
    return delta.to(inputs)


def linf_step(inputs, delta, p, eps, generator):
    """Candidate: the window set to one random +-eps per channel, resampled while it changes nothing."""
    n, c, h, w = inputs.shape
    side = min(max(round(math.sqrt(p * h * w)), 1), h - 1)
    index = window_index(*random_windows(n, side, h, w, generator), side, c, inputs.device)
    current = (inputs + delta)[index]
    candidate = delta.clone()
    todo = torch.arange(n, device=inputs.device)
    for _ in range(100):  # with +-eps per channel a change is found within a few draws
        signs = random_signs((len(todo), c, 1, 1), generator).to(inputs) * eps
        window = (index[0][todo], index[1], index[2][todo], index[3][todo])
        candidate[window] = signs.expand(-1, -1, side, side)
        unchanged = ((inputs[window] + candidate[window]).clamp(0, 1) - current[todo]).abs().flatten(1).amax(1) < 1e-7
        todo = todo[unchanged]
        if len(todo) == 0:
            break
    return candidate


def l2_step(inputs, delta, p, eps, generator):
    """Candidate: window 2 emptied into window 1, a new bump added there, total norm back to eps."""
    n, c, h, w = inputs.shape
    side = max(round(math.sqrt(p * h * w)), 3)
    side += side % 2 == 0
    side = min(side, h - 1 if (h - 1) % 2 else h - 2)
    first = window_index(*random_windows(n, side, h, w, generator), side, c, inputs.device)
    second = window_index(*random_windows(n, side, h, w, generator), side, c, inputs.device)
    union = torch.zeros_like(delta)
    union[first] = 1.0
    union[second] = 1.0
    window_norm = delta[first].flatten(2).norm(dim=2)[..., None, None]
    image_norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    union_norm = (delta * union).flatten(2).norm(dim=2)[..., None, None]
    bump = two_lobe_bump(side, n, generator).to(inputs) * random_signs((n, c, 1, 1), generator).to(inputs)
    new = bump + delta[first] / (window_norm + 1e-10)
    mass = ((eps ** 2 - image_norm ** 2).clamp_min(0) / c + union_norm ** 2).sqrt()
    new = new / new.flatten(2).norm(dim=2)[..., None, None].clamp_min(1e-12) * mass
    candidate = delta.clone()
    candidate[second] = 0.0
    candidate[first] = new
    return candidate / candidate.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * eps


def square_attack(model, inputs, labels, *, eps: float, norm: str = "linf", budget: int = 1000,
                  p_init: float | None = None, targeted: bool = False, init: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, counter: QueryCounter | None = None,
                  counted: torch.Tensor | None = None) -> QueryResult:
    """Run the Square Attack on one batch (inputs ``(N, C, H, W)`` in [0, 1]).

    :param init: a starting perturbation (projected into the ball) replacing stripes / bumps.
    :param counter: a :class:`QueryCounter` to continue (another method's queries count too).
    :param counted: which examples to attack, when the caller already knows it (no clean query).
    """
    if inputs.dim() != 4:
        raise PluginError(f"square needs image batches (N, C, H, W), got shape {tuple(inputs.shape)}")
    generator = generator or torch.Generator().manual_seed(0)
    p_init = P_INIT[norm] if p_init is None else p_init
    if not 0 < p_init <= 1:
        raise PluginError(f"square: p_init must be in (0, 1], got {p_init}")
    batch = QueryBatch(model, inputs, labels, targeted=targeted, budget=budget, attack="square", counter=counter,
                       counted=counted)
    inputs, labels = batch.inputs, batch.labels
    start = initial_delta(inputs, eps, norm, generator) if init is None else init.detach().to(inputs)
    delta = project(start, inputs, eps, norm)
    best_loss = torch.full((len(inputs),), float("inf"), device=inputs.device)
    todo, scores = batch.start(delta)
    if scores is not None:
        best_loss[todo] = attack_loss(scores, labels[todo], targeted)
    step = linf_step if norm == "linf" else l2_step
    iteration = 0
    while len(todo := batch.active()):
        x = inputs[todo]
        p = p_schedule(p_init, iteration, budget)
        candidate = project(step(x, delta[todo], p, eps, generator), x, eps, norm)
        scores = batch.query(x + candidate, todo)
        loss = attack_loss(scores, labels[todo], targeted)
        accept = (loss < best_loss[todo]) | batch.success[todo]  # a success is always kept
        delta[todo[accept]] = candidate[accept]
        best_loss[todo[accept]] = loss[accept]
        iteration += 1
    return batch.result(delta)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    check_query_settings("square", params, ("linf", "l2"))
    return run_query_attack(square_attack, model, inputs, labels, params, ctx, DEFAULTS)
