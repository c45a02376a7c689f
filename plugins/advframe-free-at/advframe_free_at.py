"""``free-at``: free adversarial training (Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis,
Taylor and Goldstein, "Adversarial Training for Free!", NeurIPS 2019, arXiv:1904.12843; code:
ashafahi/free_adv_train (TensorFlow, CIFAR) and mahyarnajibi/FreeAdversarialTraining (PyTorch,
ImageNet); the CIFAR PyTorch loop of locuslab/fast_adversarial ``train_free.py`` is the reference
for the box projection).

Every minibatch is replayed ``m`` times. Each replay is one forward and one backward pass on
``x + delta``; that single backward pass gives both the weight gradient (the optimizer steps) and the
gradient with respect to ``delta``, which takes one FGSM-like ascent step of size ``eps``::

    for j in 1..m:
        loss = CE(f(x + delta), y);  backward;  optimizer step
        delta <- project(delta + step * sign(grad_delta))     # eps ball, and x + delta in [0, 1]

``delta`` is one buffer the size of a full batch (zeros at the start), carried across replays *and*
across minibatches (the next batch starts from the last batch's perturbation, first projected into
its own box), and kept in ``ctx.state`` so ``--resume`` continues exactly. A smaller last batch uses
the first rows. ``setup`` sets the number of data passes to ``ceil(train.epochs / m)`` (the official
PyTorch code's rule), so ``train.epochs`` keeps meaning the budget of natural training: Free AT costs
about what natural training of ``train.epochs`` epochs costs (exactly, when ``m`` divides it). The
learning-rate schedule runs over the whole run as usual; the rate is updated per minibatch, so it is
constant within one minibatch's ``m`` replays.

The box constraint is applied to ``delta`` (``[-x, 1 - x]``), never by clamping ``x + delta`` in the
forward pass: a clamp there has no gradient on saturated pixels, so a negative ``delta`` on a black
MNIST pixel could never recover (the official ImageNet code clamps in the forward pass, which costs
~15 points of PGD accuracy on digits).

Threat model: ``eps`` and ``norm`` from the ``attack`` section (``linf`` as in the paper; the step is
the steepest-ascent direction of the norm). The ``attack`` section's steps and step size are not used.

Settings (``plugins.free-at``)::

    replays: 4          # m, the minibatch replays (paper: 8 on CIFAR-10, 4 on ImageNet)
    step_size: null     # the ascent step on delta; null = eps (the paper's choice)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.attacks import ascent_direction, project


@hookimpl
def default_config():
    return {"replays": 4, "step_size": None}


def check_settings(settings: dict, eps: float) -> tuple[int, float]:
    """The number of replays and the ascent step, checked."""
    replays, step = settings["replays"], settings["step_size"]
    if not isinstance(replays, int) or isinstance(replays, bool) or replays < 1:
        raise PluginError(f"free-at: replays must be an integer >= 1, got {replays!r}")
    if step is None:
        return replays, eps
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
        raise PluginError(f"free-at: step_size must be a positive number or null (= eps), got {step!r}")
    return replays, float(step)


@hookimpl
def setup(ctx):
    replays, _ = check_settings(ctx.settings, ctx.attack_params["eps"])
    ctx.data_passes = math.ceil(ctx.config["train"]["epochs"] / replays)
    ctx.state["delta"] = torch.zeros(ctx.config["train"]["batch_size"], *ctx.input_shape, device=ctx.device)


def carried_delta(ctx, inputs: torch.Tensor) -> torch.Tensor:
    """The persistent perturbation buffer, grown (with zeros) if a batch is larger than it."""
    buffer = ctx.state.get("delta")
    if buffer is None or len(buffer) < len(inputs) or buffer.shape[1:] != inputs.shape[1:]:
        grown = torch.zeros_like(inputs)
        if buffer is not None and buffer.shape[1:] == inputs.shape[1:]:
            grown[:len(buffer)] = buffer
        ctx.state["delta"] = buffer = grown
    return buffer


def replay_loss(model, inputs: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor):
    """One replay's forward pass: the loss and the leaf ``delta`` whose ``.grad`` the backward fills.

    ``inputs + delta`` is fed as is: ``delta`` was projected so that it lies in [0, 1].
    """
    leaf = delta.detach().clone().requires_grad_(True)
    logits = model(inputs + leaf)
    return F.cross_entropy(logits, labels), logits, leaf


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    attack = ctx.attack_params
    eps, norm = attack["eps"], attack["norm"]
    replays, step = check_settings(ctx.settings, eps)
    buffer = carried_delta(ctx, inputs)
    size = len(inputs)
    delta = project(buffer[:size], inputs, eps, norm)  # the carried delta must fit this batch's box
    correct = 0.0
    for _ in range(replays):
        loss, logits, leaf = replay_loss(model, inputs, labels, delta)
        ctx.step(loss)  # one backward: weight gradients (stepped) and leaf.grad
        delta = project(delta + step * ascent_direction(leaf.grad, norm), inputs, eps, norm)
        correct += (logits.detach().argmax(1) == labels).float().mean().item()
    buffer[:size] = delta
    return {
        "loss": loss,
        "replay_accuracy": correct / replays,
        "delta_mean_abs": delta.abs().mean().item(),
    }
