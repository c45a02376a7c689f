"""``adv4adv``: Adv-4-Adv (Zheng, Chen, Ding, Cai and Luo, "Adv-4-Adv: Thwarting Changing Adversarial
Perturbations via Adversarial Domain Adaptation", Neurocomputing, arXiv:2112.00428; code:
tianyuez/Neurocomputing_submission).

Failing to generalise from the training attack to unseen attacks is treated as domain shift: clean
inputs are the source domain and FGSM inputs (no random start, one step of eps) the target domain.
Per class k, a discriminator D_k tries to tell the two domains apart from the model's logits (and
optionally D'_k from its features); a gradient-reversal layer in front of each discriminator makes the
model remove what tells them apart, the attack-specific features. One minimisation, one step of the
model's and the discriminators' optimizers::

    L = CE(f([x; x_a]), [y; y]) + gamma * sum_k BCE(D_k(R(z)), d | y = k)
                                + feature_weight * sum_k BCE(D'_k(R(h)), d | y = k)

with x_a = FGSM(x), d = 1 for clean and 0 for adversarial, z the logits, h the features, and R the
identity forward and -lambda times the gradient backward. Each class term is the mean BCE over that
class's examples in the batch (the official code's sum over classes of per-class means). Two defects
of the official code are not reproduced: its discriminator k judges class k + 1 (class 0 never gets
one), and an empty class gives a NaN BCE; here D_k judges class k and an absent class adds nothing.
``ce_on: adversarial`` gives the paper's Adv-4-Adv* (cross-entropy on the adversarial half only).
With ``gamma: 0`` the method is the official code's FGSM-AT baseline (cross-entropy on the clean and
FGSM halves); the logit discriminators then still learn, on detached logits, as a monitor of how
separable the domains are, and the model never sees their gradient.

The discriminators are added in ``setup`` (``logit_discriminators``, ``feature_discriminators`` when
``feature_weight > 0``): trained with their own optimizer (Adam in the official code, the run's
``train`` settings here), saved in the run's safetensors files and restored on ``--resume``. The
features are the output of the model's ``features`` module (small-cnn, mlp: the official
"feature extractor") or else the input of its last linear layer. The official model starts from a
naturally trained "source" model: ``source_epochs`` trains the first epochs on clean inputs only.

Logged per epoch (metrics.jsonl): ``discriminator_accuracy`` (domain accuracy of the logit
discriminators on the training batches; 0.5 is chance), ``domain_loss``, ``clean_accuracy``,
``adversarial_accuracy``, ``grl_scale``. ``evaluate`` adds ``domain_probe_accuracy``: fresh
class-conditional discriminators trained post hoc on the frozen model's logits of clean and FGSM
inputs (first half of the evaluation set) and tested on the second half, so any model (also one
trained by another method, with ``eval.evaluators: [adv4adv]``) can be compared; and, in an adv4adv
run, ``discriminator_accuracy`` of the trained discriminators on the same held-out half.

Settings (``plugins.adv4adv``)::

    gamma: 0.2                 # weight of the logit-discriminator loss (official config)
    feature_weight: 0.0        # weight of the feature-discriminator loss (official config: 0, off)
    grl_lambda: 1.0            # gradient reversal factor lambda (official: constant 1)
    grl_schedule: constant     # constant | dann (lambda * (2 / (1 + exp(-10 p)) - 1), p = epoch progress)
    target_attack: fgsm        # fgsm (no random start, step eps) | train (the run's attack section)
    fgsm_step: null            # FGSM step size; null = eps
    ce_on: both                # both (Adv-4-Adv) | adversarial (Adv-4-Adv*)
    class_reduction: sum       # sum (official) | mean of the per-class domain losses
    logit_hidden: [50, 20]     # hidden widths of each logit discriminator (official)
    feature_hidden: [100, 20]  # hidden widths of each feature discriminator (official)
    discriminator_lr: null     # null = train.lr
    source_epochs: 0           # first epochs trained on clean inputs only (the official source model)
    probe_steps: 300           # full-batch Adam steps of the post-hoc domain probe (0 = no probe)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import pgd
from advframe.models import eval_mode, reverse_gradient, unwrap

LOGITS, FEATURES = "logit_discriminators", "feature_discriminators"


@hookimpl
def default_config():
    return {"gamma": 0.2, "feature_weight": 0.0, "grl_lambda": 1.0, "grl_schedule": "constant",
            "target_attack": "fgsm", "fgsm_step": None, "ce_on": "both", "class_reduction": "sum",
            "logit_hidden": [50, 20], "feature_hidden": [100, 20], "discriminator_lr": None,
            "source_epochs": 0, "probe_steps": 300}


CHOICES = {"grl_schedule": ("constant", "dann"), "target_attack": ("fgsm", "train"), "ce_on": ("both", "adversarial"),
           "class_reduction": ("sum", "mean")}


def checked(settings: dict, epochs: int) -> dict:
    """The settings, or a PluginError saying which value to change."""
    for key in ("gamma", "feature_weight", "grl_lambda"):
        if settings[key] < 0:
            raise PluginError(f"adv4adv: {key} must be >= 0, got {settings[key]}")
    for key, allowed in CHOICES.items():
        if settings[key] not in allowed:
            raise PluginError(f"adv4adv: {key} must be one of {', '.join(allowed)}, got {settings[key]!r}")
    for key in ("logit_hidden", "feature_hidden"):
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in settings[key]):
            raise PluginError(f"adv4adv: {key} must be a list of positive integers, got {settings[key]}")
    if settings["fgsm_step"] is not None and (isinstance(settings["fgsm_step"], bool)
                                              or not isinstance(settings["fgsm_step"], (int, float))
                                              or settings["fgsm_step"] <= 0):
        raise PluginError(f"adv4adv: fgsm_step must be a number > 0 or null, got {settings['fgsm_step']!r}")
    if settings["discriminator_lr"] is not None and (isinstance(settings["discriminator_lr"], bool)
                                                     or not isinstance(settings["discriminator_lr"], (int, float))
                                                     or settings["discriminator_lr"] <= 0):
        raise PluginError(f"adv4adv: discriminator_lr must be a number > 0 or null, got {settings['discriminator_lr']!r}")
    if not 0 <= settings["source_epochs"] < epochs:
        raise PluginError(f"adv4adv: source_epochs must be in [0, train.epochs) = [0, {epochs}), "
                          f"got {settings['source_epochs']}")
    if settings["probe_steps"] < 0:
        raise PluginError(f"adv4adv: probe_steps must be >= 0, got {settings['probe_steps']}")
    return settings


# -- the class-conditional discriminators (behind the core's reverse_gradient) ---------------------

class ClassDiscriminators(nn.Module):
    """One small MLP per class; example n is judged by the head of its class ``labels[n]``.

    Returns one domain logit per example (> 0: "clean")."""

    def __init__(self, num_classes: int, in_features: int, hidden: list[int]):
        super().__init__()

        def head():
            layers, width = [], in_features
            for size in hidden:
                layers += [nn.Linear(width, size), nn.ReLU()]
                width = size
            return nn.Sequential(*layers, nn.Linear(width, 1))

        self.heads = nn.ModuleList(head() for _ in range(num_classes))

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = inputs.new_zeros(len(inputs))
        for k in labels.unique().tolist():
            members = labels == k
            out = out.index_put((members,), self.heads[k](inputs[members]).squeeze(1))
        return out


def domain_loss(domain_logits: torch.Tensor, domains: torch.Tensor, labels: torch.Tensor, num_classes: int,
                reduction: str = "sum") -> torch.Tensor:
    """Per class, the mean BCE of that class's examples; summed (or averaged) over the classes present.

    A class absent from the batch adds nothing (the official code gets NaN there)."""
    per_example = F.binary_cross_entropy_with_logits(domain_logits, domains, reduction="none")
    totals = per_example.new_zeros(num_classes).index_add(0, labels, per_example)
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    per_class = totals[present] / counts[present].to(per_example.dtype)
    return per_class.sum() if reduction == "sum" else per_class.mean()


def domain_accuracy(domain_logits: torch.Tensor, domains: torch.Tensor) -> float:
    return ((domain_logits > 0).to(domains.dtype) == domains).float().mean().item()


# -- setup: the discriminators as trained, checkpointed modules -------------------------------------

def feature_layer(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose output (True) or input (False) are the features."""
    model = unwrap(model)
    if isinstance(getattr(model, "features", None), nn.Module):
        return model.features, True
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise PluginError("adv4adv: feature_weight > 0 needs a model with a `features` module or a last nn.Linear "
                          "layer; set plugins.adv4adv.feature_weight=0")
    return linear[-1], False


class FeatureCapture:
    """Collects the features of every forward pass of ``model`` inside the block."""

    def __init__(self, model):
        self.layer, self.output = feature_layer(model)
        self.value = None

    def _hook(self, module, args, output):
        self.value = (output if self.output else args[0]).flatten(1)

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def is_training_method(ctx) -> bool:
    return ctx.config["train"]["method"] == ctx.current_plugin


@hookimpl
def setup(model, ctx):
    settings = checked(ctx.settings, ctx.config["train"]["epochs"])
    if not is_training_method(ctx):  # as an evaluator of another method's run: the probe only
        return
    lr = settings["discriminator_lr"]
    with eval_mode(model), torch.no_grad():
        logits = model(torch.zeros(1, *ctx.input_shape, device=ctx.device))
    if logits.dim() != 2:
        raise PluginError(f"adv4adv needs a classifier returning (batch, classes) logits; this model returns "
                          f"{tuple(logits.shape)}")
    ctx.add_model(LOGITS, ClassDiscriminators(ctx.num_classes, logits.shape[1], settings["logit_hidden"]), lr=lr)
    if settings["feature_weight"] > 0:
        with eval_mode(model), torch.no_grad(), FeatureCapture(model) as captured:
            model(torch.zeros(1, *ctx.input_shape, device=ctx.device))
        ctx.add_model(FEATURES, ClassDiscriminators(ctx.num_classes, captured.value.shape[1],
                                                    settings["feature_hidden"]), lr=lr)


# -- training ------------------------------------------------------------------------------------------

def target_domain(model, inputs, labels, settings, ctx) -> torch.Tensor:
    """The adversarial domain: FGSM (zero start, one step of ``fgsm_step`` or eps) or the run's attack."""
    if settings["target_attack"] == "train":
        return ctx.perturb(model, inputs, labels)
    attack = ctx.attack_params
    step = attack["eps"] if settings["fgsm_step"] is None else float(settings["fgsm_step"])
    return pgd(model, inputs, labels, eps=attack["eps"], alpha=step, steps=1, norm=attack["norm"],
               random_start="zero", generator=ctx.generator)


def reversal_scale(settings, ctx) -> float:
    if settings["grl_schedule"] == "constant":
        return settings["grl_lambda"]
    start = settings["source_epochs"]
    progress = (ctx.epoch - start) / max(ctx.data_passes - start, 1)
    return settings["grl_lambda"] * (2 / (1 + math.exp(-10 * progress)) - 1)


def discriminator_term(discriminators, representation, domains, labels, weight, scale, settings, ctx):
    """The weighted domain loss. With weight 0 the discriminators still learn, on detached inputs."""
    if weight > 0:
        domain_logits = discriminators(reverse_gradient(representation, scale), labels)
    else:
        domain_logits = discriminators(representation.detach(), labels)
        weight = 1.0  # a monitor: its gradient cannot reach the model
    loss = domain_loss(domain_logits, domains, labels, ctx.num_classes, settings["class_reduction"])
    return weight * loss, loss.item(), domain_logits


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    settings = checked(ctx.settings, ctx.config["train"]["epochs"])
    if ctx.epoch < settings["source_epochs"]:  # the naturally trained source model comes first
        logits = model(inputs)
        return {"loss": F.cross_entropy(logits, labels), "clean_accuracy": (logits.argmax(1) == labels).float().mean().item()}
    adversarial = target_domain(model, inputs, labels, settings, ctx)
    both = torch.cat([inputs, adversarial])
    both_labels = torch.cat([labels, labels])
    domains = torch.cat([torch.ones(len(inputs)), torch.zeros(len(inputs))]).to(inputs)
    features = FeatureCapture(model) if settings["feature_weight"] > 0 else None
    if features is not None:
        with features:
            logits = model(both)
    else:
        logits = model(both)
    half = len(inputs)
    if settings["ce_on"] == "both":
        classification = F.cross_entropy(logits, both_labels)
    else:
        classification = F.cross_entropy(logits[half:], labels)
    scale = reversal_scale(settings, ctx)
    term, logit_loss, domain_logits = discriminator_term(ctx.models[LOGITS], logits, domains, both_labels,
                                                         settings["gamma"], scale, settings, ctx)
    loss = classification + term
    logs = {"classification_loss": classification.item(), "domain_loss": logit_loss,
            "discriminator_accuracy": domain_accuracy(domain_logits.detach(), domains),
            "clean_accuracy": (logits[:half].argmax(1) == labels).float().mean().item(),
            "adversarial_accuracy": (logits[half:].argmax(1) == labels).float().mean().item(),
            "grl_scale": scale}
    if features is not None:
        feature_term, feature_loss, feature_logits = discriminator_term(
            ctx.models[FEATURES], features.value, domains, both_labels, settings["feature_weight"], scale, settings, ctx)
        loss = loss + feature_term
        logs.update(feature_domain_loss=feature_loss,
                    feature_discriminator_accuracy=domain_accuracy(feature_logits.detach(), domains))
    return {"loss": loss, **logs}


# -- evaluation: how separable are the two domains at the end? ----------------------------------------

def domain_logits_of(model, dataset, settings, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's logits on clean and FGSM inputs of ``dataset``, in order: (clean, adversarial)."""
    clean, adversarial = [], []
    with eval_mode(model):
        for inputs, labels in dataset.batches(ctx.config["eval"]["batch_size"], ctx.device):
            attacked = target_domain(model, inputs, labels, {**settings, "target_attack": "fgsm"}, ctx)
            with torch.no_grad():
                clean.append(model(inputs))
                adversarial.append(model(attacked))
    return torch.cat(clean), torch.cat(adversarial)


def probe_accuracy(clean, adversarial, labels, train, test, settings, ctx) -> float:
    """Train fresh class-conditional logit discriminators on ``train`` indices, test on ``test``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.config["seed"])
        probe = ClassDiscriminators(ctx.num_classes, clean.shape[1], settings["logit_hidden"]).to(clean.device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    inputs = torch.cat([clean[train], adversarial[train]])
    targets = torch.cat([torch.ones(len(train)), torch.zeros(len(train))]).to(clean)
    probe_labels = torch.cat([labels[train], labels[train]])
    with torch.enable_grad():
        for _ in range(settings["probe_steps"]):
            loss = domain_loss(probe(inputs, probe_labels), targets, probe_labels, ctx.num_classes, "mean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return held_out_accuracy(probe, clean, adversarial, labels, test)


def held_out_accuracy(discriminators, clean, adversarial, labels, test) -> float:
    with torch.no_grad():
        inputs = torch.cat([clean[test], adversarial[test]])
        targets = torch.cat([torch.ones(len(test)), torch.zeros(len(test))]).to(clean)
        return domain_accuracy(discriminators(inputs, torch.cat([labels[test], labels[test]])), targets)


@hookimpl
def evaluate(model, dataset, ctx):
    settings = checked(ctx.settings, ctx.config["train"]["epochs"])
    metrics = {}
    if settings["probe_steps"] == 0 and LOGITS not in ctx.models:
        return metrics
    clean, adversarial = domain_logits_of(model, dataset, settings, ctx)
    labels = dataset.labels.to(clean.device)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(ctx.config["seed"]))
    train, test = order[: len(order) // 2].to(clean.device), order[len(order) // 2:].to(clean.device)
    if settings["probe_steps"] > 0:
        metrics["domain_probe_accuracy"] = probe_accuracy(clean, adversarial, labels, train, test, settings, ctx)
    if LOGITS in ctx.models:
        discriminators = unwrap(ctx.models[LOGITS])
        with eval_mode(discriminators):
            metrics["discriminator_accuracy"] = held_out_accuracy(discriminators, clean, adversarial, labels, test)
    return metrics
