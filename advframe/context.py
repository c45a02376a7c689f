"""The run as a plugin sees it: settings, randomness, attacks, optimisation and shared state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advframe import distributed
from advframe.config import attack_label
from advframe.cost import GradientCounter
from advframe.errors import PluginCallError, PluginError, TrainingDiverged
from advframe.models import eval_mode, unwrap


def make_optimizer(parameters, train_config: dict, lr: float | None = None) -> torch.optim.Optimizer:
    lr = train_config["lr"] if lr is None else lr
    kind, decay = train_config["optimizer"], train_config["weight_decay"]
    if kind == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=train_config["momentum"], weight_decay=decay,
                               nesterov=train_config["nesterov"] and train_config["momentum"] > 0)
    if kind == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=decay)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)


@dataclass
class Predictions:
    """Logits of every evaluation example, clean or under one attack, in dataset order."""

    labels: torch.Tensor
    logits: torch.Tensor

    @property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def correct(self) -> torch.Tensor:
        return self.predicted == self.labels


ROBUST, CLEAN_WRONG = -1, -2


@dataclass
class Robustness:
    """The ``eval.attacks`` entries run in order on one dataset; every tensor has one row per example.

    ``broken_by`` is the position of the first entry that broke the example (``ROBUST`` if none did,
    ``CLEAN_WRONG`` if the clean input is already misclassified); ``attacked[i]`` and ``broken[i]`` say
    which examples entry ``i`` attacked and which of those it broke; ``queries[i]`` holds a query
    attack's statistics (or None).
    """

    clean: Predictions
    broken_by: torch.Tensor
    attacked: list[torch.Tensor]
    broken: list[torch.Tensor]
    queries: list[dict[str, float] | None]

    @property
    def correct(self) -> torch.Tensor:
        """Robust under every entry: the per-example worst case, the headline robust accuracy."""
        return self.broken_by == ROBUST

    def robust_after(self, position: int) -> torch.Tensor:
        """Robust under the entries up to ``position`` (AutoAttack's 'robust accuracy after')."""
        return (self.broken_by == ROBUST) | (self.broken_by > position)

    def rows(self, attacks: list[dict[str, Any]], cascade: bool, prefix: str = "") -> dict[str, float]:
        """``robust_accuracy`` (the worst case) and one row per entry: ``robust_accuracy_after/<label>``
        for a cascade, ``robust_accuracy/<label>`` (that attack alone) otherwise."""
        if not attacks:
            return {}
        rows = {f"{prefix}robust_accuracy": self.correct.float().mean().item()}
        for position, attack in enumerate(attacks):
            if cascade:
                survived = self.robust_after(position)
                rows[f"{prefix}robust_accuracy_after/{attack['label']}"] = survived.float().mean().item()
            else:
                survived = self.clean.correct & ~self.broken[position]
                rows[f"{prefix}robust_accuracy/{attack['label']}"] = survived.float().mean().item()
        return rows


class RunContext:
    """Passed to every hook as ``ctx``.

    Attributes plugins read: ``config`` (the resolved config), ``settings`` (the called plugin's
    ``plugins.<name>`` section), ``device``, ``num_classes``, ``input_shape``, ``generator`` (seeded;
    use it for all randomness of attacks), ``attack_params`` (the training attack's settings),
    ``epoch``, ``batch_index``, ``global_step``, ``data_passes``, ``state`` (tensors kept across
    steps and restored on ``--resume``), ``models`` (modules added with :meth:`add_model`),
    ``out_dir`` and ``is_main`` (only the main process writes files).
    """

    def __init__(self, config: dict, host, *, device: torch.device, num_classes: int, input_shape: tuple,
                 out_dir: Path | None = None, model_factory: Callable[[], nn.Module] | None = None,
                 generator: torch.Generator | None = None, progress=None):
        self.config = config
        self.host = host
        self.device = device
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.out_dir = Path(out_dir) if out_dir else None
        self.generator = generator or torch.Generator().manual_seed(config.get("seed", 0))
        self.attack_params = dict(config["attack"])
        self.epoch = 0
        self.batch_index = 0
        self.global_step = 0
        self.data_passes = config["train"]["epochs"]
        self.state: dict[str, torch.Tensor] = {}
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.trainable: dict[str, bool] = {}
        self.extra_lr: dict[str, float | None] = {}
        self.counter = GradientCounter()
        self.progress = progress
        self._model_factory = model_factory
        self._plugin_stack: list[str] = []
        self._stepped = False
        self._prediction_cache: dict[tuple, Predictions] = {}
        self._robustness_cache: dict[tuple, Robustness] = {}
        self._query_statistics: dict[tuple, dict[str, float]] = {}
        self._query_records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._add_model_allowed = True
        self.test_tasks: list = []  # episodic runs: the fixed meta-test tasks
        self.input_bounds: tuple[float, float] | None = (0.0, 1.0)  # None: inputs are embeddings (text)
        self.score_pseudo_labels = None  # domain adaptation: f(batch.target_index, labels) -> accuracy
        self._adapted: dict[tuple, nn.Module] = {}
        self._task_cache: dict[tuple, list[torch.Tensor]] = {}

    # -- settings ---------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return distributed.rank() == 0

    @property
    def current_plugin(self) -> str | None:
        return self._plugin_stack[-1] if self._plugin_stack else None

    @property
    def settings(self) -> dict[str, Any]:
        """The ``plugins.<name>`` section of the plugin being called."""
        return self.plugin_config(self.current_plugin)

    def plugin_config(self, name: str | None) -> dict[str, Any]:
        return self.config["plugins"].get(name, {}) if name else {}

    # -- calling plugins ----------------------------------------------------------------------------

    def call(self, hook: str, name: str, **kwargs):
        """Call one plugin's hook with ``ctx.settings`` pointing at that plugin's section."""
        self._plugin_stack.append(name)
        try:
            return self.host.call(hook, name, ctx=self, **kwargs)
        finally:
            self._plugin_stack.pop()

    def attack_settings(self, name: str, **overrides) -> dict[str, Any]:
        """Full settings for attack plugin ``name``: its defaults, the user's ``plugins.<name>``, the
        run's ``eps`` and ``norm``, then ``overrides``. For plugins that run an extra attack."""
        self.host.require(name, "attack")
        base = {**self.host.default_config(name), **self.config["plugins"].get(name, {})}
        threat = {"norm": self.attack_params["norm"], "eps": self.attack_params["eps"]}
        return {**base, "name": name, **threat, **overrides}

    def attack(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
               params: dict[str, Any] | None = None) -> torch.Tensor:
        """Run the attack plugin ``params["name"]`` (default: the training attack) on one batch.

        The model is attacked in eval mode and its mode and parameter gradients are restored; the
        result is checked to stay in the ``eps`` ball and in [0, 1].
        """
        params = params or self.attack_params
        name = params["name"]
        model = unwrap(model)
        if not inputs.dtype.is_floating_point:  # token ids: attacks perturb the model's embeddings
            if not hasattr(model, "embed"):
                raise PluginError("the inputs are token ids but the model has no embed() method to attack in "
                                  "embedding space; use model.name=text-classifier")
            with torch.no_grad():
                inputs = model.embed(inputs)
        saved_grads = [(p, p.grad) for p in model.parameters()]
        for parameter, _ in saved_grads:
            parameter.grad = None
        try:
            with eval_mode(model), torch.enable_grad():
                adversarial = self.call("generate_perturbation", name, model=model, inputs=inputs, labels=labels,
                                        params=params)
        finally:
            for parameter, grad in saved_grads:
                parameter.grad = grad
        check_perturbation(name, inputs, adversarial, params["eps"], params["norm"], self.input_bounds)
        return adversarial.detach()

    def perturb(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training attack (``attack`` section) on one batch."""
        return self.attack(model, inputs, labels)

    # -- optimisation -------------------------------------------------------------------------------

    def add_model(self, name: str, module: nn.Module, *, trainable: bool = True, lr: float | None = None,
                  counted: bool = False) -> nn.Module:
        """Add a module the run trains (own optimizer) or keeps; saved and restored with the run.

        Call it from ``setup``. Its weights go into ``model.safetensors`` under ``name/``. ``counted``:
        its passes are part of ``gradient_evaluations`` (a peer classifier trained like the model,
        as in MAT); a discriminator's, a teacher's or another helper's are not.
        """
        if not self._add_model_allowed:
            raise PluginError(f"add_model({name!r}) must be called from the setup hook")
        if name in self.models or name == "model" or "/" in name:
            raise PluginError(f"cannot add a model named {name!r}: the name is taken or contains '/'")
        module = module.to(self.device)
        self.models[name] = module
        self.trainable[name] = trainable
        self.extra_lr[name] = lr
        if counted:
            self.counter.attach(module)
        return module

    def count_gradient_evaluations(self, examples: int) -> None:
        """Report training work the core cannot see: the counter counts one gradient evaluation per
        example for each forward pass that builds a graph. A second backward pass through the same
        forward pass (an input gradient inside the loss, per-class gradients) costs ``examples``
        more, and so does backpropagating through a gradient taken with ``create_graph=True`` (double
        backpropagation). See CONTRIBUTING.md, "Cost"."""
        self.counter.add(examples)

    def build_model(self) -> nn.Module:
        """A fresh model as ``model`` in the config describes it (peers, surrogates, students)."""
        if self._model_factory is None:
            raise PluginError("this context cannot build models")
        return self._model_factory().to(self.device)

    def step(self, loss: torch.Tensor, models: list[str] | None = None) -> None:
        """zero_grad, backward, optional clipping, and a step of the named optimizers (default: all).

        The main model's optimizer is called ``"model"``. Raises :class:`TrainingDiverged` on a
        non-finite loss, before anything is changed.
        """
        check_finite(loss, self)
        names = list(self.optimizers) if models is None else models
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config["train"]["grad_clip"]
        for name in names:
            optimizer = self.optimizers[name]
            if clip:
                parameters = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(parameters, clip)
            optimizer.step()
        self._stepped = True

    # -- evaluation ----------------------------------------------------------------------------------

    def record_queries(self, queries: torch.Tensor, success: torch.Tensor, counted: torch.Tensor | None = None) -> None:
        """Called by query-based attacks once per batch: per example, the queries spent, whether the
        attack succeeded, and whether the example counts (examples the model already misclassifies
        before any perturbation do not, as in the papers). Evaluation turns these into success rate
        and mean / median queries over successful examples."""
        if self._query_records is not None:
            counted = torch.ones_like(success, dtype=torch.bool) if counted is None else counted
            self._query_records.append((queries.detach().cpu().long(), success.detach().cpu().bool(),
                                        counted.detach().cpu().bool()))

    @contextlib.contextmanager
    def unrecorded_queries(self):
        """Queries reported inside the block are not the evaluated attack's: for an attack that runs a
        query attack as one part of itself (AutoAttack's Square component) through :meth:`attack`."""
        records, self._query_records = self._query_records, None
        try:
            yield
        finally:
            self._query_records = records

    def query_statistics(self, model: nn.Module, dataset, attack: dict[str, Any]) -> dict[str, float] | None:
        """Success rate and queries of a query-based evaluation attack (None for other attacks)."""
        self.predictions(model, dataset, attack)
        return self._query_statistics.get(self._key(model, dataset, attack))

    def _key(self, model, dataset, attack) -> tuple:
        return (id(unwrap(model)), id(dataset), repr(sorted(attack.items())) if attack else None)

    def predictions(self, model: nn.Module, dataset, attack: dict[str, Any] | None = None) -> Predictions:
        """Logits on ``dataset``, clean (``attack=None``) or under an attack from ``eval.attacks``.

        Cached for the evaluation, so every evaluator shares one attack run. Under torchrun each
        rank attacks its shard and the results are gathered.
        """
        key = self._key(model, dataset, attack)
        if key not in self._prediction_cache:
            self._prediction_cache[key], queries = self._attacked(model, dataset, attack)
            if queries:
                self._query_statistics[key] = queries
        return self._prediction_cache[key]

    def _attacked(self, model, dataset, attack) -> tuple[Predictions, dict[str, float] | None]:
        self._query_records = []
        try:
            predictions = self._predict(unwrap(model), dataset, attack)
            return predictions, summarise_queries(self._query_records) if self._query_records else None
        finally:
            self._query_records = None

    def robustness(self, model: nn.Module, dataset) -> Robustness:
        """Every ``eval.attacks`` entry in order, each on the examples no earlier entry broke (with
        ``eval.cascade: false``, each on every example the model gets right when clean).

        An example is broken once any entry breaks it; the point that breaks it is the one the core
        checked (in the eps ball, in the input bounds) and classified again in eval mode. Cached for
        the evaluation.
        """
        key = self._key(model, dataset, {"robustness": True})
        if key in self._robustness_cache:
            return self._robustness_cache[key]
        clean = self.predictions(model, dataset)
        broken_by = torch.where(clean.correct, ROBUST, CLEAN_WRONG)
        result = Robustness(clean, broken_by, [], [], [])
        for position, attack in enumerate(self.config["eval"]["attacks"]):
            attacked = (broken_by == ROBUST) if self.config["eval"]["cascade"] else clean.correct.clone()
            broken = torch.zeros_like(attacked)
            index = attacked.nonzero().flatten()
            queries = None
            if len(index):
                predictions, queries = self._attacked(model, dataset.subset(index), attack)
                broken[index] = ~predictions.correct
                broken_by[broken & (broken_by == ROBUST)] = position
            result.attacked.append(attacked)
            result.broken.append(broken)
            result.queries.append(queries)
        self._robustness_cache[key] = result
        return result

    def _predict(self, model, dataset, attack) -> Predictions:
        rank, world = distributed.rank(), distributed.world_size()
        shard = torch.arange(rank, len(dataset), world)
        batch_size = self.config["eval"]["batch_size"]
        logits = []
        label = attack_label(attack) if attack else "clean"
        task = self.progress.add_task(f"eval {label}", total=len(shard)) if self.progress else None
        with self.counter.paused(), eval_mode(model):
            for start in range(0, len(shard), batch_size):
                inputs, labels = dataset.batch(shard[start:start + batch_size], self.device)
                if attack is not None:
                    inputs = self.attack(model, inputs, labels, attack)
                with torch.no_grad():
                    logits.append(model(inputs).float().cpu())
                if task is not None:
                    self.progress.advance(task, len(labels))
        if task is not None:
            self.progress.remove_task(task)
        shard_logits = torch.cat(logits) if logits else torch.zeros(0, self.num_classes)
        gathered = distributed.gather_rows(shard_logits)
        order = distributed.gather_rows(shard)
        full = torch.empty_like(gathered)
        full[order] = gathered
        return Predictions(dataset.labels.clone(), full)

    def clear_predictions(self) -> None:
        self._prediction_cache.clear()
        self._robustness_cache.clear()
        self._query_statistics.clear()
        self._adapted.clear()
        self._task_cache.clear()

    # -- episodic evaluation ---------------------------------------------------------------------------

    @property
    def episodic(self) -> bool:
        """True when the run evaluates on few-shot tasks (a meta-learner is selected)."""
        return self.config["meta"]["learner"] != "noadapt"

    def adapt(self, model: nn.Module, task, support: tuple | None = None) -> nn.Module:
        """The meta-learner's predictor for ``task`` (adapted to its clean support once, then cached)."""
        key = (id(unwrap(model)), id(task))
        if support is None and key in self._adapted:
            return self._adapted[key]
        clean = support is None
        with eval_mode(unwrap(model)), torch.enable_grad():
            support = support or tuple(t.to(self.device) for t in task.support)
            adapted = self.call("adapt_task", self.config["meta"]["learner"], model=unwrap(model), support=support)
        if not isinstance(adapted, nn.Module):
            raise PluginCallError(f"adapt_task of {self.config['meta']['learner']!r} must return an nn.Module")
        if clean:
            self._adapted[key] = adapted
        return adapted

    def task_predictions(self, model: nn.Module, attack: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """Per test task, the adapted model's predicted labels on the query set (classes, or a mask
        per pixel for segmentation), clean or under ``attack`` (run against the adapted model; with
        ``meta.attack_support`` the support is perturbed too and the model re-adapted on it).
        Cached for the evaluation."""
        key = self._key(model, None, attack)
        if key in self._task_cache:
            return self._task_cache[key]
        rank, world = distributed.rank(), distributed.world_size()
        mine = list(range(rank, len(self.test_tasks), world))
        label = attack_label(attack) if attack else "clean"
        progress = self.progress.add_task(f"tasks {label}", total=len(mine)) if self.progress else None
        rows = []
        with self.counter.paused():
            for index in mine:
                task = self.test_tasks[index].to(self.device)
                adapted = self.adapt(model, self.test_tasks[index])
                inputs, labels = task.query
                if attack is not None:
                    if self.config["meta"]["attack_support"]:
                        support = (self.attack(adapted, *task.support, attack), task.support_labels)
                        adapted = self.adapt(model, self.test_tasks[index], support)
                    inputs = self.attack(adapted, inputs, labels, attack)
                with torch.no_grad(), eval_mode(adapted):
                    rows.append(adapted(inputs).argmax(1).cpu())
                if progress is not None:
                    self.progress.advance(progress)
        if progress is not None:
            self.progress.remove_task(progress)
        if world > 1:  # every task has the same query shape: gather as one tensor
            gathered = distributed.gather_rows(torch.stack(rows))
            order = distributed.gather_rows(torch.tensor(mine))
            result = [None] * len(self.test_tasks)
            for position, row in zip(order.tolist(), gathered):
                result[position] = row
            rows = result
        self._task_cache[key] = rows
        return rows

    def task_correct(self, model: nn.Module, attack: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """Per test task, which query predictions are right (see :meth:`task_predictions`)."""
        return [predicted == task.query_labels
                for predicted, task in zip(self.task_predictions(model, attack), self.test_tasks)]

    @contextlib.contextmanager
    def evaluation_randomness(self, seed: int):
        """Evaluation draws from its own generator, so it never shifts the training stream."""
        training, self.generator = self.generator, torch.Generator().manual_seed(seed)
        try:
            yield
        finally:
            self.generator = training


def summarise_queries(records) -> dict[str, float]:
    queries = distributed.gather_rows(torch.cat([r[0] for r in records]))
    success = distributed.gather_rows(torch.cat([r[1] for r in records]))
    counted = distributed.gather_rows(torch.cat([r[2] for r in records]))
    won = queries[success & counted].float()
    return {
        "attack_success_rate": float((success & counted).sum() / counted.sum()) if counted.any() else float("nan"),
        "mean_queries": float(won.mean()) if len(won) else float("nan"),
        "median_queries": float(won.median()) if len(won) else float("nan"),
        "attacked_examples": float(counted.sum()),
    }


def check_finite(loss: torch.Tensor, ctx: RunContext) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise PluginCallError(f"training loss must be a scalar tensor, got {type(loss).__name__}"
                              f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"the training loss became {loss.item()} at epoch {ctx.epoch + 1}, batch {ctx.batch_index + 1}; "
            f"lower train.lr (now {ctx.config['train']['lr']}) or set train.grad_clip, then start a new run "
            f"(the last saved state in the run directory is intact)"
        )


def check_perturbation(name: str, inputs: torch.Tensor, adversarial, eps: float, norm: str,
                       bounds: tuple[float, float] | None = (0.0, 1.0)) -> None:
    if not isinstance(adversarial, torch.Tensor) or adversarial.shape != inputs.shape:
        shape = tuple(adversarial.shape) if isinstance(adversarial, torch.Tensor) else type(adversarial).__name__
        raise PluginCallError(f"attack {name!r} returned {shape}; expected a tensor of shape {tuple(inputs.shape)}")
    if adversarial.dtype != inputs.dtype or adversarial.device != inputs.device:
        raise PluginCallError(f"attack {name!r} changed dtype/device to {adversarial.dtype}/{adversarial.device}")
    tolerance = 1e-5
    if bounds is not None and (adversarial.min() < bounds[0] - tolerance or adversarial.max() > bounds[1] + tolerance):
        raise PluginCallError(f"attack {name!r} left {list(bounds)}: values in "
                              f"[{adversarial.min():.4f}, {adversarial.max():.4f}]")
    delta = (adversarial - inputs).flatten(1)
    size = {"linf": delta.abs().amax(1), "l2": delta.norm(dim=1), "l1": delta.abs().sum(1)}[norm]
    if len(size) and size.max() > eps * (1 + 1e-4) + tolerance:
        raise PluginCallError(f"attack {name!r} left its {norm} ball: perturbation {size.max():.5f} > eps {eps}")

