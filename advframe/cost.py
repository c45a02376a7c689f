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
