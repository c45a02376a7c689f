"""``protonet``: Prototypical Networks (Snell, Swersky, Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017, arXiv:1703.05175; code: jakesnell/prototypical-networks).

A class is represented by its prototype, the mean embedding of its support examples; a query is
classified by a softmax over negative *squared* Euclidean distances to the prototypes::

    c_k = mean_{(x, y) in S, y = k} g(x)        p(y = k | x) ∝ exp(-||g(x) - c_k||²)

Training is episodic: each step draws tasks from the training classes and minimises the cross-entropy
of the query examples (averaged over the tasks of the batch). As in the official code, the support
and query images of an episode go through the embedding in one forward pass (BatchNorm in train
mode sees both). Adaptation (``adapt_task``) has no gradient steps: it computes the prototypes of the
support with the embedding in eval mode, detaches them, and returns a module that embeds queries with
the meta-trained embedding ``advframe.models.embed(model, x)`` (``model.features`` for conv4 and
resnet12), so an attack on the query differentiates through the embedding. The model's own
classifier layer is never used.

The official Omniglot recipe trains with more ways (60) and fewer queries (5) than it tests with
(5 or 20 ways, 15 queries). ``meta.ways`` and ``meta.queries`` are shared by training and testing, so
``train_ways`` / ``train_queries`` set the training episodes; when they differ from the ``meta``
section the plugin draws its own training episodes from the training split (seeded by seed, epoch
and batch, like the runner's), otherwise it trains on the runner's episodes. It also draws its own
episodes when the runner hands it a plain minibatch (``meta.episodic_training: false``): the
minibatches then only pace the steps.

Defaults of a run (``run_defaults``): ``data.name: mnist-fewshot``, ``model.name: conv4``,
``meta.episodic_training: true``, ``meta.tasks_per_batch: 1`` (one episode per Adam step, as the
official code). The official code halves Adam's learning rate every 2,000 episodes; here the core's
``train.schedule`` applies. Training never calls the model's forward (only its embedding), so
``setup`` attaches the core's gradient counter to ``model.features`` to count the training cost.

Settings (``plugins.protonet``)::

    train_ways: 0       # classes per training episode; 0 = meta.ways (official Omniglot recipe: 60)
    train_queries: 0    # query examples per class in training episodes; 0 = meta.queries (official: 5)
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from advframe import PluginError, distributed, hookimpl
from advframe.data import load as load_data
from advframe.episodes import EpisodeSampler, Task
from advframe.errors import ConfigError
from advframe.models import embed, eval_mode, unwrap

_SAMPLERS: dict[tuple, EpisodeSampler] = {}  # training split of one data config -> episode sampler


@hookimpl
def default_config():
    return {"train_ways": 0, "train_queries": 0}


@hookimpl
def run_defaults():
    return {"data": {"name": "mnist-fewshot"}, "model": {"name": "conv4"},
            "meta": {"episodic_training": True, "tasks_per_batch": 1}}


def check_settings(settings: dict) -> None:
    if settings["train_ways"] == 1 or settings["train_ways"] < 0:
        raise PluginError(f"protonet: plugins.protonet.train_ways must be 0 (= meta.ways) or at least 2, "
                          f"got {settings['train_ways']}")
    if settings["train_queries"] < 0:
        raise PluginError(f"protonet: plugins.protonet.train_queries must be 0 (= meta.queries) or at least 1, "
                          f"got {settings['train_queries']}")


@hookimpl
def setup(model, ctx):
    check_settings(ctx.settings)
    features = getattr(unwrap(model), "features", None)
    if ctx.config["train"]["method"] == ctx.current_plugin and isinstance(features, nn.Module):
        # The core counts gradient evaluations at the model's forward; training here only runs the
        # embedding (``model.features``), so the count is taken there (once per example per pass).
        ctx.counter.attach(features)
    return None


# -- the method ----------------------------------------------------------------------------------

def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean embedding of each class ``0..ways-1`` (``ways x dim``)."""
    members = F.one_hot(labels, ways).to(embeddings.dtype)
    counts = members.sum(0)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise PluginError(f"protonet: the support has no example of classes {missing}; "
                          f"every class 0..{ways - 1} needs at least one")
    return members.t() @ embeddings / counts[:, None]


def squared_distances(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``||e_i - c_k||²`` for every row ``i`` of ``embeddings`` and every centre ``k``."""
    return (embeddings[:, None, :] - centres[None, :, :]).pow(2).sum(-1)


def episode_logits(model: nn.Module, task: Task) -> torch.Tensor:
    """Query logits of one episode: support and query embedded in one pass, as the official code."""
    support_inputs, support_labels = task.support
    embedded = embed(model, torch.cat([support_inputs, task.query_inputs]))
    centres = prototypes(embedded[: len(support_inputs)], support_labels, task.ways)
    return -squared_distances(embedded[len(support_inputs):], centres)


class PrototypeClassifier(nn.Module):
    """The adapted predictor: logits are negative squared distances to fixed (detached) prototypes,
    computed on the embedding of the meta-trained model (always in eval mode, so predicting never
    moves its BatchNorm statistics), through which attacks differentiate."""

    def __init__(self, model: nn.Module, centres: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("prototypes", centres.detach())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model):
            return -squared_distances(embed(self.model, inputs), self.prototypes)


# -- training episodes -----------------------------------------------------------------------------

def episode_shape(ctx) -> tuple[int, int]:
    meta, settings = ctx.config["meta"], ctx.settings
    return settings["train_ways"] or meta["ways"], settings["train_queries"] or meta["queries"]


def own_sampler(ctx, ways: int, queries: int) -> EpisodeSampler:
    """Episodes of the training split (the split the runner trains on: same data config, same images)."""
    data_config = ctx.config["data"]
    key = (json.dumps(data_config, sort_keys=True, default=str), ways, ctx.config["meta"]["train_shots"], queries)
    if key not in _SAMPLERS:
        _SAMPLERS.clear()  # one run at a time: keep one split in memory
        try:
            _SAMPLERS[key] = EpisodeSampler(load_data(data_config).train, ways, key[2], queries)
        except ConfigError as exc:
            raise PluginError(f"protonet: training episodes of {ways} ways and {queries} queries do not fit the "
                              f"training split ({exc}); lower plugins.protonet.train_ways or train_queries") from None
    return _SAMPLERS[key]


def training_tasks(batch, ctx) -> list[Task]:
    """The runner's episodes when they have the training shape, else episodes drawn here."""
    ways, queries = episode_shape(ctx)
    if isinstance(batch, list) and batch and all(isinstance(t, Task) for t in batch):
        if batch[0].ways == ways and len(batch[0].query_labels) == ways * queries:
            return batch
        count = len(batch)
    else:
        count = ctx.config["meta"]["tasks_per_batch"]
    sampler = own_sampler(ctx, ways, queries)
    # a function of (seed, epoch, batch, rank), so a resumed run draws the same episodes
    seed = ((ctx.config["seed"] * 1_000_003 + ctx.epoch) * 100_003 + ctx.batch_index) * 1009 + distributed.rank()
    generator = torch.Generator().manual_seed(seed + 17)
    return [sampler.sample(generator).to(ctx.device) for _ in range(count)]


@hookimpl
def training_step(model, batch, ctx):
    tasks = training_tasks(batch, ctx)
    losses, correct, total = [], 0.0, 0
    for task in tasks:
        logits = episode_logits(model, task)
        losses.append(F.cross_entropy(logits, task.query_labels))
        correct += (logits.detach().argmax(1) == task.query_labels).sum().item()
        total += len(task.query_labels)
    return {"loss": torch.stack(losses).mean(), "query_accuracy": correct / total,
            "train_ways": float(tasks[0].ways)}


@hookimpl
def adapt_task(model, support):
    inputs, labels = support
    ways = int(labels.max()) + 1
    model = unwrap(model)
    with eval_mode(model), torch.no_grad():
        centres = prototypes(embed(model, inputs), labels, ways)
    return PrototypeClassifier(model, centres)
