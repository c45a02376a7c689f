"""``maml``: Model-Agnostic Meta-Learning (Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for
Fast Adaptation of Deep Networks", ICML 2017, arXiv:1703.03400; code: cbfinn/maml), second order and
first order (FOMAML, the same paper's ``stop_grad`` variant).

MAML learns an initialisation theta from which a few gradient steps on a task's support set S fit
its query set Q::

    theta'_T = theta - alpha * grad CE(f_theta(S))          (inner_steps times, from theta)
    theta   <- Adam step on  mean_T CE(f_theta'_T(Q))        (the meta-batch: meta.tasks_per_batch tasks)

The meta-loss is the query loss after the *last* inner step only. Second order differentiates
through the inner steps (``advframe.meta.inner_loop`` with ``create_graph=True``, through
``torch.func``); first order treats the inner gradients as constants, so the meta-gradient is the
query gradient at theta'. The meta-optimiser is the run's optimiser (``train.optimizer``, Adam by
the run defaults) with ``train.lr`` as the meta learning rate (1e-3, as the paper).

At meta-test time ``adapt_task`` takes ``test_inner_steps`` clean steps from theta on the task's
support (always ``meta.test_shots`` shots) on functional weights, never on the meta-parameters, and
returns the adapted predictor as a module; the core scores it on the query set, clean and under each
evaluation attack run against the adapted weights.

N-way head: when ``maml`` trains the model, ``setup`` rebuilds the model (``model`` section) with
``meta.ways`` outputs, so task labels 0..N-1 index the logits (the paper's convention: one output per
way, its meaning reassigned in every task). A model with more outputs (e.g. trained by ``erm`` on
all training classes and only adapted by ``maml``) is fine-tuned and read on its first ``ways``
outputs.

BatchNorm (``batch_norm``): ``transductive`` (default, as the reference code: cbfinn/maml and the
PyTorch ports keep BatchNorm on batch statistics at meta-test time too): every forward pass of the
adapted predictor normalises with the statistics of the batch it is given (the support during
adaptation, the whole query set at evaluation), and the running buffers are neither read nor
written. ``running``: adaptation and prediction use the running statistics accumulated during
meta-training (eval-mode BatchNorm). Meta-training itself always runs in train mode (batch
statistics). Because a transductive prediction depends on the rest of its batch, the run defaults
evaluate with PGD-20 without per-example early stopping (which would attack shrinking sub-batches
whose statistics differ from the full query set's).

Settings (``plugins.maml``)::

    inner_lr: 0.4               # alpha, the inner (fine-tuning) step size (paper, Omniglot 5-way)
    inner_steps: 1              # inner steps during meta-training (paper, Omniglot 5-way)
    test_inner_steps: 10        # inner steps at meta-test time (paper's evaluation)
    first_order: false          # true: FOMAML (no second derivatives)
    batch_norm: transductive    # transductive (reference code) | running

Run defaults (under the user's config): ``data.name: mnist-fewshot``, ``model.name: conv4``,
``meta.episodic_training: true``, ``train.weight_decay: 0`` and ``train.schedule: constant`` (the
paper's plain Adam meta-optimiser), evaluation PGD-20 without early stopping.

``training_step`` also accepts a plain ``(inputs, labels)`` batch (as ``advframe.testing``'s
contract check passes one): it is one task, its first half the support and its second half the query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, hookimpl, models
from advframe.episodes import Task
from advframe.meta import TaskPredictor, batch_statistics, functional_forward, inner_loop, maml_run_defaults
from advframe.models import eval_mode, unwrap

DEFAULTS = {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 10, "first_order": False,
            "batch_norm": "transductive"}
BATCH_NORM = ("transductive", "running")


@hookimpl
def default_config():
    return dict(DEFAULTS)


@hookimpl
def run_defaults():
    return maml_run_defaults()


def checked(ctx) -> dict:
    settings = ctx.settings
    if not settings["inner_lr"] > 0:
        raise PluginError(f"maml: inner_lr must be > 0, got {settings['inner_lr']}")
    for key in ("inner_steps", "test_inner_steps"):
        if settings[key] < 0:
            raise PluginError(f"maml: {key} must be >= 0, got {settings[key]}")
    if settings["batch_norm"] not in BATCH_NORM:
        raise PluginError(f"maml: batch_norm must be transductive or running, got {settings['batch_norm']!r}")
    return settings


# -- the adapted predictor and its BatchNorm convention ---------------------------------------------

def adapt(model: nn.Module, support: tuple, settings: dict, ways: int) -> TaskPredictor:
    transductive = settings["batch_norm"] == "transductive"
    with torch.enable_grad(), eval_mode(model), batch_statistics(model, transductive):
        params = inner_loop(model, support, steps=settings["test_inner_steps"], lr=settings["inner_lr"],
                            first_order=True, loss_fn=lambda logits, labels: F.cross_entropy(logits[:, :ways], labels))
    return TaskPredictor(model, params, transductive, ways)


@hookimpl
def adapt_task(model, support, ctx):
    ways = ctx.config["meta"]["ways"]
    if int(support[1].max()) >= ways:
        raise PluginError(f"maml: support labels go up to {int(support[1].max())} but meta.ways is {ways}")
    return adapt(unwrap(model), support, checked(ctx), ways)


# -- meta-training -----------------------------------------------------------------------------------

def head_size(model: nn.Module) -> int:
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise PluginError("maml needs a model whose last layer is nn.Linear (e.g. model.name=conv4)")
    return linear[-1].out_features


@hookimpl
def setup(model, ctx):
    if ctx.config["train"]["method"] != ctx.current_plugin:
        return None  # only adapting: keep the model as trained
    if not ctx.config["meta"]["episodic_training"]:
        raise PluginError(f"{ctx.current_plugin} meta-trains on task batches: set meta.episodic_training=true")
    ways = ctx.config["meta"]["ways"]
    if head_size(model) == ways:
        return None
    replacement = models.build(ctx.config["model"], ctx.input_shape, ways)
    if head_size(replacement) != ways:
        raise PluginError(f"model {ctx.config['model']['name']!r} ignores num_classes; MAML needs {ways} outputs")
    return replacement


def as_tasks(batch) -> list[Task]:
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
        raise PluginError(f"maml: task labels exceed the model's {head_size(model)} outputs")
    losses, correct = [], []
    for task in tasks:
        params = inner_loop(model, task.support, steps=settings["inner_steps"], lr=settings["inner_lr"],
                            first_order=settings["first_order"])
        logits = functional_forward(model, params, task.query_inputs)
        losses.append(F.cross_entropy(logits, task.query_labels))
        correct.append((logits.argmax(1) == task.query_labels).float().mean())
    return {"loss": torch.stack(losses).mean(), "query_accuracy": torch.stack(correct).mean().item(),
            "support_size": float(len(tasks[0].support_labels))}
