"""``r-pnode``: regularised prototypical neural-ODE few-shot segmentation (Pandey, Chasmai, Sur,
Lall, "Robust Prototypical Few-Shot Organ Segmentation with Regularized Neural-ODEs", IEEE TMI
42(9):2490-2501, 2023, doi:10.1109/TMI.2023.3258069, arXiv preprint 2208.12428 (id not verified here);
no official code found for R-PNODE; its predecessor PNODE (MICCAI 2022) is
prinshul/Prototype_NeuralODE_Adv_Attack, folder ``PNODE``).

PNODE (PANet's prototype segmenter with a neural ODE after the encoder, solved with torchdiffeq and
backpropagated through the solver) plus two regularisers that constrain same-class support and query
features to lie together in the representation space::

    F(x) = z(T),  z(0) = E(x),  dz/dt = f_psi(z(t), t)
    f_psi = GroupNorm -> ode_layers x [ReLU -> conv3x3 on (z, t) (t as an extra channel) -> GroupNorm]
    p_bg, p_fg = mean_k MAP(F(s_k), 1 - M_k), mean_k MAP(F(s_k), M_k)
    logits_c(u) = scale * cos(F(q)(u), p_c)           L_seg = CE(logits, M_q)
    L = L_seg + cluster_weight * L_clu + consistency_weight * L_con (+ separation_weight * L_sep)

The two regulariser formulas are reconstructions (METHODS.md [infer]: the paper's exact forms and
weights were not retrieved), each behind a switch:

* cluster loss: every labelled pixel u of class c (c = background, foreground) is pulled to its
  prototype, L_clu = sum_c mean_{u in Omega_c} (1 - cos(F(u), p_c)), with Omega_c the pixels of
  class c in the support masks and the query's ground-truth mask (``cluster_sets: both``), or only
  one of them (``support`` / ``query``). The cosine is the core's ``prototype_logits`` at scale 1
  (similarity at feature resolution, upsampled to the mask). ``separation_weight`` > 0 adds
  L_sep = max(0, cos(p_fg, p_bg)), which pushes the two prototypes apart (off by default).
* consistency loss: the representation of an episode's images must not move under Gaussian noise
  n ~ N(0, noise_std^2) (inputs clamped to [0, 1]): ``consistency: features`` gives
  L_con = mean_u ||F(x)(u) - F(x + n)(u)||^2 (squared distance per feature pixel, averaged);
  ``consistency: kl`` gives the per-pixel KL(p(x) || p(x + n)) of the query predictions (prototypes
  of the clean support), averaged over pixels.

``setup`` wraps the run's encoder (``model.name``, by default the core's ``seg-encoder``: 3 conv
layers of 32 channels, stride 2 twice) in :class:`ODEEncoder` and returns it, so the ODE block is
trained, checkpointed and restored with the encoder, and every attack differentiates through the
solver with the training solver and tolerances. ``adapt_task`` computes the prototypes from the
support alone (eval mode, detached) and returns a module mapping query images to per-pixel logits
``(B, 2, H, W)``. Training logs each loss term and ``nfe`` (ODE function evaluations per episode,
clean and noisy passes together).

Solver: ``rk4`` with ``steps`` fixed steps by default (METHODS.md's CPU check: 8 steps, T = 4); the
official PNODE solver is ``dopri5`` with rtol = atol = 1e-3 (``solver: dopri5``).

Defaults of a run (``run_defaults``): ``data.name: mnist-segmentation``, ``model.name: seg-encoder``,
episodic 1-way 1-shot training with one query per episode, 5 episodes per step (PNODE's batch 5),
300 episodes an epoch for 5 epochs (1,500 episodes), 300 fixed test tasks, FGSM and PGD-10 on the query
at eps 0.1 (``stop_on_success: false``, one restart: success is per pixel).

Settings (``plugins.r-pnode``)::

    scale: 20.0               # cosine-similarity scale of the logits (PNODE: 20)
    ode_time: 4.0             # T, the integration time (PNODE: 4)
    ode_layers: 3             # conv layers of f_psi (PNODE: 3)
    solver: rk4               # torchdiffeq method: rk4 | euler | midpoint (fixed step) | dopri5 (PNODE) | ...
    steps: 8                  # fixed-step solvers: steps over [0, T]
    rtol: 1.0e-3              # adaptive solvers (PNODE 1e-3)
    atol: 1.0e-3              # adaptive solvers (PNODE 1e-3)
    max_steps: 1000           # adaptive solvers: at most this many steps per solve
    adjoint: false            # true: torchdiffeq's adjoint method for the backward pass
    zero_init: true           # start f_psi at 0 (the flow starts as the identity); false = PyTorch's
                              # default initialisation, as the PNODE code (see the README)
    cluster_weight: 1.0       # lambda_1 [infer; METHODS.md: sweep 0.1, 1]
    cluster_sets: both        # pixels pulled to their prototype: both | support | query [infer]
    separation_weight: 0.0    # weight of max(0, cos(p_fg, p_bg)) [infer; 0 = off]
    consistency_weight: 1.0   # lambda_2 [infer; METHODS.md: sweep 0.1, 1]
    consistency: features     # features (squared feature distance) | kl (per-pixel prediction KL) [infer]
    noise_std: 0.1            # sigma of the Gaussian input noise (PNODE config's gaussian_std: 0.1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.episodes import Task
from advframe.losses import kl_to_clean
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
    return {"scale": 20.0, **ODE_DEFAULTS, "cluster_weight": 1.0, "cluster_sets": "both", "separation_weight": 0.0,
            "consistency_weight": 1.0, "consistency": "features", "noise_std": 0.1}


@hookimpl
def run_defaults():
    return segmentation_run_defaults()


def check_settings(settings: dict) -> None:
    for key in ("cluster_weight", "separation_weight", "consistency_weight", "noise_std"):
        if settings[key] < 0:
            raise PluginError(f"r-pnode: plugins.r-pnode.{key} must be >= 0, got {settings[key]}")
    if settings["cluster_sets"] not in ("both", "support", "query"):
        raise PluginError(f"r-pnode: plugins.r-pnode.cluster_sets must be both, support or query, "
                          f"got {settings['cluster_sets']!r}")
    if settings["consistency"] not in ("features", "kl"):
        raise PluginError(f"r-pnode: plugins.r-pnode.consistency must be features or kl, "
                          f"got {settings['consistency']!r}")
    if not settings["scale"] > 0:
        raise PluginError(f"r-pnode: plugins.r-pnode.scale must be > 0, got {settings['scale']}")


@hookimpl
def setup(model, ctx):
    check_settings(ctx.settings)
    return ode_encoder(model, ctx)


# -- the regularisers ---------------------------------------------------------------------------------

def cluster_loss(features: torch.Tensor, masks: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """sum_c mean_{u in Omega_c} (1 - cos(F(u), p_c)) over background (c = 0) and foreground (c = 1):
    ``features`` of the pooled images, ``masks`` their binary masks, ``centres`` the ``2 x C`` prototypes."""
    similarity = prototype_logits(features, centres, masks.shape[-2:], scale=1.0)  # N x 2 x H x W cosines
    total = similarity.new_zeros(())
    for c in (0, 1):
        region = masks == c
        if region.any():
            total = total + (1 - similarity[:, c][region]).mean()
    return total


def separation_loss(centres: torch.Tensor) -> torch.Tensor:
    """max(0, cos(p_fg, p_bg)): pushes the two prototypes apart."""
    return F.cosine_similarity(centres[0], centres[1], dim=0).clamp_min(0)


def consistency_loss(features: torch.Tensor, noisy: torch.Tensor, logits=None, noisy_logits=None,
                     kind: str = "features") -> torch.Tensor:
    """Representation change under input noise: mean per-pixel squared feature distance, or the
    per-pixel KL(p(x) || p(x + n)) of the query predictions."""
    if kind == "kl":
        return kl_to_clean(noisy_logits, logits).mean()
    return (features - noisy).pow(2).sum(1).mean()


def episode_losses(model: nn.Module, task: Task, settings: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """L_seg, L_clu, L_sep and L_con of one episode (unweighted)."""
    support, masks = task.support
    inputs = torch.cat([support, task.query_inputs])
    features = model(inputs)
    shots, size, scale = len(support), support.shape[-2:], settings["scale"]
    centres = support_prototypes(features[:shots], masks)
    logits = prototype_logits(features[shots:], centres, size, scale)
    losses = {"seg_loss": F.cross_entropy(logits, task.query_labels)}
    if settings["cluster_weight"] > 0:
        sets = {"both": slice(None), "support": slice(0, shots), "query": slice(shots, None)}
        pooled = sets[settings["cluster_sets"]]
        labels = torch.cat([masks, task.query_labels])
        losses["cluster_loss"] = cluster_loss(features[pooled], labels[pooled], centres)
    if settings["separation_weight"] > 0:
        losses["separation_loss"] = separation_loss(centres)
    if settings["consistency_weight"] > 0:
        noise = torch.randn(inputs.shape, generator=generator).to(inputs) * settings["noise_std"]
        noisy = model((inputs + noise).clamp(0, 1))
        noisy_logits = prototype_logits(noisy[shots:], centres, size, scale)
        losses["consistency_loss"] = consistency_loss(features, noisy, logits, noisy_logits, settings["consistency"])
    return losses


WEIGHTS = {"seg_loss": None, "cluster_loss": "cluster_weight", "separation_loss": "separation_weight",
           "consistency_loss": "consistency_weight"}


@hookimpl
def training_step(model, batch, ctx):
    settings = ctx.settings
    ode = unwrap(model).ode
    ode.func.nfe = 0
    tasks = segmentation_episodes(batch, "r-pnode")
    total, logs = 0.0, {}
    for task in tasks:
        for name, value in episode_losses(model, task, settings, ctx.generator).items():
            weight = 1.0 if WEIGHTS[name] is None else settings[WEIGHTS[name]]
            total = total + weight * value / len(tasks)
            logs[name] = logs.get(name, 0.0) + value.item() / len(tasks)
    return {"loss": total, **logs, "nfe": ode.func.nfe / len(tasks)}


@hookimpl
def adapt_task(model, support, ctx):
    return PrototypeSegmenter.from_support(model, support, ctx.settings["scale"], "r-pnode")
