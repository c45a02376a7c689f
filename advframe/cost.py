"""Counting work instead of timing it: wall time on a shared machine is noisy, counted work is not.

:class:`GradientCounter` counts gradient evaluations: one per example in every forward pass that
builds a graph (each such pass is followed by one backward pass). A PGD-10 step on a batch of 128
costs 128; TRADES' outer loss (clean and adversarial forward passes) costs 256. Work the hook cannot
see (a second backward pass through one forward pass, double backpropagation) is reported by the
method with ``ctx.count_gradient_evaluations``. Forward passes without a graph are counted apart
(``forward_passes``). CONTRIBUTING.md ("Cost") has the definition.

Query-based (score-based black-box) attacks count queries instead: every model call goes through a
:class:`QueryCounter`. The book-keeping they all share is here too: :func:`check_query_settings`
(the ``budget`` and ``norm`` checks), :class:`QueryBatch` (the clean query, which examples count,
which have succeeded, which can still afford an iteration), :class:`QueryResult` (what an attack
returns and reports to ``ctx.record_queries``) and :func:`run_query_attack` (the
``generate_perturbation`` protocol, ``params["init"/"counter"/"counted"]`` included).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from advframe.attacks import misclassified
from advframe.errors import PluginError


class GradientCounter:
    """Counts, per example, the forward passes of the attached modules: ``count`` those that build a
    graph (gradient evaluations), ``forward_count`` those that do not (e.g. a saliency map's probes)."""

    def __init__(self):
        self.count = 0
        self.forward_count = 0
        self.enabled = True
        self._handles = []

    def attach(self, module: nn.Module) -> None:
        self._handles.append(module.register_forward_hook(self._count))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def add(self, examples: int) -> None:
        if self.enabled:
            self.count += int(examples)

    def _count(self, module, args, output):
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if not self.enabled or not isinstance(logits, torch.Tensor) or logits.dim() == 0:
            return
        if torch.is_grad_enabled() and logits.requires_grad:
            self.count += logits.shape[0]
        else:
            self.forward_count += logits.shape[0]

    @contextlib.contextmanager
    def paused(self):
        """Work done inside the block (evaluation, monitoring) is not training cost."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled


class QueryBudgetExceeded(RuntimeError):
    """An attack asked for more queries than its budget allows (a bug in the attack)."""


class QueryCounter:
    """A model seen as a black box: scores out, no gradients in, every example's queries counted.

    Every query-based attack goes through one of these, so the reported numbers are honest: a call
    on ``k`` examples costs each of those ``k`` examples one query. ``index`` says which examples of
    the attacked batch the rows are (attacks query shrinking subsets).

    :param model: the attacked model.
    :param num_examples: size of the attacked batch.
    :param budget: per-example query budget; asking for more raises :class:`QueryBudgetExceeded`.
    :param scores: ``"logits"`` or ``"probabilities"``. A model that returns only labels (a 1-D
        output) cannot serve a score-based attack: the first query says so in one clear line.
    """

    def __init__(self, model: nn.Module, num_examples: int, *, budget: int | None = None,
                 scores: str = "logits", attack: str = "this attack"):
        self.model = model
        self.counts = torch.zeros(num_examples, dtype=torch.long)
        self.budget = budget
        self.scores = scores
        self.attack = attack

    def __call__(self, inputs: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        index = torch.arange(len(inputs)) if index is None else index.cpu()
        if len(index) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(index)} indices")
        if self.budget is not None and len(index) and (self.counts[index] >= self.budget).any():
            raise QueryBudgetExceeded(f"{self.attack} exceeded its budget of {self.budget} queries per example")
        with torch.no_grad():
            output = self.model(inputs)
        self.counts[index] += 1
        if output.dim() != 2:
            raise PluginError(f"{self.attack} needs class scores from the model, but it returns "
                              f"{tuple(output.shape)} (labels only?); use a decision-based attack instead")
        output = output.detach().float()
        return output.softmax(1) if self.scores == "probabilities" else output

    def remaining(self, index: torch.Tensor) -> torch.Tensor:
        if self.budget is None:
            return torch.full((len(index),), 2**62, dtype=torch.long)
        return self.budget - self.counts[index.cpu()]

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def check_query_settings(name: str, params: dict, norms: tuple[str, ...] = ("linf", "l2")) -> int:
    """The settings every query-based attack shares: ``params["budget"]`` must be a whole number of
    queries >= 1 and ``params["norm"]`` one of ``norms``; each mistake is a one-line
    :class:`~advframe.PluginError` naming the attack. Returns the budget."""
    budget = params["budget"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise PluginError(f"{name}: budget must be a whole number of queries >= 1, got {budget!r}")
    if params["norm"] not in norms:
        raise PluginError(f"{name} supports norm {' or '.join(norms)}, got {params['norm']!r}; "
                          f"set attack.norm to one of them")
    return budget


class QueryResult(NamedTuple):
    """A query-based attack's outcome on one batch, one row per example."""

    adversarial: torch.Tensor  # the returned points (the clean input where the example does not count)
    queries: torch.Tensor  # queries spent per example, the clean query included
    success: torch.Tensor  # reached the goal: wrong class, or the target class
    counted: torch.Tensor  # attacked: the clean input was not already a success

    def report(self, ctx) -> torch.Tensor:
        """Record the queries with ``ctx.record_queries`` and return the adversarial batch (what
        ``generate_perturbation`` returns)."""
        ctx.record_queries(self.queries, self.success, counted=self.counted)
        return self.adversarial


class QueryBatch:
    """One batch under a query-based attack: the book-keeping every such attack shares.

    On creation it makes the :class:`QueryCounter` (unless the caller passes its own, to continue
    its count) and spends the clean query: examples the model already gets wrong (in targeted mode:
    already at the target) are not attacked and do not count. A caller that knows which examples to
    attack passes ``counted`` and no clean query is spent (``clean_scores`` is then None).

    :param budget: per-example query budget of a new counter (the clean query included).
    :param scores: ``"logits"`` or ``"probabilities"``, for a new counter.
    :param attack: the attack's name, for the counter's messages.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, targeted: bool,
                 budget: int | None, attack: str, scores: str = "logits", counter: QueryCounter | None = None,
                 counted: torch.Tensor | None = None):
        self.counter = counter or QueryCounter(model, len(inputs), budget=budget, scores=scores, attack=attack)
        self.inputs, self.labels, self.targeted = inputs.detach(), labels.detach(), targeted
        self.every = torch.arange(len(inputs), device=inputs.device)
        self.success = torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
        self.clean_scores = None
        if counted is None:
            self.clean_scores = self.counter(self.inputs, self.every)
            self.success = misclassified(self.clean_scores, self.labels, targeted)
            counted = ~self.success
        self.counted = counted.to(inputs.device)

    def active(self, needed: int = 1) -> torch.Tensor:
        """Indices of the examples still attacked: counted, not yet successful, and with at least
        ``needed`` queries left (what one more iteration costs)."""
        left = self.counter.remaining(self.every).to(self.inputs.device)
        return self.every[self.counted & ~self.success & (left >= needed)]

    def query(self, points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Query ``points`` (rows of examples ``index``), mark those that succeed there; the scores."""
        scores = self.counter(points, index)
        self.success[index] = misclassified(scores, self.labels[index], self.targeted)
        return scores

    def start(self, delta: torch.Tensor, moved: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query each attacked example's starting point ``inputs + delta``: the examples and their
        scores. With ``moved=False`` (the attack starts at the clean input, no ``init``) the clean
        query already was that point and nothing is spent, unless the caller skipped it."""
        todo = self.active()
        if len(todo) == 0 or (not moved and self.clean_scores is not None):
            return todo, None
        return todo, self.query(self.inputs[todo] + delta[todo], todo)

    def result(self, delta: torch.Tensor) -> QueryResult:
        """``inputs + delta`` for the counted examples (the clean input elsewhere), the counts so far."""
        shape = (-1, *[1] * (self.inputs.dim() - 1))
        adversarial = torch.where(self.counted.view(shape), self.inputs + delta, self.inputs)
        return QueryResult(adversarial.detach(), self.counter.counts.clone(), self.success, self.counted)


def run_query_attack(attack, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, params: dict, ctx,
                     settings) -> torch.Tensor:
    """``generate_perturbation`` of a query-based attack: call ``attack`` (the plugin's function) on the
    batch, report its queries with ``ctx.record_queries`` and return the adversarial batch.

    ``attack`` is called with the threat model (``eps``, ``norm``), the plugin's ``settings`` (names
    of its keyword arguments taken from ``params``: its ``budget``, ``targeted`` and own settings),
    ``generator=ctx.generator``, and what another method may put in ``params``:

    * ``init``: a perturbation shaped like the inputs (projected into the ball), the starting point;
    * ``counter``: the caller's :class:`QueryCounter`, so the attack's queries continue its count;
    * ``counted``: which examples to attack, when the caller knows it (then no clean query).
    """
    result = attack(model, inputs, labels, eps=params["eps"], norm=params["norm"], init=params.get("init"),
                    counter=params.get("counter"), counted=params.get("counted"), generator=ctx.generator,
                    **{key: params[key] for key in settings})
    return result.report(ctx)
