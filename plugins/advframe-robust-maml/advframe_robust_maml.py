"""``robust-maml``: adversarially robust MAML with the robustness regulariser in the outer loop, and
meta-training with more shots than meta-testing (Duan, Kang, Wang, Han, Xue, Wang and Zhang,
"Rethinking the Number of Shots in Robust Model-Agnostic Meta-Learning", arXiv:2211.15180, 2022; no
official code). The regularisers are those of R-MAML (Wang, Xu, Liu, Chen, Weng, Gan and Wang, "On
Fast Adversarial Robustness Adaptation in Model-Agnostic Meta-Learning", ICLR 2021, arXiv:2102.10454;
code: wangren09/MetaAdv) and adversarial querying (Goldblum, Fowl and Goldstein, "Adversarially
Robust Few-Shot Learning: A Meta-Learning Approach", NeurIPS 2020, arXiv:1910.00982; code:
goldblum/AdversarialQuerying).

Meta-training, per task of the meta-batch (support S with ``meta.train_shots`` shots per class,
query Q)::

    theta' = inner_loop(theta, S)                       clean inner loop (inner_steps steps of inner_lr)
    Q_adv  = attack at theta' on Q                      FGSM-RS (default) or PGD, detached
    loss   = CE(f_theta'(Q), y) + weight * R            R = CE(f_theta'(Q_adv), y)          (at)
                                                          R = KL(p_theta'(Q) || p_theta'(Q_adv))  (trades)
    theta <- Adam step on the mean loss over the tasks  (first or second order through theta')

R-MAML's finding is that the regulariser is needed only here, in the outer (meta-update) loss: the
inner loop and test-time fine-tuning stay clean. ``adversarial_querying: true`` drops the clean term
(AQ: the loss is ``weight * CE(f_theta'(Q_adv), y)``). The seed paper's contribution needs no code
of its own: meta-train with ``meta.train_shots`` larger than ``meta.test_shots`` (e.g. 5 and 1);
meta-testing always adapts on ``meta.test_shots`` shots. The paper's objective is reconstructed from
its abstract (METHODS.md marks it [infer]); the regulariser follows the R-MAML and AQ code.

The training attack uses the run's threat model (``attack.eps``, ``attack.norm``) through the core
PGD primitive, run against the adapted weights (a module wrapping theta' under the run's BatchNorm
convention): ``adversary: fgsm-rs`` is one step of ``fgsm_step * eps`` from a uniform start (the
R-MAML and MAML-AQ choice); ``adversary: pgd`` takes ``attack.steps``, ``attack.alpha`` and
``attack.random_start`` from the ``attack`` section. It ascends the regulariser's own loss (CE for
``at``, the KL to the clean prediction for ``trades``).

Everything else is MAML (``advframe.meta``): second order through ``torch.func`` unless
``first_order``; the query loss after the last inner step; Adam with ``train.lr`` as the meta
learning rate; the model rebuilt with ``meta.ways`` outputs; clean fine-tuning of functional weights
at meta-test time, the meta-parameters untouched; BatchNorm ``transductive`` (batch statistics, as
the reference code, and the run defaults' PGD-20 without per-example early stopping) or ``running``.
With ``weight: 0`` and ``adversarial_querying: false`` a step is exactly MAML's.

``evaluate`` measures the intrinsic dimension of clean features, as the seed paper does: the
penultimate features (``advframe.models.embed``) of ``id_examples`` images of the test classes (the
same images for every model: a fixed draw from the evaluation split), at the meta-initialisation
(before any adaptation), under the run's BatchNorm convention (transductive: the statistics of those
images). It reports TwoNN, MLE and PCA (90% variance) as ``intrinsic_dimension/<estimator>`` and the
one chosen by ``id_estimator`` as ``intrinsic_dimension``. The estimator of the paper is unverified
(METHODS.md §1.5): TwoNN is the default.

Settings (``plugins.robust-maml``)::

    inner_lr: 0.4                  # alpha, inner step size (MAML, Omniglot 5-way)
    inner_steps: 1                 # inner steps during meta-training
    test_inner_steps: 10           # clean fine-tuning steps at meta-test time
    first_order: false             # true: first-order meta-gradient (what the R-MAML / AQ ports compute)
    batch_norm: transductive       # transductive (reference code) | running
    regulariser: at                # at (R-MAML-AT) | trades (R-MAML-TRADES)
    weight: 1.0                    # lambda (at) or beta (trades; R-MAML uses 3)
    adversarial_querying: false    # true: drop the clean query term (AQ; needs regulariser at)
    adversary: fgsm-rs             # fgsm-rs | pgd (the attack section's steps, alpha, random_start)
    fgsm_step: 1.25                # FGSM-RS step, in units of eps
    id_examples: 500               # test-class images for the intrinsic dimension (0: skip it)
    id_estimator: twonn            # twonn | mle | pca: which one is reported as intrinsic_dimension
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl, intrinsic_dimension, models
from advframe.attacks import pgd, step_size
from advframe.episodes import Task
from advframe.losses import kl_to_clean
from advframe.meta import TaskPredictor, batch_statistics, functional_forward, inner_loop, maml_run_defaults
from advframe.models import embed, eval_mode, unwrap

DEFAULTS = {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 10, "first_order": False,
            "batch_norm": "transductive", "regulariser": "at", "weight": 1.0, "adversarial_querying": False,
            "adversary": "fgsm-rs", "fgsm_step": 1.25, "id_examples": 500, "id_estimator": "twonn"}
CHOICES = {"batch_norm": ("transductive", "running"), "regulariser": ("at", "trades"),
           "adversary": ("fgsm-rs", "pgd"), "id_estimator": tuple(intrinsic_dimension.ESTIMATORS)}
ID_SEED = 4242  # which test images the intrinsic dimension is measured on: the same for every run
MIN_ID_EXAMPLES = 25


@hookimpl
def default_config():
    return dict(DEFAULTS)


@hookimpl
def run_defaults():
    return maml_run_defaults()


def checked(ctx) -> dict:
    settings = ctx.settings
    for key, allowed in CHOICES.items():
        if settings[key] not in allowed:
            raise PluginError(f"robust-maml: {key} must be one of {', '.join(allowed)}, got {settings[key]!r}")
    for key in ("inner_lr", "fgsm_step"):
        if not settings[key] > 0:
            raise PluginError(f"robust-maml: {key} must be > 0, got {settings[key]}")
    for key in ("inner_steps", "test_inner_steps", "weight", "id_examples"):
        if settings[key] < 0:
            raise PluginError(f"robust-maml: {key} must be >= 0, got {settings[key]}")
    if 0 < settings["id_examples"] < MIN_ID_EXAMPLES:
        raise PluginError(f"robust-maml: id_examples must be 0 (off) or >= {MIN_ID_EXAMPLES} (MLE uses 20 "
                          f"neighbours), got {settings['id_examples']}")
    if settings["adversarial_querying"] and settings["regulariser"] != "at":
        raise PluginError("robust-maml: adversarial_querying drops the clean term, which TRADES needs; "
                          "use regulariser=at with it")
    return settings


@hookimpl
def adapt_task(model, support, ctx):
    settings, ways, model = checked(ctx), ctx.config["meta"]["ways"], unwrap(model)
    if int(support[1].max()) >= ways:
        raise PluginError(f"robust-maml: support labels go up to {int(support[1].max())} but meta.ways is {ways}")
    transductive = settings["batch_norm"] == "transductive"
    with torch.enable_grad(), eval_mode(model), batch_statistics(model, transductive):
        params = inner_loop(model, support, steps=settings["test_inner_steps"], lr=settings["inner_lr"],
                            first_order=True, loss_fn=lambda logits, labels: F.cross_entropy(logits[:, :ways], labels))
    return TaskPredictor(model, params, transductive, ways)


def head_size(model: nn.Module) -> int:
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise PluginError("robust-maml needs a model whose last layer is nn.Linear (e.g. model.name=conv4)")
    return linear[-1].out_features


@hookimpl
def setup(model, ctx):
    if ctx.config["train"]["method"] != ctx.current_plugin:
        return None
    if not ctx.config["meta"]["episodic_training"]:
        raise PluginError(f"{ctx.current_plugin} meta-trains on task batches: set meta.episodic_training=true")
    ways = ctx.config["meta"]["ways"]
    replacement = None if head_size(model) == ways else models.build(ctx.config["model"], ctx.input_shape, ways)
    if replacement is not None and head_size(replacement) != ways:
        raise PluginError(f"model {ctx.config['model']['name']!r} ignores num_classes; MAML needs {ways} outputs")
    return replacement


# -- meta-training -----------------------------------------------------------------------------------

def adversarial_query(predictor: nn.Module, inputs, labels, settings: dict, ctx) -> torch.Tensor:
    """The regulariser's attack at the adapted weights, through the core PGD primitive."""
    attack = ctx.attack_params
    if settings["adversary"] == "fgsm-rs":
        schedule = {"steps": 1, "alpha": settings["fgsm_step"] * attack["eps"], "random_start": "uniform"}
    else:
        schedule = {"steps": attack.get("steps", 10), "alpha": step_size({"steps": 10, **attack}),
                    "random_start": attack.get("random_start", "uniform")}
    loss = "kl" if settings["regulariser"] == "trades" else "ce"
    return pgd(predictor, inputs, labels, eps=attack["eps"], norm=attack["norm"], loss=loss,
               generator=ctx.generator, **schedule)


def task_loss(model: nn.Module, task: Task, settings: dict, ctx) -> dict[str, torch.Tensor]:
    params = inner_loop(model, task.support, steps=settings["inner_steps"], lr=settings["inner_lr"],
                        first_order=settings["first_order"])
    inputs, labels = task.query
    predictor = TaskPredictor(model, params, settings["batch_norm"] == "transductive", head_size(model))
    adversarial = adversarial_query(predictor, inputs, labels, settings, ctx)
    clean_logits = functional_forward(model, params, inputs)
    adversarial_logits = functional_forward(model, params, adversarial)  # the graph reaches theta through theta'
    clean = F.cross_entropy(clean_logits, labels)
    if settings["regulariser"] == "at":
        regulariser = F.cross_entropy(adversarial_logits, labels)
    else:
        regulariser = kl_to_clean(adversarial_logits, clean_logits).mean()
    loss = settings["weight"] * regulariser + (0.0 if settings["adversarial_querying"] else clean)
    return {"loss": loss, "clean": clean.detach(), "regulariser": regulariser.detach(),
            "clean_accuracy": (clean_logits.argmax(1) == labels).float().mean(),
            "adversarial_accuracy": (adversarial_logits.argmax(1) == labels).float().mean()}


def as_tasks(batch) -> list[Task]:
    """A task batch as is; a plain ``(inputs, labels)`` batch as one task (halves: support, query)."""
    if isinstance(batch, list) and batch and all(isinstance(task, Task) for task in batch):
        return batch
    inputs, labels = batch
    half = len(labels) // 2
    return [Task(inputs[:half], labels[:half], inputs[half:], labels[half:], labels.unique())]


@hookimpl
def training_step(model, batch, ctx):
    settings = checked(ctx)
    model = unwrap(model)
    tasks = as_tasks(batch)
    if max(int(task.query_labels.max()) for task in tasks) >= head_size(model):
        raise PluginError(f"robust-maml: task labels exceed the model's {head_size(model)} outputs")
    parts = [task_loss(model, task, settings, ctx) for task in tasks]
    mean = {key: torch.stack([part[key] for part in parts]).mean() for key in parts[0]}
    return {"loss": mean["loss"], "clean_loss": mean["clean"].item(), "regulariser": mean["regulariser"].item(),
            "query_accuracy": mean["clean_accuracy"].item(),
            "adversarial_query_accuracy": mean["adversarial_accuracy"].item(),
            "support_size": float(len(tasks[0].support_labels))}


# -- evaluation: intrinsic dimension of clean features -----------------------------------------------

def clean_features(model: nn.Module, dataset, settings: dict, device) -> torch.Tensor:
    count = min(settings["id_examples"], len(dataset))
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(ID_SEED))[:count].sort().values
    inputs, _ = dataset.batch(index, device)
    with torch.no_grad(), eval_mode(model), batch_statistics(model, settings["batch_norm"] == "transductive"):
        return embed(model, inputs)


@hookimpl
def evaluate(model, dataset, ctx):
    settings = checked(ctx)
    if settings["id_examples"] == 0:
        return {}
    features = clean_features(unwrap(model), dataset, settings, ctx.device)
    if len(features) < MIN_ID_EXAMPLES:
        raise PluginError(f"robust-maml: the intrinsic dimension needs at least {MIN_ID_EXAMPLES} test images; "
                          f"the evaluation split has {len(features)}")
    metrics = {f"intrinsic_dimension/{name}": estimator(features)
               for name, estimator in intrinsic_dimension.ESTIMATORS.items()}
    metrics["intrinsic_dimension"] = metrics[f"intrinsic_dimension/{settings['id_estimator']}"]
    metrics["id_examples"] = float(len(features))
    return metrics
