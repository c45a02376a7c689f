"""Few-shot episodes: N-way K-shot tasks with q queries per class, drawn from one split's classes.

Meta-training draws tasks from the training split with ``meta.train_shots`` shots, meta-testing from
the test split (disjoint classes) with ``meta.test_shots``; every draw comes from a seeded generator,
and the test tasks are the same for every run and method (a fixed seed), so methods are compared on
identical tasks. Labels inside a task are 0..N-1 in a random order; ``classes`` keeps the split's
class indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from advframe.data import ArrayDataset
from advframe.errors import ConfigError

TEST_TASK_SEED = 20231


@dataclass
class Task:
    support_inputs: torch.Tensor
    support_labels: torch.Tensor
    query_inputs: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor

    @property
    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.support_inputs, self.support_labels

    @property
    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_inputs, self.query_labels

    @property
    def ways(self) -> int:
        return len(self.classes)

    def to(self, device) -> Task:
        return Task(self.support_inputs.to(device), self.support_labels.to(device), self.query_inputs.to(device),
                    self.query_labels.to(device), self.classes)


class EpisodeSampler:
    """Tasks of ``ways`` classes, ``shots`` support and ``queries`` query examples per class."""

    def __init__(self, dataset: ArrayDataset, ways: int, shots: int, queries: int):
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.members = [(dataset.labels == c).nonzero().flatten() for c in range(dataset.num_classes)]
        usable = [c for c, m in enumerate(self.members) if len(m) >= shots + queries]
        if len(usable) < ways:
            raise ConfigError(
                f"{ways}-way {shots}-shot tasks with {queries} queries need {ways} classes with at least "
                f"{shots + queries} examples each; this split has {len(usable)} such classes "
                f"(lower meta.ways, the shots or meta.queries)")
        self.usable = torch.tensor(usable)

    def sample(self, generator: torch.Generator) -> Task:
        chosen = self.usable[torch.randperm(len(self.usable), generator=generator)[: self.ways]]
        support, query = [], []
        for members in (self.members[c] for c in chosen):
            picked = members[torch.randperm(len(members), generator=generator)[: self.shots + self.queries]]
            support.append(picked[: self.shots])
            query.append(picked[self.shots:])
        support_index, query_index = torch.cat(support), torch.cat(query)
        support_inputs, _ = self.dataset.batch(support_index)
        query_inputs, _ = self.dataset.batch(query_index)
        support_labels = torch.arange(self.ways).repeat_interleave(self.shots)
        query_labels = torch.arange(self.ways).repeat_interleave(self.queries)
        return Task(support_inputs, support_labels, query_inputs, query_labels, chosen)

    def fixed_tasks(self, count: int, seed: int = TEST_TASK_SEED) -> list[Task]:
        generator = torch.Generator().manual_seed(seed)
        return [self.sample(generator) for _ in range(count)]


def mean_and_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean over tasks and the half-width of its 95% confidence interval (1.96 std / sqrt(n))."""
    values = values.double()
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(len(values)))


def sampler_for(dataset: ArrayDataset, ways: int, shots: int, queries: int):
    """Classification tasks, or 1-way segmentation tasks when the labels are label maps."""
    if dataset.labels.dim() == 3:
        from advframe.segmentation import SegmentationSampler

        return SegmentationSampler(dataset, shots, queries)
    return EpisodeSampler(dataset, ways, shots, queries)
