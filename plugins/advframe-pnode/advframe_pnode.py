"""``pnode``: prototypical few-shot segmentation with a neural-ODE block (Pandey, Vardhan, Chasmai,
Sur, Lall, "Adversarially Robust Prototypical Few-shot Segmentation with Neural-ODEs", MICCAI 2022,
arXiv:2210.03429; code: prinshul/Prototype_NeuralODE_Adv_Attack, folder ``PNODE``).

PANet's prototype segmenter with a neural ODE after the encoder E: the features are the state of
the flow at time T, solved with torchdiffeq and backpropagated through the solver (not the adjoint,
as the official code)::

    F(x) = z(T),  z(0) = E(x),  dz/dt = f_psi(z(t), t)
    f_psi = GroupNorm -> n_layers x [ReLU -> conv3x3 on (z, t) (t as an extra channel) -> GroupNorm]

The flow is continuous and invertible, so nearby inputs' feature trajectories cannot cross: small
input perturbations move the features less. Prototypes, logits and the loss are PANet's without its
alignment term (the official PNODE trains with the query CE only)::

    p_bg, p_fg = mean_k MAP(F(s_k), 1 - M_k), mean_k MAP(F(s_k), M_k)
    logits_c(u) = scale * cos(F(q)(u), p_c)          L = L_seg = CE(logits, M_q)

``setup`` wraps the run's encoder (``model.name``, by default the core's ``seg-encoder``: 3 conv
layers of 32 channels, stride 2 twice) in :class:`ODEEncoder` and returns it, so the ODE block is
trained, checkpointed and restored with the encoder, and every attack differentiates through the
solver with the same solver and tolerances as training. ``adapt_task`` computes the prototypes
from the support alone (eval mode, detached) and returns a module mapping query images to per-pixel
logits ``(B, 2, H, W)``. Training logs ``nfe``, the ODE function evaluations per forward pass
(adaptive solvers need more as training goes on: METHODS.md's pitfall).

Solver: ``rk4`` with ``steps`` fixed steps by default (METHODS.md's CPU check: 8 steps, T = 4); the
official solver is ``dopri5`` with rtol = atol = 1e-3 (``solver: dopri5``; ``max_steps`` caps its
steps). Any torchdiffeq method name is accepted.

Defaults of a run (``run_defaults``): ``data.name: mnist-segmentation``, ``model.name: seg-encoder``,
episodic 1-way 1-shot training with one query per episode, 5 episodes per step (official batch 5),
300 episodes an epoch for 5 epochs (1,500 episodes), 300 fixed test tasks, FGSM and PGD-10 on the query
at eps 0.1 (``stop_on_success: false``, one restart: success is per pixel).

Settings (``plugins.pnode``)::

    scale: 20.0       # cosine-similarity scale of the logits (official: 20)
    ode_time: 4.0     # T, the integration time (official ode_time: 4)
    ode_layers: 3     # conv layers of f_psi (official: 3)
    solver: rk4       # torchdiffeq method: rk4 | euler | midpoint (fixed step) | dopri5 (official) | ...
    steps: 8          # fixed-step solvers: steps over [0, T]
    rtol: 1.0e-3      # adaptive solvers (official 1e-3)
    atol: 1.0e-3      # adaptive solvers (official 1e-3)
    max_steps: 1000   # adaptive solvers: at most this many steps per solve
    adjoint: false    # true: torchdiffeq's adjoint method for the backward pass (official: false)
    zero_init: true   # start f_psi at 0 (the last GroupNorm's scale): the flow starts as the identity;
                      # false = PyTorch's default initialisation, as the official code (see the README)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advframe import PluginError, hookimpl
from advframe.models import unwrap
from advframe.ode import ODE_DEFAULTS, ode_encoder
from advframe.segmentation import (
    PrototypeSegmenter,
    prototype_logits,
    segmentation_episodes,
    segmentation_run_defaults,
    support_prototypes,
)


@hookimpl
def default_config():
    return {"scale": 20.0, **ODE_DEFAULTS}


@hookimpl
def run_defaults():
    return segmentation_run_defaults()


@hookimpl
def setup(model, ctx):
    if not ctx.settings["scale"] > 0:
        raise PluginError(f"pnode: plugins.pnode.scale must be > 0, got {ctx.settings['scale']}")
    return ode_encoder(model, ctx)


@hookimpl
def training_step(model, batch, ctx):
    ode = unwrap(model).ode
    ode.func.nfe = 0
    losses = []
    tasks = segmentation_episodes(batch, "pnode")
    for task in tasks:
        support, masks = task.support
        features = model(torch.cat([support, task.query_inputs]))
        centres = support_prototypes(features[: len(support)], masks)
        logits = prototype_logits(features[len(support):], centres, support.shape[-2:], ctx.settings["scale"])
        losses.append(F.cross_entropy(logits, task.query_labels))
    return {"loss": torch.stack(losses).mean(), "nfe": ode.func.nfe / len(losses)}


@hookimpl
def adapt_task(model, support, ctx):
    return PrototypeSegmenter.from_support(model, support, ctx.settings["scale"], "pnode")
