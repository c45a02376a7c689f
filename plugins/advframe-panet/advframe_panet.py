"""``panet``: prototype few-shot segmentation (Wang, Liew, Zou, Zhou, Feng, "PANet: Few-Shot Image
Semantic Segmentation with Prototype Alignment", ICCV 2019, arXiv:1908.06391; code:
kaixin96/PANet), the CNN baseline of PNODE / R-PNODE (its medical version is the ``PANet`` folder of
prinshul/Prototype_NeuralODE_Adv_Attack).

A 1-way K-shot episode gives support slices with binary masks and query slices. Support and query go
through the encoder in one pass (``model``: feature maps, by default the core's ``seg-encoder``).
Each support shot gives a foreground and a background prototype by masked average pooling
(``advframe.segmentation.masked_average_pooling``, features upsampled to the mask); the shots'
prototypes are averaged, as the official code. Each query pixel is labelled by the scaled cosine
similarity to the two prototypes (``advframe.segmentation.prototype_logits``)::

    p_bg, p_fg = mean_k MAP(F(s_k), 1 - M_k), mean_k MAP(F(s_k), M_k)
    logits_c(u) = scale * cos(F(q)(u), p_c)          L_seg = CE(logits, M_q) (per pixel)

Prototype alignment regularisation (PAR, ``align_weight``): the query's predicted mask (argmax,
no gradient) gives query prototypes, which must segment the support back::

    L = L_seg + align_weight * CE(scale * cos(F(s), MAP(F(q), pred_q)), M_s)

``adapt_task`` has no gradient steps: it computes the prototypes from the support alone (eval mode,
detached) and returns a module mapping query images to per-pixel logits ``(B, 2, H, W)``
(background, foreground), through which attacks on the query differentiate.

Defaults of a run (``run_defaults``): ``data.name: mnist-segmentation`` (two digits on a 56 x 56
canvas, train digits 0-4, test digits 5-9), ``model.name: seg-encoder``, episodic 1-way 1-shot
training with one query per episode and 5 episodes per step (the official batch of 5), 300 episodes
an epoch for 5 epochs (1,500 episodes: METHODS.md's small CPU check), 300 fixed test tasks, FGSM and
PGD-10 on the query at eps 0.1 (``stop_on_success: false``, one restart: success is per pixel).

Settings (``plugins.panet``)::

    scale: 20.0          # cosine-similarity scale of the logits (official: 20)
    align_weight: 1.0    # weight of PAR (the PANet paper: 1; 0 = no alignment, the plain prototype CNN)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.episodes import Task
from advframe.segmentation import (
    PrototypeSegmenter,
    check_feature_maps,
    prototype_logits,
    segmentation_episodes,
    segmentation_run_defaults,
    support_prototypes,
)


@hookimpl
def default_config():
    return {"scale": 20.0, "align_weight": 1.0}


@hookimpl
def run_defaults():
    return segmentation_run_defaults()


def check_settings(settings: dict) -> None:
    if not settings["scale"] > 0:
        raise PluginError(f"panet: plugins.panet.scale must be > 0, got {settings['scale']}")
    if settings["align_weight"] < 0:
        raise PluginError(f"panet: plugins.panet.align_weight must be >= 0, got {settings['align_weight']}")


@hookimpl
def setup(model, ctx):
    check_settings(ctx.settings)
    check_feature_maps(model, ctx)


# -- the method ----------------------------------------------------------------------------------

def episode_loss(model: nn.Module, task: Task, settings: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """L_seg (+ PAR) of one episode; support and query encoded in one pass."""
    support, masks = task.support
    features = model(torch.cat([support, task.query_inputs]))
    support_features, query_features = features[: len(support)], features[len(support):]
    size, scale = support.shape[-2:], settings["scale"]
    logits = prototype_logits(query_features, support_prototypes(support_features, masks), size, scale)
    seg = F.cross_entropy(logits, task.query_labels)
    loss, logs = seg, {"seg_loss": seg.item()}
    if settings["align_weight"] > 0:
        predicted = logits.detach().argmax(1)
        aligned = prototype_logits(support_features, support_prototypes(query_features, predicted), size, scale)
        align = F.cross_entropy(aligned, masks)
        loss = loss + settings["align_weight"] * align
        logs["align_loss"] = align.item()
    return loss, logs


@hookimpl
def training_step(model, batch, ctx):
    losses, logs = [], {}
    for task in segmentation_episodes(batch, "panet"):
        loss, parts = episode_loss(model, task, ctx.settings)
        losses.append(loss)
        for key, value in parts.items():
            logs[key] = logs.get(key, 0.0) + value / len(batch)
    return {"loss": torch.stack(losses).mean(), **logs}


@hookimpl
def adapt_task(model, support, ctx):
    return PrototypeSegmenter.from_support(model, support, ctx.settings["scale"], "panet")
