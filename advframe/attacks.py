"""The white-box primitives every attack and defense shares: one PGD, one projection, one set of losses.

All functions take inputs in [0, 1], run the model in eval mode (restoring its mode after), never
leave gradients on the model's parameters (they differentiate with respect to the perturbation
only), and keep every returned example inside both the ``eps`` ball and [0, 1].

* :func:`pgd`: L-inf / L2 / L1 projected gradient ascent with random start, restarts, targeted mode,
  any loss, and optional early stopping on examples that are already misclassified.
* :func:`boundary_pgd`: the early-stopped trajectory that yields the "last clean" and "first
  adversarial" points (Friendly AT, BAT) and the step at which each example crossed the boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advframe import losses
from advframe.models import eval_mode, unwrap

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- losses: per-example values the attack ascends, ``f(logits, labels, clean_logits)`` ------------

def cross_entropy_loss(logits, labels, clean_logits):
    return F.cross_entropy(logits, labels, reduction="none")


def kl_loss(logits, labels, clean_logits):
    """TRADES' inner objective: KL(p(x) || p(x'))."""
    return losses.kl_to_clean(logits, clean_logits)


def margin_loss(logits, labels, clean_logits):
    return losses.margin(logits, labels)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy_loss, "kl": kl_loss, "margin": margin_loss}


def misclassified(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """True where the attack has succeeded: wrong class, or the target class in targeted mode."""
    predictions = logits.argmax(1)
    return predictions == labels if targeted else predictions != labels


# -- geometry ------------------------------------------------------------------------------------

def _flat_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project_l1(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each example onto the L1 ball (Duchi et al. 2008)."""
    flat = delta.flatten(1)
    magnitude = flat.abs()
    inside = magnitude.sum(1) <= eps
    if inside.all():
        return delta
    sorted_mag = magnitude.sort(1, descending=True).values
    cumulative = sorted_mag.cumsum(1)
    ranks = torch.arange(1, flat.shape[1] + 1, device=delta.device, dtype=delta.dtype)
    condition = sorted_mag * ranks > (cumulative - eps)
    rho = condition.to(delta.dtype).mul(ranks).argmax(1)
    theta = (cumulative.gather(1, rho[:, None]).squeeze(1) - eps) / (rho + 1).to(delta.dtype)
    shrunk = torch.sign(flat) * (magnitude - theta[:, None]).clamp_min(0)
    return torch.where(inside[:, None], flat, shrunk).view_as(delta)


Bounds = tuple[float, float] | None


def project(delta: torch.Tensor, inputs: torch.Tensor, eps: float, norm: str = "linf",
            bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
    """Project ``delta`` into the ``eps`` ball, then so that ``inputs + delta`` lies in ``bounds``
    ([0, 1] for images and scaled features; ``None`` for embeddings, which have no box).

    The box step only shrinks coordinates towards zero, so the result stays inside the ball. The
    box is applied to delta (not by clamping ``inputs + delta`` in a forward pass), which keeps the
    gradient alive on saturated pixels.
    """
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        delta = delta * (eps / _flat_norm(delta, 2).clamp_min(1e-12)).clamp(max=1.0)
    elif norm == "l1":
        delta = project_l1(delta, eps)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    if bounds is None:
        return delta
    low, high = bounds
    return torch.max(torch.min(delta, high - inputs), low - inputs)


def ascent_direction(grad: torch.Tensor, norm: str, l1_sparsity: float = 0.99) -> torch.Tensor:
    """The steepest-ascent step of unit size under ``norm``."""
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / _flat_norm(grad, 2).clamp_min(1e-12)
    if norm == "l1":  # move only the coordinates with the largest gradient (SLIDE, Tramer & Boneh 2019)
        flat = grad.flatten(1).abs()
        threshold = flat.quantile(l1_sparsity, dim=1, keepdim=True)
        mask = (flat >= threshold).view_as(grad).to(grad.dtype)
        direction = grad.sign() * mask
        return direction / _flat_norm(direction, 1).clamp_min(1e-12)
    raise ValueError(f"unknown norm {norm!r}")


def random_delta(inputs: torch.Tensor, eps: float, norm: str, kind: str | bool,
                 generator: torch.Generator | None = None, bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
    """A starting perturbation: ``"uniform"`` in the ball, ``"normal"`` (TRADES' 0.001 N(0, I)), or ``"zero"``."""
    kind = "uniform" if kind is True else "zero" if kind is False else kind
    shape = inputs.shape
    if kind == "zero":
        delta = torch.zeros_like(inputs)
    elif kind == "normal":
        delta = 0.001 * torch.randn(shape, generator=generator).to(inputs)
    elif kind == "uniform":
        if norm == "linf":
            delta = (torch.rand(shape, generator=generator) * 2 - 1).to(inputs) * eps
        else:
            p = 2 if norm == "l2" else 1
            direction = torch.randn(shape, generator=generator) if p == 2 else \
                torch.empty(shape).exponential_(generator=generator) * torch.randint(0, 2, shape, generator=generator).mul(2).sub(1)
            direction = direction / _flat_norm(direction, p).clamp_min(1e-12)
            radius = torch.rand(shape[0], generator=generator).view(-1, *([1] * (len(shape) - 1)))
            delta = (direction * radius * eps).to(inputs)
    else:
        raise ValueError(f"unknown random start {kind!r}: use uniform, normal or zero")
    return project(delta, inputs, eps, norm, bounds)


def step_size(params: dict) -> float:
    """``params["alpha"]``, or 2.5 eps / steps when it is unset (Madry et al.'s rule: the walk can
    cross the ball and come back)."""
    alpha = params.get("alpha")
    if alpha is None:
        return 2.5 * params["eps"] / max(params.get("steps") or 1, 1)
    return float(alpha)


def _loss_fn(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}: use one of {', '.join(LOSSES)} or a callable")
    return LOSSES[loss]


# -- PGD -----------------------------------------------------------------------------------------

def pgd(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, eps: float, alpha: float, steps: int,
        norm: str = "linf", random_start: str | bool = "uniform", loss: str | LossFn = "ce",
        targeted: bool = False, restarts: int = 1, stop_on_success: bool = False,
        init: torch.Tensor | None = None, generator: torch.Generator | None = None,
        bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
    """Projected gradient ascent (Madry et al. 2018); FGSM is ``steps=1, random_start="zero", alpha=eps``.

    :param loss: ``"ce"``, ``"kl"`` (to the clean prediction), ``"margin"``, or
        ``f(logits, labels, clean_logits) -> per-example loss``; it is ascended (descended when
        ``targeted``, where ``labels`` are the target classes).
    :param restarts: extra random starts are run only on examples no start has broken yet.
    :param stop_on_success: freeze an example at its first misclassified iterate. For evaluation:
        the robust accuracy is unchanged and the time falls.
    :param init: a starting perturbation (another method's output) used by the first start.
    :param bounds: the box the inputs live in (``None``: no box, for embeddings).
    :return: adversarial inputs, detached.
    """
    model = unwrap(model)
    loss_fn = _loss_fn(loss)
    inputs, labels = inputs.detach(), labels.detach()
    sign = -1.0 if targeted else 1.0
    with eval_mode(model), torch.enable_grad():
        clean_logits = None
        if loss_fn is kl_loss or not isinstance(loss, str):
            with torch.no_grad():
                clean_logits = model(inputs)
        result = inputs.clone()
        todo = torch.arange(len(inputs), device=inputs.device)
        for restart in range(restarts):
            x, y = inputs[todo], labels[todo]
            clean = clean_logits[todo] if clean_logits is not None else None
            if restart == 0 and init is not None:
                delta = project(init[todo].detach().to(inputs), x, eps, norm, bounds)
            else:
                delta = random_delta(x, eps, norm, random_start, generator, bounds)
            active = torch.arange(len(x), device=inputs.device)
            for _ in range(steps):
                delta.requires_grad_(True)
                logits = model(x[active] + delta)
                objective = loss_fn(logits, y[active], clean[active] if clean is not None else None)
                grad, = torch.autograd.grad(sign * objective.sum(), delta)
                delta = delta.detach()
                if stop_on_success:
                    done = misclassified(logits.detach(), y[active], targeted)
                    if done.any():
                        result[todo[active[done]]] = x[active[done]] + delta[done]
                        keep = ~done
                        active, delta, grad = active[keep], delta[keep], grad[keep]
                        if len(active) == 0:
                            break
                delta = project(delta + alpha * ascent_direction(grad, norm), x[active], eps, norm, bounds)
            result[todo[active]] = x[active] + delta.detach()
            if restart + 1 < restarts:
                with torch.no_grad():
                    broken = misclassified(model(result[todo]), labels[todo], targeted)
                todo = todo[~broken]
                if len(todo) == 0:
                    break
    return result.detach()


@dataclass
class BoundaryPoints:
    """What :func:`boundary_pgd` returns, one row per input example."""

    last_clean: torch.Tensor  # last iterate still classified correctly (the start if it never was)
    first_adversarial: torch.Tensor  # iterate `extra_steps` steps past the first misclassification
    flip_step: torch.Tensor  # step at which the example was first misclassified; -1 if never
    stopped: torch.Tensor  # True where first_adversarial was misclassified when it stopped


def boundary_pgd(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, eps: float, alpha: float,
                 steps: int, norm: str = "linf", random_start: str | bool = "normal", loss: str | LossFn = "kl",
                 extra_steps: int = 1, generator: torch.Generator | None = None,
                 bounds: Bounds = (0.0, 1.0)) -> BoundaryPoints:
    """Early-stopped PGD that stops each example at the decision boundary (Friendly AT; BAT).

    Every example walks its own trajectory. When an iterate is first misclassified, the iterate
    before it becomes ``last_clean``; the walk goes on, and the first misclassified iterate after
    ``extra_steps`` more steps becomes ``first_adversarial`` (if the example returns to its class it
    keeps walking until it is misclassified again). Examples that never cross keep their final
    iterate for both. The per-example ``flip_step`` is how strong an attack each example needed.
    """
    model = unwrap(model)
    loss_fn = _loss_fn(loss)
    inputs, labels = inputs.detach(), labels.detach()
    n = len(inputs)
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            clean_logits = model(inputs)
        delta = random_delta(inputs, eps, norm, random_start, generator, bounds)
        last_clean = inputs + delta
        first_adversarial = torch.empty_like(inputs)
        flip_step = torch.full((n,), -1, dtype=torch.long, device=inputs.device)
        stopped = torch.zeros(n, dtype=torch.bool, device=inputs.device)
        remaining = torch.full((n,), extra_steps, dtype=torch.long, device=inputs.device)
        previous = inputs + delta  # the iterate before the current one (the start at step 0)
        active = torch.arange(n, device=inputs.device)
        for step in range(steps):
            delta.requires_grad_(True)
            current = inputs[active] + delta
            logits = model(current)
            objective = loss_fn(logits, labels[active], clean_logits[active])
            grad, = torch.autograd.grad(objective.sum(), delta)
            delta, current = delta.detach(), current.detach()
            wrong = logits.detach().argmax(1) != labels[active]
            first_flip = wrong & (flip_step[active] < 0)
            last_clean[active[first_flip]] = previous[first_flip]
            flip_step[active[first_flip]] = step
            finish = wrong & (remaining[active] == 0)
            remaining[active[wrong & ~finish]] -= 1
            first_adversarial[active[finish]] = current[finish]
            stopped[active[finish]] = True
            keep = ~finish
            active, delta, grad, current = active[keep], delta[keep], grad[keep], current[keep]
            if len(active) == 0:
                break
            previous = current
            delta = project(delta + alpha * ascent_direction(grad, norm), inputs[active], eps, norm, bounds)
        final = inputs[active] + delta.detach()
        first_adversarial[active] = final
        never = active[flip_step[active] < 0]
        last_clean[never] = final[flip_step[active] < 0]
    return BoundaryPoints(last_clean.detach(), first_adversarial.detach(), flip_step, stopped)
