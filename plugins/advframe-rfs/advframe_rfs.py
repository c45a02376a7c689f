"""``rfs``: RFS (Tian, Wang, Krishnan, Tenenbaum, Isola, "Rethinking Few-Shot Image Classification: a
Good Embedding Is All You Need?", ECCV 2020, arXiv:2003.11539; code: WangYueFt/rfs).

No episodic meta-learning. Three parts:

* Embedding: an ordinary classifier trained with cross-entropy on *all* meta-training classes at once
  (the runner builds the model with as many outputs as the training split has classes; the batches
  are plain minibatches, ``meta.episodic_training: false``). Its penultimate features
  (``advframe.models.embed``: ``model.features`` for conv4 and resnet12) are the embedding.
* Born-again self-distillation (``generations`` > 0): after ``train.epochs`` epochs the network
  becomes the teacher (frozen, eval mode) and a freshly initialised network of the same architecture
  is trained for another ``train.epochs`` epochs on::

      gamma * CE(f_s(x), y) + alpha * T² * KL(softmax(f_t(x) / T) || softmax(f_s(x) / T))

  and so on for each generation. As in the official code each generation restarts the optimizer (its
  state is cleared) and the learning-rate schedule (``train.schedule`` runs once per generation);
  the run's ``train.epochs`` is the length of one generation, so a run trains
  ``train.epochs * (generations + 1)`` epochs in all. ``generations: 0`` is RFS-simple.
* Adaptation (``adapt_task``): the embedding is frozen (eval mode, no gradient) and fits nothing;
  support features are L2-normalised and a multinomial logistic regression (scikit-learn,
  L2-penalised, lbfgs) is fit on them. The adapted predictor is a module, normalise then a linear
  layer holding the regression's coefficients, on top of the frozen embedding, so attacks on the
  query differentiate through the embedding and the probe. The official test protocol fits the
  probe on ``support_augmentations`` = 5 randomly augmented copies of each support image (random
  crop, colour jitter and flip on miniImageNet); here the augmentation is ``advframe.data.augment``
  (``support_augment``, random crop by default: colour jitter does not apply to grey characters and
  flips change their identity); 0 fits on the plain support.

Defaults of a run (``run_defaults``): ``data.name: mnist-fewshot``, ``model.name: conv4``,
``train.batch_size: 64`` (the official batch size), ``meta.episodic_training: false``. The official
recipe trains a ResNet-12 with SGD (lr 0.05, momentum 0.9, weight decay 5e-4, decay x0.1 at epochs
60 and 80 of 100); the core's optimizer and schedule apply here (``train.*``).

Settings (``plugins.rfs``)::

    generations: 1              # born-again distillation generations after the first network (0 = RFS-simple)
    temperature: 4.0            # T of the distillation KL
    gamma: 0.5                  # weight of the cross-entropy in a distillation generation
    alpha: 0.5                  # weight of the T²-scaled KL to the teacher
    C: 1.0                      # inverse L2 strength of the logistic-regression probe (scikit-learn's C)
    max_iter: 1000              # lbfgs iterations of the probe
    normalize: true             # L2-normalise features before the probe (the paper's choice)
    support_augmentations: 5    # augmented copies of each support image the probe is fit on (0 = none)
    support_augment: crop       # crop | flip | crop-flip (advframe.data.augment)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl
from advframe.data import augment
from advframe.data import load as load_data
from advframe.losses import kl_to_clean
from advframe.models import embed, eval_mode, unwrap

AUGMENTATIONS = ("crop", "flip", "crop-flip")
GENERATION_KEY = "rfs_generation"  # ctx.state: the generation the student is in (restored on --resume)
BATCHES_KEY = "rfs_batches_per_epoch"


@hookimpl
def default_config():
    return {"generations": 1, "temperature": 4.0, "gamma": 0.5, "alpha": 0.5, "C": 1.0, "max_iter": 1000,
            "normalize": True, "support_augmentations": 5, "support_augment": "crop"}


@hookimpl
def run_defaults():
    return {"data": {"name": "mnist-fewshot"}, "model": {"name": "conv4"}, "train": {"batch_size": 64},
            "meta": {"episodic_training": False}}


def check_settings(settings: dict) -> None:
    problems = {
        "generations": settings["generations"] < 0,
        "temperature": settings["temperature"] <= 0,
        "gamma": settings["gamma"] < 0,
        "alpha": settings["alpha"] < 0,
        "C": settings["C"] <= 0,
        "max_iter": settings["max_iter"] < 1,
        "support_augmentations": settings["support_augmentations"] < 0,
    }
    rule = {"generations": ">= 0", "temperature": "> 0", "gamma": ">= 0", "alpha": ">= 0", "C": "> 0",
            "max_iter": ">= 1", "support_augmentations": ">= 0"}
    for key, bad in problems.items():
        if bad:
            raise PluginError(f"rfs: plugins.rfs.{key} must be {rule[key]}, got {settings[key]}")
    if settings["support_augment"] not in AUGMENTATIONS:
        raise PluginError(f"rfs: plugins.rfs.support_augment must be one of {', '.join(AUGMENTATIONS)}, "
                          f"got {settings['support_augment']!r}")


def trains_here(ctx) -> bool:
    """True when rfs is the run's training method (it may also serve only as the probe of another's embedding)."""
    return ctx.config["train"]["method"] == ctx.current_plugin


@hookimpl
def setup(ctx):
    settings = ctx.settings
    check_settings(settings)
    if not trains_here(ctx):
        return None
    if ctx.config["meta"]["episodic_training"]:
        raise PluginError("rfs trains one classifier on all training classes, not on episodes: "
                          "set meta.episodic_training=false")
    train = ctx.config["train"]
    ctx.data_passes = train["epochs"] * (settings["generations"] + 1)
    ctx.state[BATCHES_KEY] = torch.tensor(math.ceil(len(load_data(ctx.config["data"]).train) / train["batch_size"]))
    if settings["generations"]:
        teacher = ctx.build_model().requires_grad_(False)
        ctx.add_model("teacher", teacher, trainable=False)
    return None


# -- training: supervised embedding and born-again generations ---------------------------------------

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (the official DistillKL)."""
    return kl_to_clean(student_logits / temperature, teacher_logits / temperature).mean() * temperature ** 2


def generation_of(ctx) -> int:
    return min(ctx.epoch // ctx.config["train"]["epochs"], ctx.settings["generations"])


def begin_generation(model: nn.Module, ctx) -> int:
    """At the first step of a new generation: the student becomes the teacher, the student is freshly
    initialised and its optimizer state cleared. Returns the current generation."""
    generation = generation_of(ctx)
    if generation > int(ctx.state.get(GENERATION_KEY, torch.tensor(0))):
        student, teacher = unwrap(model), unwrap(ctx.models["teacher"])
        teacher.load_state_dict(student.state_dict())
        with torch.random.fork_rng(devices=[]):  # a fresh network, seeded by (seed, generation)
            torch.manual_seed(ctx.config["seed"] * 7919 + generation)
            fresh = ctx.build_model()
        student.load_state_dict(fresh.state_dict())
        ctx.optimizers["model"].state.clear()
        ctx.state[GENERATION_KEY] = torch.tensor(generation)
    return generation


def restart_schedule(ctx, generation: int) -> None:
    """The learning rate as if this generation were a run of its own (the runner's schedule spans all
    generations; this sets the rate the coming optimizer step uses)."""
    from advframe.runner import learning_rate

    train = ctx.config["train"]
    batches = int(ctx.state[BATCHES_KEY])
    epoch_in_generation = ctx.epoch - generation * train["epochs"]
    progress = (epoch_in_generation + ctx.batch_index / batches) / train["epochs"]
    rate = learning_rate(train["lr"], progress, train, train["epochs"])
    for group in ctx.optimizers["model"].param_groups:
        group["lr"] = rate


@hookimpl
def training_step(model, batch, ctx):
    if isinstance(batch, list):
        raise PluginError("rfs trains one classifier on all training classes, not on episodes: "
                          "set meta.episodic_training=false")
    inputs, labels = batch
    settings = ctx.settings
    generation = begin_generation(model, ctx)
    restart_schedule(ctx, generation)
    logits = model(inputs)
    ce = F.cross_entropy(logits, labels)
    logs = {"generation": float(generation), "ce_loss": ce.item(),
            "train_accuracy": (logits.detach().argmax(1) == labels).float().mean().item()}
    if generation == 0:
        return {"loss": ce, **logs}
    teacher = ctx.models["teacher"]
    with torch.no_grad(), eval_mode(teacher):
        teacher_logits = teacher(inputs)
    kd = distillation_loss(logits, teacher_logits, settings["temperature"])
    return {"loss": settings["gamma"] * ce + settings["alpha"] * kd, "kd_loss": kd.item(), **logs}


# -- adaptation: a logistic-regression probe on frozen, normalised features ------------------------------

def support_features(model: nn.Module, inputs: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Frozen features: eval mode (BatchNorm statistics untouched), no gradient to the embedding."""
    with eval_mode(model), torch.no_grad():
        features = embed(model, inputs)
    return F.normalize(features, dim=1) if normalize else features


def fit_probe(features: torch.Tensor, labels: torch.Tensor, ways: int, C: float, max_iter: int):
    """Weights ``(ways, dim)`` and bias ``(ways,)`` of a multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression

    if ways == 1:  # a one-class support: every query is that class
        return torch.zeros(1, features.shape[1]), torch.zeros(1)
    probe = LogisticRegression(C=C, max_iter=max_iter, random_state=0)  # L2, lbfgs, multinomial
    probe.fit(features.double().cpu().numpy(), labels.cpu().numpy())
    weight, bias = torch.from_numpy(probe.coef_).float(), torch.from_numpy(probe.intercept_).float()
    if weight.shape[0] == 1:  # two classes: scikit-learn keeps only the logit of class 1 against class 0
        weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
    return weight, bias


class LinearProbe(nn.Module):
    """Frozen embedding, L2 normalisation, then the probe's linear layer: a differentiable predictor."""

    def __init__(self, model: nn.Module, weight: torch.Tensor, bias: torch.Tensor, normalize: bool):
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.linear.requires_grad_(False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model):
            features = embed(self.model, inputs)
        return self.linear(F.normalize(features, dim=1) if self.normalize else features)


@hookimpl
def adapt_task(model, support, ctx):
    settings = ctx.settings
    check_settings(settings)
    inputs, labels = support
    ways = int(labels.max()) + 1
    present = torch.bincount(labels, minlength=ways)
    if (present == 0).any():
        raise PluginError(f"rfs: the support has no example of classes {(present == 0).nonzero().flatten().tolist()}; "
                          f"every class 0..{ways - 1} needs at least one")
    copies = settings["support_augmentations"]
    if copies:
        inputs = torch.cat([augment(inputs, settings["support_augment"], ctx.generator) for _ in range(copies)])
        labels = labels.repeat(copies)
    model = unwrap(model)
    features = support_features(model, inputs, settings["normalize"])
    weight, bias = fit_probe(features, labels, ways, settings["C"], settings["max_iter"])
    return LinearProbe(model, weight, bias, settings["normalize"]).to(features.device)
