"""Per-example losses shared by attacks and training methods (reduce them yourself)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kl_to_clean(logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """KL(p(x) || p(x')) per example: the clean distribution is the target (TRADES' direction).

    Gradients flow through both arguments; detach ``clean_logits`` where a method wants it fixed.
    """
    return F.kl_div(F.log_softmax(logits, 1), F.softmax(clean_logits, 1), reduction="none").sum(1)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: best other logit minus the label's (positive = misclassified)."""
    label_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.max(1).values - label_logit


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) per example, in nats."""
    log_p = F.log_softmax(logits, 1)
    return -(log_p.exp() * log_p).sum(1)


def uniform_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(p || uniform) per example = log K - entropy(p): minimising it maximises entropy."""
    return math.log(logits.shape[1]) - entropy(logits)
