"""Gradient-based adaptation shared by MAML-family meta-learners, through ``torch.func``.

:func:`inner_loop` takes ``steps`` gradient steps on a task's support set from the model's current
parameters and returns the adapted parameters as a dict; with ``first_order=False`` the steps stay in
the autograd graph (``create_graph=True``), so a query loss computed with them differentiates through
the adaptation (second-order MAML). The model itself is never changed. :class:`AdaptedModel` is the
adapted predictor as an ``nn.Module`` (attacks and evaluation take modules).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def functional_forward(model: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)`` with ``params`` in place of its parameters (buffers are the model's own)."""
    return functional_call(model, params, (inputs,))


def inner_loop(model: nn.Module, support: tuple[torch.Tensor, torch.Tensor], *, steps: int, lr: float,
               first_order: bool, params: dict[str, torch.Tensor] | None = None,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> dict[str, torch.Tensor]:
    """Adapted parameters after ``steps`` SGD steps of size ``lr`` on ``support``."""
    inputs, labels = support
    params = dict(params or parameters_of(model))
    for _ in range(steps):
        loss = loss_fn(functional_forward(model, params, inputs), labels)
        names = [name for name, value in params.items() if value.requires_grad]
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order,
                                    allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                params[name] = params[name] - lr * (grad.detach() if first_order else grad)
    return params


class AdaptedModel(nn.Module):
    """The model with adapted parameters, as a module (for evaluation and attacks)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.params = {name: value.detach() for name, value in params.items()}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return functional_forward(self.model, self.params, inputs)


@contextlib.contextmanager
def batch_statistics(model: nn.Module, active: bool = True):
    """Every BatchNorm layer normalises with the statistics of the batch it sees, running buffers
    neither read nor written (MAML's transductive convention); ``active=False`` changes nothing."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if active else []
    saved = [(m.training, m.track_running_stats) for m in layers]
    for layer in layers:
        layer.training, layer.track_running_stats = True, False
    try:
        yield model
    finally:
        for layer, (training, tracking) in zip(layers, saved):
            layer.training, layer.track_running_stats = training, tracking


class TaskPredictor(AdaptedModel):
    """The adapted parameters as a module, on the task's first ``ways`` logits (an N-way head inside
    a wider one), with BatchNorm on batch statistics when ``transductive``."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], transductive: bool, ways: int):
        super().__init__(model, params)
        self.transductive, self.ways = transductive, ways

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with batch_statistics(self.model, self.transductive):
            return super().forward(inputs)[:, : self.ways]


def maml_run_defaults() -> dict:
    """``run_defaults`` of a MAML-family meta-learner: episodic training on the embedded MNIST few-shot
    split with Conv-4, no weight decay, a constant learning rate, and PGD-20 without early stop at
    evaluation (BatchNorm is transductive, so an example's prediction depends on its batch)."""
    return {"data": {"name": "mnist-fewshot"}, "model": {"name": "conv4"},
            "train": {"weight_decay": 0.0, "schedule": "constant"},
            "meta": {"episodic_training": True},
            "eval": {"attacks": [{"name": "pgd", "steps": 20, "stop_on_success": False}]}}
