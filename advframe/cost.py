"""Counting work instead of timing it: wall time on a shared machine is noisy, counted work is not.

:class:`GradientCounter` counts gradient evaluations: one per example in every forward pass that
builds a graph (each such pass is followed by one backward pass). A PGD-10 step on a batch of 128
costs 128; TRADES' outer loss (clean and adversarial forward passes) costs 256. Forward passes under
``torch.no_grad`` cost nothing here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class GradientCounter:
    def __init__(self):
        self.count = 0
        self.enabled = True
        self._handles = []

    def attach(self, module: nn.Module) -> None:
        self._handles.append(module.register_forward_hook(self._count))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count(self, module, args, output):
        if self.enabled and torch.is_grad_enabled():
            logits = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(logits, torch.Tensor) and logits.requires_grad and logits.dim() > 0:
                self.count += logits.shape[0]

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
        from advframe.errors import PluginError

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
