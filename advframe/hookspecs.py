"""The hooks a plugin implements. Each docstring is the contract.

A run calls them in this order (``ctx`` is the :class:`advframe.RunContext` of the run)::

    for method in training method, meta-learner: run_defaults()      # core settings it recommends
    for plugin in selected plugins:            default_config()         # merged under the user's config
    for plugin in selected plugins:            setup(model, ctx)        # before optimizers and checkpoints
    for pass in range(ctx.data_passes):
        for batch in training data:
            training_step(model, batch, optimizer, perturb, ctx)        # the training method
                -> perturb(model, x, y) calls generate_perturbation(model, x, y, params, ctx)
    for plugin in evaluators:                  evaluate(model, dataset, ctx)
    (episodic runs) for task in tasks:         adapt_task(model, support, ctx)

A run resolves each role to exactly one named plugin (``attack.name``, ``train.method``,
``meta.learner``), so only that plugin's implementation answers a firstresult hook; which plugins are
installed, and in which order, never changes the answer. Hook arguments are passed by keyword: an
implementation may accept fewer arguments than the spec, and must not give them default values
(pluggy does not pass arguments that have defaults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from advframe.context import RunContext

hookspec = pluggy.HookspecMarker("advframe")
hookimpl = pluggy.HookimplMarker("advframe")


@hookspec(firstresult=True)
def generate_perturbation(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, params: dict[str, Any], ctx: RunContext
) -> torch.Tensor:
    """Return adversarial inputs for one batch: the attack role (``attack.name``, ``eval.attacks``).

    Called whenever the training method perturbs a batch (through ``perturb``) and for every
    evaluation attack. The core has put ``model`` in eval mode and enabled gradients; it restores
    the mode afterwards and clears any parameter gradients the attack leaves behind.

    :param model: the classifier, a plain ``nn.Module`` (never a DDP wrapper), inputs in [0, 1].
    :param inputs: clean batch ``(N, ...)`` in [0, 1].
    :param labels: ``(N,)`` true classes; with ``params["targeted"]`` true, the target classes.
    :param params: this attack's resolved settings (the plugin's defaults, then the user's), always
        with ``eps`` and ``norm`` (``"linf"``, ``"l2"`` or ``"l1"``). When another method seeds the
        attack programmatically, ``params["init"]`` holds a starting perturbation (a tensor shaped
        like ``inputs``).
    :param ctx: the run; draw randomness from ``ctx.generator`` so attacks are seeded. A query-based
        attack queries through :class:`advframe.cost.QueryCounter` and reports its per-example
        queries with ``ctx.record_queries``.
    :return: a tensor with the shape, dtype and device of ``inputs``, inside the ``eps`` ball of
        ``inputs`` under ``norm`` and inside [0, 1]. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def training_step(
    model: nn.Module, batch: tuple, optimizer: torch.optim.Optimizer, perturb, ctx: RunContext
) -> torch.Tensor | dict[str, Any]:
    """Compute the training loss for one minibatch: the training-method role (``train.method``).

    Called once per minibatch with ``model`` in train mode. ``batch`` is ``(inputs, labels)`` on
    ``ctx.device``. ``perturb(model, inputs, labels)`` runs the selected attack with the training
    attack's settings (``ctx.attack_params``); a method with its own inner maximisation calls the
    core primitives (``advframe.attacks.pgd``) instead.

    Automatic optimisation: return a scalar loss that carries a gradient, or
    ``{"loss": loss, "name": float, ...}`` where the other entries are logged per epoch. The core
    checks the loss is finite, then does zero_grad, backward and ``optimizer.step()``.

    Manual optimisation: call ``ctx.step(loss)`` yourself (as often as the method needs, e.g. m
    replays per minibatch) and return the last loss for logging; the core then does not step again.

    :return: the loss (Tensor) or a dict with ``"loss"``. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def adapt_task(model: nn.Module, support: tuple, ctx: RunContext) -> nn.Module:
    """Adapt the model to one few-shot task: the meta-learner role (``meta.learner``).

    Called once per task during episodic evaluation (and by meta-learners' own training steps),
    with ``support = (inputs, labels)`` of that task, labels in ``0..ways-1``. The core then
    evaluates the returned predictor on the task's query set, clean and under attack.

    :return: a callable module mapping query inputs to logits over the task's classes. It must not
        change ``model``'s parameters (adapt a copy or functional weights). Stops at the first
        non-None result.
    """


@hookspec
def evaluate(model: nn.Module, dataset, ctx: RunContext) -> dict[str, Any]:
    """Return metrics of the trained model: every evaluator role (``accuracy``, the selected
    plugins, ``eval.evaluators``) is called.

    Called once after training (and by ``advframe eval``) with ``model`` in eval mode and the
    evaluation split ``dataset`` (an :class:`advframe.data.ArrayDataset`). Use
    ``ctx.predictions(attack)`` to share the predictions other evaluators computed rather than
    attacking the model again.

    :return: ``{name: value}`` with float values (a list of floats for per-class metrics).
        Results of all evaluators are merged; two evaluators returning one name is an error that
        names both plugins.
    """


@hookspec(firstresult=True)
def default_config() -> dict[str, Any]:
    """Return this plugin's settings with their defaults: the ``plugins.<name>`` section.

    Called once per run for each selected plugin, before the user's file and ``--set`` overrides
    are applied on top. Every key a user may set must be here: an unknown key is rejected, and a
    value's type must match its default's. For attacks these are the attack's parameters.
    """


@hookspec(firstresult=True)
def run_defaults() -> dict[str, Any]:
    """Return the core settings this method needs to make sense, e.g. a few-shot data split and
    episodic training for a meta-learner: ``{"data": {"name": "mnist-fewshot"}, "meta": {...}}``.

    Called for the selected training method and meta-learner when the config is resolved. The
    result goes on top of the core defaults and under the user's file and ``--set``; it may hold the
    sections ``data``, ``model``, ``train``, ``attack``, ``eval`` and ``meta``, checked like a user's
    config. Keep it to what the method needs: comparisons (``advframe bench``) should differ only in
    the method.
    """


@hookspec(firstresult=True)
def setup(model: nn.Module, ctx: RunContext) -> nn.Module | None:
    """Prepare the run before optimizers are built and any checkpoint is loaded.

    Called once per run (and by ``advframe eval``) for each selected plugin that implements it. Use
    it to change the model's structure (return the replacement, e.g. auxiliary BatchNorm), to add
    trained modules (``ctx.add_model(name, module)``: each gets an optimizer and is checkpointed),
    or to set ``ctx.data_passes`` (a method that replays minibatches keeps its budget this way).

    :return: a replacement model, or None to keep ``model``.
    """
