"""``advprop``: adversarial examples as extra training data through auxiliary BatchNorm (C. Xie, M. Tan,
B. Gong, J. Wang, A. Yuille, Q. V. Le, "Adversarial Examples Improve Image Recognition", CVPR 2020,
arXiv:1911.09665; official release: EfficientNet AdvProp checkpoints in tensorflow/tpu, without
training code; author-guided PyTorch re-implementation: tingxueronghua/pytorch-classification-advprop,
``net.py``, ``attacker.py``, ``imagenet.py``).

Adversarial examples come from another distribution than clean images; pushed through the same
BatchNorm statistics they hurt clean accuracy. AdvProp gives every BatchNorm layer a twin that only
adversarial inputs use (all convolution and linear weights stay shared) and trains on both::

    x_adv = PGD on the auxiliary-BN network (eval mode)
    loss  = 1/2 [ CE(f_main(x), y) + CE(f_aux(x_adv), y) ]        (combine: mean, the re-implementation)
          or      CE(f_main(x), y) + CE(f_aux(x_adv), y)          (combine: sum, the paper's equation)

Evaluation, ``advframe eval`` and any attack on the trained model use the main BatchNorms only: the
auxiliary ones are a training device. ``setup`` gives any model with BatchNorm layers its twins
(``advframe.models.with_auxiliary_bn``); they are saved with the weights and rebuilt by ``setup``
before a saved model is loaded.

The attack is the core PGD run through the auxiliary BatchNorms in eval mode, so neither set of
running statistics sees the attack's iterates. It is untargeted by default; ``random_target: true``
descends the cross-entropy to a random wrong class, as the re-implementation (which draws the target
offset from 0..K-1 and so keeps the true class 1/K of the time; here it is always a wrong class).
Each batch starts from uniform noise in the ball with probability ``noise_start`` and from the clean
image otherwise (the re-implementation means 0.8; its ``randn() > 0.2`` draw gives about 0.42).
A batch costs ``steps + 2`` gradient evaluations per example (3 with PGD-1), against 1 for ``erm``.

``auxiliary_bn: false`` is the ablation the paper compares with: the same attack and loss, but clean
and adversarial examples share the BatchNorms (one forward pass over the concatenated batch, so the
batch statistics mix both distributions).

The attack's eps is the plugin's own: AdvProp uses a small perturbation as data augmentation (the
paper: 1 to 4 / 255 on ImageNet), not the ``attack`` section's threat model, which the evaluation
attacks keep.

Settings (``plugins.advprop``)::

    eps: 0.05             # attack radius in [0, 1] pixel units (METHODS.md's small-scale check uses 0.05)
    steps: 1              # PGD iterations (the re-implementation's run: PGD-1)
    alpha: null           # step size; null = eps / steps
    norm: linf            # attack norm (the paper: linf)
    random_target: false  # true: descend CE to a random wrong class (the re-implementation)
    noise_start: 0.8      # probability that a batch's attack starts from uniform noise, else from x
    combine: mean         # mean: (L_clean + L_adv) / 2 (re-implementation) | sum: L_clean + L_adv (paper)
    auxiliary_bn: true    # false: the shared-BatchNorm ablation

``evaluate`` adds what shows the auxiliary BatchNorms at work: the auxiliary branch's clean and
robust accuracy under the first evaluation attack (``aux_clean_accuracy``, ``aux_robust_accuracy``;
compare with the main branch's ``clean_accuracy`` and ``robust_accuracy``) and the mean absolute
difference between the two sets' running statistics (``bn_running_mean_gap``, ``bn_running_var_gap``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import pgd
from advframe.errors import ConfigError
from advframe.models import DualBatchNorm, batchnorm_route, with_auxiliary_bn

COMBINE = ("mean", "sum")


@hookimpl
def default_config():
    return {"eps": 0.05, "steps": 1, "alpha": None, "norm": "linf", "random_target": False, "noise_start": 0.8,
            "combine": "mean", "auxiliary_bn": True}


def check_settings(settings: dict) -> dict:
    """The settings, with ``alpha`` resolved; a one-line PluginError for values that cannot work."""
    if settings["steps"] < 1:
        raise PluginError(f"advprop: steps must be >= 1 (PGD iterations), got {settings['steps']}")
    if not 0.0 <= settings["noise_start"] <= 1.0:
        raise PluginError(f"advprop: noise_start is a probability in [0, 1], got {settings['noise_start']}")
    if settings["combine"] not in COMBINE:
        raise PluginError(f"advprop: combine must be one of {', '.join(COMBINE)}, got {settings['combine']!r}")
    alpha = settings["alpha"]
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise PluginError(f"advprop: alpha must be a positive number or null (= eps / steps), got {alpha!r}")
    return {**settings, "alpha": settings["eps"] / settings["steps"] if alpha is None else float(alpha)}


@hookimpl
def setup(model, ctx):
    check_settings(ctx.settings)
    if not ctx.settings["auxiliary_bn"]:
        return None
    try:
        return with_auxiliary_bn(model)
    except ConfigError:
        raise PluginError("advprop needs a model with BatchNorm layers to give them auxiliary twins; choose one "
                          "(e.g. --set model.args.batch_norm=true for small-cnn) or set "
                          "plugins.advprop.auxiliary_bn=false") from None


def has_auxiliary_bn(model: nn.Module) -> bool:
    return any(isinstance(m, DualBatchNorm) for m in model.modules())


def adversarial_examples(model, inputs, labels, settings: dict, num_classes: int, generator=None):
    """AdvProp's attack: PGD through the auxiliary BatchNorms (the main ones when there are none)."""
    targets, targeted = labels, settings["random_target"]
    if targeted:  # a random wrong class per example
        offset = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
        targets = (labels + offset) % num_classes
    from_noise = bool(torch.rand((), generator=generator) < settings["noise_start"])
    with batchnorm_route(model, "aux"):
        return pgd(model, inputs, targets, eps=settings["eps"], alpha=settings["alpha"], steps=settings["steps"],
                   norm=settings["norm"], random_start="uniform" if from_noise else "zero", loss="ce",
                   targeted=targeted, generator=generator)


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    settings = check_settings(ctx.settings)
    adversarial = adversarial_examples(model, inputs, labels, settings, ctx.num_classes, ctx.generator)
    if has_auxiliary_bn(model):
        with batchnorm_route(model, "main"):
            clean_logits = model(inputs)
        with batchnorm_route(model, "aux"):
            adversarial_logits = model(adversarial)
    else:  # the shared-BatchNorm ablation: one batch, mixed statistics
        clean_logits, adversarial_logits = model(torch.cat([inputs, adversarial])).chunk(2)
    clean_loss = F.cross_entropy(clean_logits, labels)
    adversarial_loss = F.cross_entropy(adversarial_logits, labels)
    loss = clean_loss + adversarial_loss
    return {
        "loss": loss / 2 if settings["combine"] == "mean" else loss,
        "clean_loss": clean_loss.item(),
        "adversarial_loss": adversarial_loss.item(),
        "train_clean_accuracy": clean_logits.argmax(1).eq(labels).float().mean().item(),
        "train_adversarial_accuracy": adversarial_logits.argmax(1).eq(labels).float().mean().item(),
    }


class AuxiliaryBranch(nn.Module):
    """``model`` seen through its auxiliary BatchNorms (a separate module, so evaluation caches it apart)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        with batchnorm_route(self.model, "aux"):
            return self.model(inputs)


def running_statistic_gaps(model: nn.Module) -> dict[str, float]:
    """Mean absolute difference between the main and auxiliary running means and variances."""
    layers = [m for m in model.modules() if isinstance(m, DualBatchNorm) and m.main.track_running_stats]
    gaps = {}
    for name in ("running_mean", "running_var"):
        differences = [(getattr(m.main, name) - getattr(m.aux, name)).abs().mean() for m in layers]
        gaps[f"bn_{name}_gap"] = float(torch.stack(differences).mean()) if differences else float("nan")
    return gaps


@hookimpl
def evaluate(model, dataset, ctx):
    if not has_auxiliary_bn(model):
        return {}
    branch = AuxiliaryBranch(model)
    clean = ctx.predictions(branch, dataset)
    metrics = {"aux_clean_accuracy": clean.correct.float().mean().item()}
    attacks = ctx.config["eval"]["attacks"]
    if attacks:
        robust = ctx.predictions(branch, dataset, attacks[0]).correct & clean.correct
        metrics["aux_robust_accuracy"] = robust.float().mean().item()
    return {**metrics, **running_statistic_gaps(model)}
