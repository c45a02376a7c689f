"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML 2020, arXiv:1907.02044; code: fra31/auto-attack,
``autoattack/fab_pt.py``), as AutoAttack's third component runs it.

FAB looks for the smallest perturbation that reaches the decision boundary between the true class
``y`` and a target ``t``. Each iteration linearises ``g = z_t - z_y`` at the current point, projects
both the current point and the clean input onto the hyperplane ``g = 0`` (smallest step in the
threat model's norm that stays in [0, 1]), and moves to a mix of the two projections that leans
towards the clean input (weight ``min(|d1| / (|d1| + |d2|), alpha_max)`` on the clean side) with a
small overshoot ``eta``. Once a point is adversarial it is kept if it is the smallest so far, and the
walk steps back towards the clean input by the factor ``beta``.

AutoAttack's settings: 100 iterations per target, the 9 classes ranked after the true one at the clean
input, one run per target from the clean input, ``alpha_max`` 0.1, ``eta`` 1.05, ``beta`` 0.9; an
example counts as broken when a misclassified point within ``eps`` was found. Here each example stops
as soon as it has one (AutoAttack keeps minimising the norm, which does not change whether it is
within ``eps``).

As an attack plugin (``fab``, the component ``eval.protocol: standard`` runs), with defaults::

    steps: 100           # iterations per target
    target_classes: 9    # the classes ranked after the true one (fewer when the model has fewer)
    alpha_max: 0.1
    eta: 1.05
    beta: 0.9

Threat models L-inf and L2. An example never broken is returned as its clean input.
"""

from __future__ import annotations

import torch

from advframe import PluginError, hookimpl
from advframe.models import eval_mode, unwrap

DEFAULTS = {"steps": 100, "target_classes": 9, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9}


def norm_of(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def boxed_projection(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Per row: the smallest step ``d`` (L-inf or L2) with ``<w, p + d> = b`` and ``p + d`` in [0, 1].

    Each coordinate moves in the direction that brings ``<w, .>`` towards ``b``, by at most its room to
    the box. In L-inf every coordinate moves by ``min(s, room_i)`` for one size ``s``; in L2 by
    ``min(lambda |w_i|, room_i)``. Progress towards ``b`` grows piecewise linearly with ``s`` (or
    lambda), with a kink where a coordinate reaches the box, so sorting the kinks gives the exact size.
    Rows that cannot reach the hyperplane inside the box get the projection that ignores the box (the
    caller clips), as the reference does; rows with ``w = 0`` do not move. Rows are flat vectors.
    """
    gap = b - (w * points).sum(1)
    direction = torch.sign(w) * torch.sign(gap)[:, None]
    room = torch.where(direction > 0, 1 - points, points)
    magnitude = w.abs()
    need = gap.abs()
    if norm == "linf":
        kinks, rate = room, magnitude  # coordinate i adds |w_i| * min(s, room_i)
    else:
        kinks, rate = room / magnitude.clamp_min(1e-30), magnitude ** 2  # adds w_i^2 * min(lambda, room_i / |w_i|)
    helps = magnitude > 0
    kinks = torch.where(helps, kinks, torch.zeros_like(kinks))
    rate = torch.where(helps, rate, torch.zeros_like(rate))
    order = kinks.argsort(1)
    kinks_sorted, rate_sorted = kinks.gather(1, order), rate.gather(1, order)
    saturated = torch.cumsum(rate_sorted * kinks_sorted, 1)  # progress of the coordinates at the box
    free_rate = rate.sum(1, keepdim=True) - torch.cumsum(rate_sorted, 1)  # rate of the others
    progress = saturated + kinks_sorted * free_rate  # progress when the size reaches each kink
    passed = (progress < need[:, None]).sum(1)  # kinks passed before the hyperplane is reached
    feasible = passed < progress.shape[1]
    before = (passed - 1).clamp_min(0)[:, None]
    base = torch.where(passed[:, None] > 0, saturated.gather(1, before), torch.zeros_like(before, dtype=w.dtype))
    slope = torch.where(passed[:, None] > 0, free_rate.gather(1, before), rate.sum(1, keepdim=True))
    size = ((need[:, None] - base) / slope.clamp_min(1e-30)).clamp_min(0)
    if norm == "linf":
        step = torch.minimum(size, room)
        free = (need / magnitude.sum(1).clamp_min(1e-30))[:, None]  # the box ignored
    else:
        step = torch.minimum(size * magnitude, room)
        free = (need / (magnitude ** 2).sum(1).clamp_min(1e-30))[:, None] * magnitude
    step = torch.where(feasible[:, None], step, free)
    return torch.where(helps, direction * step, torch.zeros_like(step))


def fab_targeted(model, inputs: torch.Tensor, labels: torch.Tensor, *, eps: float, norm: str = "linf",
                 steps: int = 100, target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """FAB-T over the top ``target_classes`` targets, each on the examples still robust.

    Returns the adversarial batch (clean where nothing within ``eps`` was found) and which examples
    were broken within ``eps``.
    """
    model = unwrap(model)
    shape = (-1,) + (1,) * (inputs.dim() - 1)
    result = inputs.clone()
    with eval_mode(model):
        with torch.no_grad():
            clean_logits = model(inputs)
        ranking = clean_logits.argsort(1, descending=True)
        broken = clean_logits.argmax(1) != labels  # clean mistakes are never attacked
        already = broken.clone()
        for rank in range(1, target_classes + 1):
            rows = (~broken).nonzero().flatten()
            if len(rows) == 0:
                break
            x, y, target = inputs[rows], labels[rows], ranking[rows, rank]
            point = x.clone()
            for _ in range(steps):
                with torch.enable_grad():
                    moving = point.detach().requires_grad_(True)
                    logits = model(moving)
                    gap = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
                    w, = torch.autograd.grad(gap.sum(), moving)
                w, gap = w.flatten(1), gap.detach()
                b = (w * point.flatten(1)).sum(1) - gap  # the linearised boundary: <w, z> = b
                both = boxed_projection(torch.cat([point.flatten(1), x.flatten(1)]), torch.cat([w, w]),
                                        torch.cat([b, b]), norm)
                d_point, d_clean = both[: len(rows)].view_as(x), both[len(rows):].view_as(x)
                a_point = norm_of(d_point, norm).clamp_min(1e-8)
                a_clean = norm_of(d_clean, norm).clamp_min(1e-8)
                alpha = (a_point / (a_point + a_clean)).clamp(0, alpha_max).view(shape)
                point = ((point + eta * d_point) * (1 - alpha) + (x + eta * d_clean) * alpha).clamp(0, 1)
                with torch.no_grad():
                    wrong = model(point).argmax(1) != y
                won = wrong & (norm_of(point - x, norm) <= eps)
                if won.any():
                    result[rows[won]] = point[won]
                    broken[rows[won]] = True
                    keep = ~won
                    rows, x, y, target = rows[keep], x[keep], y[keep], target[keep]
                    point, wrong = point[keep], wrong[keep]
                    if len(rows) == 0:
                        break
                point = torch.where(wrong.view(shape), x + beta * (point - x), point)  # back towards the clean input
    return result, broken & ~already


@hookimpl
def default_config():
    return dict(DEFAULTS)


@hookimpl
def generate_perturbation(model, inputs, labels, params, ctx):
    if params["norm"] not in ("linf", "l2"):
        raise PluginError(f"fab: norm must be linf or l2, got {params['norm']!r}")
    if params["steps"] < 1 or params["target_classes"] < 1:
        raise PluginError(f"fab: steps and target_classes must be >= 1, got {params['steps']} and "
                          f"{params['target_classes']}")
    adversarial, _ = fab_targeted(model, inputs, labels, eps=params["eps"], norm=params["norm"], steps=params["steps"],
                                  target_classes=min(params["target_classes"], ctx.num_classes - 1),
                                  alpha_max=params["alpha_max"], eta=params["eta"], beta=params["beta"])
    return adversarial
