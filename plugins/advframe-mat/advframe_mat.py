"""``mat``: Mutual Adversarial Training (Liu, Lau, Souri, Feizi and Chellappa, "Mutual Adversarial
Training: Learning together is better than going alone", IEEE Transactions on Information Forensics
and Security 2022, arXiv:2112.05005; no official code was released).

N models are adversarially trained together. Each model is attacked with its own PGD, and each model
also learns the peers' (detached, temperature-softened) predictions on its own adversarial examples
and on the peers' adversarial examples, so every model sees N sets of adversarial examples and is
pulled towards the peers' decisions. For model i, with x'_j the adversarial examples of model j::

    L_i = (1 - alpha) * L_AT(f_i; x'_i, y)
          + alpha / (N - 1) * sum_{j != i} T^2 [ KL(sg p_j^T(x'_i) || p_i^T(x'_i))
                                               + KL(sg p_j^T(x'_j) || p_i^T(x'_j)) ]   (include_peer_adv)

where p^T = softmax(z / T), sg = stop-gradient, and L_AT is PGD-AT's cross-entropy or TRADES. All
x'_i are generated (models in eval mode) before any update. The teachers' soft labels p_j come from
eval-mode passes without a graph, taken before any train-mode pass of the step: a teacher's BatchNorm
uses its running statistics and leaves them untouched, and no gradient reaches it. Then one step of
every optimizer. What is pinned and what is a guess (README.md, "The objective"): the paper's text
pins the ingredients (models trained together, distillation between them, each learning on the
others' adversarial examples, specialists and a generalist); its equations could not be read and no
code is public, so the form of L_i, alpha, T and the weighting of the two KL terms are a
reconstruction, and settings. With ``alpha: 0`` no peer term is computed and MAT is exactly N
independent PGD-AT runs. The default alpha = 0.2 trains at the core defaults (3 seeds, clean
accuracy; README.md); alpha = 0.5, the old default, held the models back and collapsed one seed.

Multi-perturbation MAT: ``norms: [linf, l2, l1]`` with ``norm_eps: [0.2, 2.0, 12.0]`` makes model i a
specialist attacked under ``norms[i]`` (steps from the ``attack`` section; step size 2.5 eps / steps
where the norm differs from the run's); the specialists teach each other. With ``generalist: true``
(the journal version's "generalist that learns from the specialists", also a reconstruction) model 0
is a generalist trained against every norm (its base loss is the mean over the norms: with alpha = 0,
the AVG multi-perturbation adversarial training of Tramer & Boneh), taught by specialist k on the
norm-k examples (its own and the specialist's); the specialists, models 1..N, teach each other and
do not learn from the generalist.

The main model is model 0; the peers are added in ``setup`` as ``peer1`` .. ``peer{N-1}`` (each with
its own optimizer, saved in ``model.safetensors`` under ``peerK/`` and in ``state.safetensors``,
restored on ``--resume``). ``evaluate`` reports every model and the ensemble (mean of the softmax
outputs, attacked end to end) under the evaluation attacks, with the core's rows: ``model{i}/clean_accuracy``,
``model{i}/robust_accuracy`` (the per-example worst case over ``eval.attacks``: with specialists'
threat models listed, the union threat model), one row per attack (``.../robust_accuracy/<label>``
with ``eval.cascade: false``, the label naming the norm and eps), ``ensemble/...``,
``mean_model/...``; and with ``agreement: true`` ``peer_agreement``
(how often f_j predicts what f_i predicts on f_i's adversarial examples) and ``transfer_robust_accuracy``
(accuracy of f_j on f_i's adversarial examples), averaged over ordered pairs.

Settings (``plugins.mat``)::

    models: 2                # N, the number of models trained together (>= 2)
    alpha: 0.2               # weight of the mutual distillation term (0 = independent PGD-AT)
    temperature: 1.0         # T of the softened peer predictions (loss scaled by T^2)
    include_peer_adv: true   # also distil on the peers' adversarial examples (the second KL)
    base_loss: ce            # ce (PGD-AT, the run's attack) | trades (KL-PGD attack and TRADES loss)
    trades_beta: 6.0         # beta of the TRADES base loss
    norms: []                # one norm per specialist (multi-perturbation MAT); [] = the run's attack
    norm_eps: []             # the radius of each model's norm (same length as norms)
    generalist: false        # model 0 trains against every norm and learns from the specialists
    agreement: true          # evaluate: peer agreement and transfer accuracy on peers' examples
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import pgd, step_size
from advframe.losses import kl_to_clean
from advframe.models import eval_mode, unwrap

NORMS = ("linf", "l2", "l1")


@hookimpl
def default_config():
    return {"models": 2, "alpha": 0.2, "temperature": 1.0, "include_peer_adv": True, "base_loss": "ce",
            "trades_beta": 6.0, "norms": [], "norm_eps": [], "generalist": False, "agreement": True}


def checked(settings: dict) -> dict:
    """The settings, or a PluginError saying which value to change."""
    if settings["models"] < 2:
        raise PluginError(f"mat: models must be >= 2 (got {settings['models']}); for one model use pgd-at")
    if not 0.0 <= settings["alpha"] <= 1.0:
        raise PluginError(f"mat: alpha must be in [0, 1], got {settings['alpha']}")
    if settings["temperature"] <= 0:
        raise PluginError(f"mat: temperature must be > 0, got {settings['temperature']}")
    if settings["base_loss"] not in ("ce", "trades"):
        raise PluginError(f"mat: base_loss must be ce or trades, got {settings['base_loss']!r}")
    if settings["trades_beta"] < 0:
        raise PluginError(f"mat: trades_beta must be >= 0, got {settings['trades_beta']}")
    norms, radii = settings["norms"], settings["norm_eps"]
    specialists = settings["models"] - 1 if settings["generalist"] else settings["models"]
    if settings["generalist"] and not norms:
        raise PluginError("mat: generalist: true needs norms and norm_eps (one entry per specialist)")
    if norms or radii:
        if len(norms) != specialists or len(radii) != specialists:
            what = "models - 1 (the specialists)" if settings["generalist"] else "models"
            raise PluginError(f"mat: norms and norm_eps need one entry per model, {what} = {specialists}; "
                              f"got {len(norms)} and {len(radii)}")
        if any(n not in NORMS for n in norms):
            raise PluginError(f"mat: norms entries must be linf, l2 or l1, got {norms}")
        if any(not isinstance(e, (int, float)) or isinstance(e, bool) or e <= 0 for e in radii):
            raise PluginError(f"mat: norm_eps entries must be numbers > 0, got {radii}")
    return settings


def peer_names(count: int) -> list[str]:
    return [f"peer{k}" for k in range(1, count)]


def is_training_method(ctx) -> bool:
    return ctx.config["train"]["method"] == ctx.current_plugin


@hookimpl
def setup(model, ctx):
    settings = checked(ctx.settings)
    if is_training_method(ctx):  # as an evaluator of another method's run, MAT adds nothing
        for name in peer_names(settings["models"]):
            ctx.add_model(name, ctx.build_model(), counted=True)  # a classifier trained like the model


def members(model, ctx) -> list[nn.Module]:
    """Model 0 (the run's model) and its peers, as the run holds them (maybe DDP-wrapped)."""
    return [model] + [ctx.models[name] for name in peer_names(ctx.settings["models"]) if name in ctx.models]


def threat_models(settings: dict, ctx, count: int) -> list[list[dict]]:
    """Per model, the training attacks it is trained against: the run's attack; a specialist's own
    norm and eps; the generalist (model 0) every specialist's."""
    base = dict(ctx.attack_params)
    if not settings["norms"]:
        return [[base] for _ in range(count)]
    threats = []
    for norm, eps in zip(settings["norms"], settings["norm_eps"]):
        params = {**base, "norm": norm, "eps": float(eps)}
        if norm != base["norm"] and "alpha" in params:
            params["alpha"] = None  # a step size set for the run's norm means nothing under another
        threats.append(params)
    specialists = [[threat] for threat in threats]
    return [threats, *specialists] if settings["generalist"] else specialists


def adversarial_examples(net, inputs, labels, params, settings, ctx) -> torch.Tensor:
    if settings["base_loss"] == "trades":  # TRADES' inner maximisation: KL to the clean prediction
        return pgd(net, inputs, labels, eps=params["eps"], alpha=step_size(params), steps=params["steps"],
                   norm=params["norm"], random_start="normal", loss="kl", generator=ctx.generator)
    return ctx.attack(net, inputs, labels, params)


def softened_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """T^2 KL(sg p_teacher^T || p_student^T), mean over the batch."""
    return temperature ** 2 * kl_to_clean(student_logits / temperature, teacher_logits.detach() / temperature).mean()


def teachers(student: int, count: int, settings: dict) -> list[tuple[int, list[tuple[int, int]]]]:
    """Who teaches model ``student``, and on which adversarial sets ``(owner, index)``.

    Plain MAT and specialists: every other model (the generalist excepted) on the student's own
    examples and, with include_peer_adv, on the teacher's. The generalist: specialist k on the
    generalist's examples of norm k and on the specialist's own examples."""
    peer_sets = settings["include_peer_adv"]
    if settings["generalist"] and student == 0:
        return [(k + 1, [(0, k)] + ([(k + 1, 0)] if peer_sets else [])) for k in range(count - 1)]
    first = 1 if settings["generalist"] else 0
    return [(j, [(student, 0)] + ([(j, 0)] if peer_sets else [])) for j in range(first, count) if j != student]


def teacher_predictions(net, inputs) -> torch.Tensor:
    """A teacher's logits as a soft label: eval mode, no graph; every module's mode restored after."""
    teacher = unwrap(net)
    with torch.no_grad(), eval_mode(teacher):
        return teacher(inputs)


def mutual_losses(nets, inputs, labels, adversarial, settings) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Each model's MAT loss (a gradient reaches only that model) and what to log.

    ``adversarial[i]`` lists model i's adversarial examples (one per threat model it trains against).
    """
    count, alpha, temperature = len(nets), settings["alpha"], settings["temperature"]
    distil = alpha > 0
    outputs: dict[tuple, torch.Tensor] = {}  # (model, owner, index) -> logits with a graph to that model

    def output(i: int, owner: int, index: int) -> torch.Tensor:
        if (i, owner, index) not in outputs:
            outputs[i, owner, index] = nets[i](adversarial[owner][index])
        return outputs[i, owner, index]

    lessons = [teachers(i, count, settings) if distil else [] for i in range(count)]
    # Soft labels first, before any train-mode pass of this step: each teacher in eval mode, without
    # a graph, so its BatchNorm uses (and leaves untouched) its running statistics and no gradient
    # reaches it; every soft label comes from the weights that made this step's adversarial examples.
    soft_labels: dict[tuple, torch.Tensor] = {}  # (teacher, owner, index) -> logits, no graph
    for i in range(count):
        for j, sets in lessons[i]:
            for owner, index in sets:
                if (j, owner, index) not in soft_labels:
                    soft_labels[j, owner, index] = teacher_predictions(nets[j], adversarial[owner][index])

    losses, logs = [], {}
    base_total = distil_total = 0.0
    agree = []
    for i, net in enumerate(nets):
        own = [output(i, i, k) for k in range(len(adversarial[i]))]
        if settings["base_loss"] == "trades":
            clean = net(inputs)
            smooth = sum(kl_to_clean(logits, clean).mean() for logits in own) / len(own)
            base = F.cross_entropy(clean, labels) + settings["trades_beta"] * smooth
        else:
            base = sum(F.cross_entropy(logits, labels) for logits in own) / len(own)
        base_total += base.item()
        logs[f"model{i}_adversarial_accuracy"] = sum((o.argmax(1) == labels).float().mean().item() for o in own) / len(own)
        if not distil:
            losses.append(base)
            continue
        mutual = 0.0
        for j, sets in lessons[i]:
            for owner, index in sets:
                target = soft_labels[j, owner, index]
                mutual = mutual + softened_kl(output(i, owner, index), target, temperature)
                if owner == i:
                    agree.append((target.argmax(1) == output(i, owner, index).argmax(1)).float().mean().item())
        mutual = mutual / len(lessons[i])
        distil_total += mutual.item()
        losses.append((1 - alpha) * base + alpha * mutual)
    logs["base_loss"] = base_total / count
    logs["distill_loss"] = distil_total / count
    if agree:  # how often the teachers agree with the student on the student's own adversarial examples
        logs["train_peer_agreement"] = sum(agree) / len(agree)
    return losses, logs


@hookimpl
def training_step(model, batch, ctx):
    inputs, labels = batch
    settings = checked(ctx.settings)
    nets = members(model, ctx)
    threats = threat_models(settings, ctx, len(nets))
    # every model's adversarial examples first, all from the same weights, then one joint update
    adversarial = [[adversarial_examples(net, inputs, labels, threat, settings, ctx) for threat in own]
                   for net, own in zip(nets, threats)]
    losses, logs = mutual_losses(nets, inputs, labels, adversarial, settings)
    return {"loss": sum(losses[1:], losses[0]), **logs}


class Ensemble(nn.Module):
    """Mean of the members' softmax outputs; returns its log, so attacks and argmax treat it as logits."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, inputs):
        probabilities = torch.stack([net(inputs).softmax(1) for net in self.nets]).mean(0)
        return probabilities.clamp_min(1e-12).log()


def robust_metrics(prefix: str, net, dataset, ctx) -> dict[str, float]:
    """The core's rows for one network: the worst case over ``eval.attacks`` and one row per attack."""
    result = ctx.robustness(net, dataset)
    metrics = {f"{prefix}/clean_accuracy": result.clean.correct.float().mean().item()}
    metrics.update(result.rows(ctx.config["eval"]["attacks"], ctx.config["eval"]["cascade"], f"{prefix}/"))
    return metrics


def agreement_metrics(nets, dataset, ctx) -> dict[str, float]:
    """On f_i's adversarial examples (first eval attack): does f_j agree with f_i, and is f_j right?"""
    attack = ctx.config["eval"]["attacks"][0]
    count = len(nets)
    agree = torch.zeros(count, count)
    right = torch.zeros(count, count)
    for inputs, labels in dataset.batches(ctx.config["eval"]["batch_size"], ctx.device):
        for i, net in enumerate(nets):
            adversarial = ctx.attack(net, inputs, labels, attack)
            with torch.no_grad():
                predicted = [other(adversarial).argmax(1) for other in nets]
            for j in range(count):
                agree[i, j] += (predicted[j] == predicted[i]).sum().item()
                right[i, j] += (predicted[j] == labels).sum().item()
    off_diagonal = ~torch.eye(count, dtype=torch.bool)
    return {"peer_agreement": float(agree[off_diagonal].mean() / len(dataset)),
            "transfer_robust_accuracy": float(right[off_diagonal].mean() / len(dataset))}


@hookimpl
def evaluate(model, dataset, ctx):
    settings = checked(ctx.settings)
    nets = [unwrap(net) for net in members(model, ctx)]
    metrics: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for net in nets:  # the core puts only the run's model in eval mode
            stack.enter_context(eval_mode(net))
        for index, net in enumerate(nets):
            metrics.update(robust_metrics(f"model{index}", net, dataset, ctx))
        ensemble = Ensemble(nets)
        metrics.update(robust_metrics("ensemble", ensemble, dataset, ctx))
        for key in [k for k in metrics if k.startswith("model0/")]:
            suffix = key[len("model0/"):]
            metrics[f"mean_model/{suffix}"] = sum(metrics[f"model{i}/{suffix}"] for i in range(len(nets))) / len(nets)
        if settings["agreement"] and len(nets) > 1 and ctx.config["eval"]["attacks"]:
            metrics.update(agreement_metrics(nets, dataset, ctx))
    return metrics

