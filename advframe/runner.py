"""One run: build everything from the config, train, evaluate, and keep the run directory.

A run directory holds::

    config.yaml          the resolved configuration
    metrics.jsonl        one line per epoch: losses, accuracies, seconds, counted work
    model.safetensors    weights (extra models under NAME/), metadata: versions and config
    state.safetensors    the last training state (weights, optimizers, RNG, position), for --resume
    results.json         final metrics and the run's cost

The runner owns what every method shares: seeding, device, data order, model mode, backward and
step (unless the method steps itself), the learning-rate schedule, checkpointing, DDP and timing.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advframe import __version__, checkpoint, data, distributed, models
from advframe.config import dump, selected_plugins
from advframe.context import RunContext, make_optimizer
from advframe.episodes import TEST_TASK_SEED, sampler_for
from advframe.errors import CheckpointError, ConfigError, PluginCallError


class DomainBatch(tuple):
    """A domain-adaptation batch: unpacks as ``(source_inputs, source_labels)`` like any batch, and
    carries ``target_inputs`` (unlabelled) and ``target_index`` (for ``ctx.score_pseudo_labels``)."""

    def __new__(cls, inputs, labels, target_inputs, target_index):
        batch = super().__new__(cls, (inputs, labels))
        batch.target_inputs, batch.target_index = target_inputs, target_index
        return batch


RUN_FILES = ("config.yaml", "metrics.jsonl", "model.safetensors", "state.safetensors", "results.json")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available; use device=cpu")
    if name == "cuda" and distributed.launched():
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def learning_rate(base: float, progress: float, train_config: dict, passes: int) -> float:
    """The schedule as a function of training progress in [0, 1] (so replaying methods keep it)."""
    warmup = train_config["warmup_epochs"] / max(passes, 1)
    if warmup and progress < warmup:
        return base * progress / warmup
    kind = train_config["schedule"]
    if kind == "constant":
        return base
    if kind == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "step":
        return base * 0.1 ** sum(progress >= m for m in train_config["milestones"])
    peak = 0.4  # onecycle: linear up to the peak, linear down to zero (Wong et al.'s cyclic rate)
    return base * (progress / peak if progress < peak else (1 - progress) / (1 - peak))


def default_out_dir(config: dict) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config['train']['method']}-{stamp}"
    candidate, suffix = base, 2
    while candidate.exists():
        candidate, suffix = Path(f"{base}-{suffix}"), suffix + 1
    return candidate


def claim_out_dir(out_dir: Path) -> None:
    """A new run may use an empty or new folder, never one that holds a run."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing:
        raise CheckpointError(
            f"{out_dir} already holds a run ({', '.join(existing)}); continue it with "
            f"`advframe run --resume {out_dir}` or choose another --out"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)


class Run:
    """Build with :meth:`start`, :meth:`resume` or :meth:`load`; then :meth:`train` and :meth:`evaluate`."""

    def __init__(self, host, config: dict, out_dir: Path | None, *, progress=None):
        self.host = host
        self.config = config
        self.out_dir = Path(out_dir) if out_dir else None
        self.device = resolve_device(config["device"])
        self.rank, self.world = distributed.init(self.device)
        self.progress = progress if self.rank == 0 else None
        self.roles = selected_plugins(config)
        self.splits = data.load(config["data"])
        torch.manual_seed(config["seed"])
        self.model = self._build_model()
        self.ctx = RunContext(
            config, host, device=self.device, num_classes=self.splits.num_classes,
            input_shape=self.splits.input_shape, out_dir=self.out_dir, model_factory=self._build_model,
            generator=torch.Generator().manual_seed(config["seed"] + 7919 * self.rank), progress=self.progress,
        )
        for name in self._setup_order():
            replacement = self.ctx.call("setup", name, model=self.model)
            if replacement is not None:
                if not isinstance(replacement, nn.Module):
                    raise PluginCallError(f"plugin {name!r}: setup must return an nn.Module or None")
                self.model = replacement.to(self.device)
        self.ctx._add_model_allowed = False
        if not self.splits.train.inputs.dtype.is_floating_point and self.splits.train.inputs.dtype != torch.uint8:
            self.ctx.input_bounds = None  # token ids: attacks perturb embeddings, which have no box
        if self.ctx.episodic or config["meta"]["episodic_training"]:
            self._check_fewshot_split()
        if self.ctx.episodic:
            meta = config["meta"]
            sampler = sampler_for(self.splits.test, meta["ways"], meta["test_shots"], meta["queries"])
            self.ctx.test_tasks = sampler.fixed_tasks(meta["test_tasks"], TEST_TASK_SEED)
        if self.splits.target is not None:
            self.ctx.score_pseudo_labels = self._score_pseudo_labels
        self.ctx.counter.attach(self.model)  # added models attach themselves when counted
        self.train_model = self._distribute(self.model)
        for name in list(self.ctx.models):
            if self.ctx.trainable[name]:
                self.ctx.models[name] = self._distribute(self.ctx.models[name])
        train = config["train"]
        self.ctx.optimizers["model"] = make_optimizer(self.model.parameters(), train)
        for name, module in self.ctx.models.items():
            if self.ctx.trainable[name]:
                self.ctx.optimizers[name] = make_optimizer(module.parameters(), train, self.ctx.extra_lr.get(name))
        self.base_lr = {name: opt.param_groups[0]["lr"] for name, opt in self.ctx.optimizers.items()}
        # position and cost, restored on resume
        self.epoch = 0
        self.batch_index = 0
        self.metrics_lines = 0
        self.epoch_sums: dict[str, float] = {}
        self.spent = {"process_seconds": 0.0, "wall_seconds": 0.0, "gradient_evaluations": 0, "forward_passes": 0}
        self.finished = False

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def start(cls, host, config: dict, out_dir: Path | None = None, *, progress=None) -> Run:
        """A new run; the folder must not already hold one."""
        if distributed.launched():
            distributed.init(resolve_device(config["device"]))
        if distributed.rank() == 0:
            out_dir = Path(out_dir) if out_dir else default_out_dir(config)
            claim_out_dir(out_dir)
        out_dir = Path(distributed.broadcast_text(str(out_dir)))
        run = cls(host, config, out_dir, progress=progress)
        if run.rank == 0:
            checkpoint.atomic_write_text(out_dir / "config.yaml", dump(config))
        return run

    @classmethod
    def resume(cls, host, out_dir: Path, *, progress=None) -> Run:
        """Continue the run in ``out_dir`` from its last saved state."""
        from advframe.config import resolve

        out_dir = Path(out_dir)
        if not (out_dir / "config.yaml").is_file():
            raise CheckpointError(f"{out_dir} is not a run directory (no config.yaml)")
        if not (out_dir / "state.safetensors").is_file():
            raise CheckpointError(f"{out_dir} has no saved training state (state.safetensors) to resume; "
                                  f"start a new run")
        from advframe.config import load_file

        config = resolve(host, load_file(out_dir / "config.yaml"))
        run = cls(host, config, out_dir, progress=progress)
        run._load_state(out_dir / "state.safetensors")
        return run

    @classmethod
    def load(cls, host, weights: Path, config: dict, *, progress=None) -> Run:
        """A trained model, for evaluation and attacks: ``weights`` is a run directory (its
        ``model.safetensors``) or any safetensors file that fits the model ``config`` builds."""
        run = cls(host, config, None, progress=progress)
        weights = Path(weights)
        tensors, _ = checkpoint.load_tensors(weights / "model.safetensors" if weights.is_dir() else weights)
        run._load_weights(tensors, prefix="")
        return run

    def _check_fewshot_split(self) -> None:
        train, test = set(self.splits.train.class_names), set(self.splits.test.class_names)
        if (train & test) - {"background"}:
            raise ConfigError(f"few-shot runs need disjoint train and test classes, but data.name="
                              f"{self.config['data']['name']} shares classes between them; use a few-shot split "
                              f"such as data.name=mnist-fewshot or data.name=omniglot")

    def _task_batch(self, epoch: int, batch_index: int) -> list:
        """The tasks of one meta-batch: a function of (seed, epoch, batch), so a resumed run sees the same."""
        meta = self.config["meta"]
        if not hasattr(self, "_train_sampler"):
            self._train_sampler = sampler_for(self.splits.train, meta["ways"], meta["train_shots"], meta["queries"])
        seed = (self.config["seed"] * 1_000_003 + epoch) * 100_003 + batch_index
        generator = torch.Generator().manual_seed(seed)
        tasks = [self._train_sampler.sample(generator) for _ in range(meta["tasks_per_batch"])]
        return [task.to(self.device) for task in tasks[self.rank::self.world]]

    def _domain_batch(self, batch, epoch: int, batch_index: int, batches: int) -> DomainBatch:
        """Source inputs and labels, plus unlabelled target inputs (``data.target_ratio`` per source image)."""
        target = self.splits.target
        size = len(batch[1]) * self.world * self.config["data"]["target_ratio"]
        passes = epoch * batches + batch_index  # the target cycles through its own seeded orders
        start = passes * size
        indices = []
        while len(indices) < size:
            cycle, offset = divmod(start + len(indices), len(target))
            order = torch.randperm(len(target), generator=torch.Generator().manual_seed(self.config["seed"] * 7 + cycle))
            indices.extend(order[offset: offset + size - len(indices)].tolist())
        index = self._shard(torch.tensor(indices))
        target_inputs, _ = target.batch(index, self.device)  # the target's labels stay here
        return DomainBatch(batch[0], batch[1], target_inputs, index)

    def _score_pseudo_labels(self, target_index: torch.Tensor, pseudo_labels: torch.Tensor) -> float:
        """Accuracy of a method's pseudo-labels on target training images, for logging only."""
        truth = self.splits.target.labels[target_index.cpu()]
        return (pseudo_labels.cpu() == truth).float().mean().item()

    def _build_model(self) -> nn.Module:
        vocabulary = self.splits.train.vocabulary
        return models.build(self.config["model"], self.splits.input_shape, self.splits.num_classes,
                            len(vocabulary) if vocabulary else None).to(self.device)

    def _setup_order(self) -> list[str]:
        names = [self.roles["training"], self.roles["attack"], self.roles["meta"], *self.roles["evaluators"]]
        unique = list(dict.fromkeys(names))
        return [name for name in unique if self.host.implements(name, "setup")]

    def _distribute(self, module: nn.Module) -> nn.Module:
        if self.world == 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def named_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, **{name: models.unwrap(m) for name, m in self.ctx.models.items()}}

    # -- weights and state ------------------------------------------------------------------------

    def _weights(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, module in self.named_modules().items():
            key_prefix = prefix if name == "model" else f"{prefix}{name}/"
            tensors.update({f"{key_prefix}{k}": v for k, v in module.state_dict().items()})
        return tensors

    def _load_weights(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for name, module in self.named_modules().items():
            key_prefix = prefix if name == "model" else f"{prefix}{name}/"
            own = {k[len(key_prefix):]: v for k, v in tensors.items()
                   if k.startswith(key_prefix) and (name != "model" or "/" not in k[len(prefix):])}
            try:
                module.load_state_dict(own)
            except RuntimeError as exc:
                raise CheckpointError(f"the saved weights do not fit the {name!r} model this config builds: "
                                      f"{str(exc).splitlines()[0]}") from None

    def versions(self) -> dict[str, str]:
        names = {self.roles["training"], self.roles["attack"], self.roles["meta"], *self.roles["eval_attacks"],
                 *self.roles["evaluators"], "accuracy"}
        return {name: self.host.infos[name].version for name in sorted(names)}

    def save_model(self) -> None:
        if self.rank != 0:
            return
        metadata = {"format": "advframe-run-1", "advframe_version": __version__,
                    "plugins": json.dumps(self.versions()), "config": dump(self.config)}
        checkpoint.save_tensors(self.out_dir / "model.safetensors", self._weights(""), metadata)

    def save_state(self, finished: bool = False) -> None:
        if self.rank != 0:
            return
        tensors = self._weights("weights/")
        optimizers = {}
        for name, optimizer in self.ctx.optimizers.items():
            flat, rest = checkpoint.flatten_optimizer(f"optim/{name}", optimizer.state_dict())
            tensors.update(flat)
            optimizers[name] = rest
        tensors.update({f"plugin_state/{k}": v for k, v in self.ctx.state.items()})
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["rng/generator"] = self.ctx.generator.get_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        progress = {
            "epoch": self.epoch, "batch_index": self.batch_index, "global_step": self.ctx.global_step,
            "data_passes": self.ctx.data_passes, "metrics_lines": self.metrics_lines,
            "epoch_sums": self.epoch_sums, "spent": self._spent_now(), "finished": finished,
        }
        metadata = {"progress": json.dumps(progress), "optimizers": json.dumps(optimizers),
                    "advframe_version": __version__}
        checkpoint.save_tensors(self.out_dir / "state.safetensors", tensors, metadata)

    def _load_state(self, path: Path) -> None:
        tensors, metadata = checkpoint.load_tensors(path)
        try:
            progress = json.loads(metadata["progress"])
            optimizers = json.loads(metadata["optimizers"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not an advframe training state; start a new run") from None
        self._load_weights(tensors, prefix="weights/")
        for name, optimizer in self.ctx.optimizers.items():
            optimizer.load_state_dict(checkpoint.unflatten_optimizer(f"optim/{name}", tensors, optimizers[name]))
        self.ctx.state = {k[len("plugin_state/"):]: v.to(self.device) for k, v in tensors.items()
                          if k.startswith("plugin_state/")}
        torch.set_rng_state(tensors["rng/torch"])
        self.ctx.generator.set_state(tensors["rng/generator"])
        if self.device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        self.epoch, self.batch_index = progress["epoch"], progress["batch_index"]
        self.ctx.global_step, self.ctx.data_passes = progress["global_step"], progress["data_passes"]
        self.metrics_lines, self.epoch_sums = progress["metrics_lines"], progress["epoch_sums"]
        self.spent = progress["spent"]
        self.ctx.counter.count = int(self.spent["gradient_evaluations"])
        self.ctx.counter.forward_count = int(self.spent.setdefault("forward_passes", 0))
        self.finished = progress.get("finished", False)
        metrics = self.out_dir / "metrics.jsonl"
        if self.rank == 0 and metrics.exists():  # drop lines written after the state we resume from
            lines = metrics.read_text().splitlines(keepends=True)[: self.metrics_lines]
            checkpoint.atomic_write_text(metrics, "".join(lines))

    # -- training -------------------------------------------------------------------------------

    def _spent_now(self) -> dict[str, float]:
        now = {"process_seconds": time.process_time(), "wall_seconds": time.perf_counter()}
        spent = {k: self.spent[k] + now[k] - self._clock[k] for k in now} if hasattr(self, "_clock") else dict(self.spent)
        spent["gradient_evaluations"] = self.ctx.counter.count
        spent["forward_passes"] = self.ctx.counter.forward_count
        return spent

    def _shard(self, index: torch.Tensor) -> torch.Tensor:
        return index[self.rank::self.world] if self.world > 1 else index

    def train(self) -> None:
        if self.finished:
            return
        config, ctx = self.config, self.ctx
        train = self.splits.train
        batch_size = config["train"]["batch_size"]
        episodic = config["meta"]["episodic_training"]
        meta = config["meta"]
        batches = math.ceil((meta["tasks_per_epoch"] / meta["tasks_per_batch"]) if episodic else len(train) / batch_size)
        method = self.roles["training"]
        checkpoint_every = config["train"]["checkpoint_every"]
        self._clock = {"process_seconds": time.process_time(), "wall_seconds": time.perf_counter()}
        self.model.train()
        for epoch in range(self.epoch, ctx.data_passes):
            self.epoch = ctx.epoch = epoch
            epoch_start = time.perf_counter()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config["seed"] * 100003 + epoch))
            task = self.progress.add_task(f"epoch {epoch + 1}/{ctx.data_passes}", total=batches,
                                          completed=self.batch_index) if self.progress else None
            for batch_index in range(self.batch_index, batches):
                ctx.batch_index = batch_index
                if episodic:
                    batch = self._task_batch(epoch, batch_index)
                    count = len(batch)
                else:
                    index = self._shard(order[batch_index * batch_size:(batch_index + 1) * batch_size])
                    inputs, labels = train.batch(index, self.device)
                    batch = (data.augment(inputs, config["data"]["augment"], ctx.generator), labels)
                    count = len(labels)
                    if self.splits.target is not None:
                        batch = self._domain_batch(batch, epoch, batch_index, batches)
                progress = (epoch + batch_index / batches) / ctx.data_passes
                for name, optimizer in ctx.optimizers.items():
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(self.base_lr[name], progress, config["train"], ctx.data_passes)
                ctx._stepped = False
                output = ctx.call("training_step", method, model=self.train_model, batch=batch,
                                  optimizer=ctx.optimizers["model"], perturb=ctx.perturb)
                loss, logs = _split_output(method, output)
                if not ctx._stepped:
                    if not loss.requires_grad:
                        raise PluginCallError(f"plugin {method!r}: training_step returned a loss without a "
                                              f"gradient and did not call ctx.step")
                    ctx.step(loss)
                self._accumulate({"loss": loss.item(), **logs}, count)
                ctx.global_step += 1
                self.batch_index = batch_index + 1
                if task is not None:
                    self.progress.update(task, advance=1, description=f"epoch {epoch + 1}/{ctx.data_passes} "
                                         f"loss {self.epoch_sums['loss'] / self.epoch_sums['_count']:.3f}")
                if checkpoint_every and ctx.global_step % checkpoint_every == 0 and self.batch_index < batches:
                    self.save_state()
            if task is not None:
                self.progress.remove_task(task)
            self._end_epoch(epoch, time.perf_counter() - epoch_start)
        self.finished = True
        self.save_model()
        self.save_state(finished=True)

    def _accumulate(self, logs: dict[str, float], count: int) -> None:
        for key, value in logs.items():
            self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + float(value) * count
        self.epoch_sums["_count"] = self.epoch_sums.get("_count", 0.0) + count

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        sums = distributed.sum_values(self.epoch_sums)
        count = sums.pop("_count", 1.0) or 1.0
        line: dict[str, Any] = {"epoch": epoch + 1, **{k: v / count for k, v in sums.items()}}
        line["lr"] = self.ctx.optimizers["model"].param_groups[0]["lr"]
        line.update(self._monitor(epoch))
        spent = distributed.sum_values(self._spent_now())
        line["gradient_evaluations"] = int(spent["gradient_evaluations"])
        line["seconds"] = round(seconds, 3)
        line["process_seconds"] = round(spent["process_seconds"], 3)
        self.epoch, self.batch_index, self.epoch_sums = epoch + 1, 0, {}
        if self.rank == 0:
            path = self.out_dir / "metrics.jsonl"
            previous = path.read_text() if path.exists() else ""
            checkpoint.atomic_write_text(path, previous + json.dumps(line) + "\n")
        self.metrics_lines += 1
        self.save_model()
        self.save_state()

    def _monitor(self, epoch: int) -> dict[str, float]:
        """Clean and robust accuracy on a few held-out images after every epoch (robust overfitting)."""
        size = self.config["train"]["monitor_examples"]
        if not size:
            return {}
        if self.ctx.episodic:
            return self._monitor_tasks(size)
        split = self.splits.validation or self.splits.test
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(data.SPLIT_SEED))
        subset = split.subset(order[:size].sort().values)  # splits are often sorted by class
        name = "validation" if self.splits.validation is not None else "test"
        attacks = self.config["eval"]["attacks"][:1]  # the first entry (the protocols' PGD-20) is cheap
        with self.ctx.evaluation_randomness(self.config["seed"] + 1000 + epoch):
            clean = self.ctx.predictions(self.model, subset)
            robust = [self.ctx.predictions(self.model, subset, attack) for attack in attacks]
        self.ctx.clear_predictions()
        self.model.train()
        line = {f"{name}_clean_accuracy": clean.correct.float().mean().item()}
        for predictions in robust:
            line[f"{name}_robust_accuracy"] = (predictions.correct & clean.correct).float().mean().item()
        return line

    def _monitor_tasks(self, size: int) -> dict[str, float]:
        """Few-shot runs: clean and robust accuracy on the first test tasks (about ``size`` queries)."""
        meta = self.config["meta"]
        tasks, self.ctx.test_tasks = self.ctx.test_tasks, self.ctx.test_tasks[: max(1, size // (meta["ways"] * meta["queries"]))]
        try:
            with self.ctx.evaluation_randomness(self.config["seed"] + 1000 + self.epoch):
                clean = self.ctx.task_correct(self.model)
                robust = [self.ctx.task_correct(self.model, attack) for attack in self.config["eval"]["attacks"][:1]]
        finally:
            self.ctx.test_tasks = tasks
            self.ctx.clear_predictions()
            self.model.train()
        line = {"test_clean_accuracy": torch.cat(clean).float().mean().item()}
        for correct in robust:
            line["test_robust_accuracy"] = torch.cat([a & c for a, c in zip(correct, clean)]).float().mean().item()
        return line

    # -- evaluation ----------------------------------------------------------------------------------

    def evaluators(self) -> list[str]:
        names = ["accuracy", self.roles["training"], self.roles["attack"], self.roles["meta"], *self.roles["evaluators"]]
        return [n for n in dict.fromkeys(names) if self.host.implements(n, "evaluate")]

    def evaluate(self) -> dict[str, Any]:
        dataset = self.splits.test
        limit = self.config["eval"]["max_examples"]
        if limit and limit < len(dataset):
            # a fixed random subset, the same for every run and seed: the splits are stored class by
            # class, so the first examples would be a few classes only
            chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
            dataset = dataset.subset(chosen.sort().values)
        self.model.eval()
        start = {"process_seconds": time.process_time(), "wall_seconds": time.perf_counter()}
        metrics: dict[str, Any] = {}
        owner: dict[str, str] = {}
        with self.ctx.evaluation_randomness(self.config["seed"] + 999), self.ctx.counter.paused():
            for name in self.evaluators():
                result = self.ctx.call("evaluate", name, model=self.model, dataset=dataset)
                for key, value in _check_metrics(name, result).items():
                    if key in metrics:
                        raise PluginCallError(f"metric {key!r} is returned by both {owner[key]!r} and {name!r}; "
                                              f"one of them must rename it")
                    metrics[key], owner[key] = value, name
        self.ctx.clear_predictions()
        return {"metrics": metrics, "eval_process_seconds": time.process_time() - start["process_seconds"],
                "eval_wall_seconds": time.perf_counter() - start["wall_seconds"], "eval_examples": len(dataset)}

    def results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
        spent = self._spent_now()
        # every process works: its counted passes and its CPU time add up (wall time does not)
        summed = distributed.sum_values({"g": spent["gradient_evaluations"], "f": spent["forward_passes"],
                                         "p": spent["process_seconds"], "e": evaluation["eval_process_seconds"]})
        gradient_evaluations = int(summed["g"])
        return {
            "metrics": evaluation["metrics"],
            "evaluation": evaluation_summary(self.config["eval"]),
            "cost": {
                "gradient_evaluations": gradient_evaluations,
                "natural_epoch_equivalents": gradient_evaluations / max(len(self.splits.train), 1),
                "forward_passes": int(summed["f"]),
                "process_seconds": summed["p"],
                "wall_seconds": spent["wall_seconds"],
                "eval_process_seconds": summed["e"],
                "eval_wall_seconds": evaluation["eval_wall_seconds"],
            },
            "eval_examples": evaluation["eval_examples"],
            "train_examples": len(self.splits.train),
            "world_size": self.world,
            "advframe_version": __version__,
            "plugins": self.versions(),
        }

    def execute(self) -> dict[str, Any]:
        """Train, evaluate, write ``results.json``; the results."""
        self.train()
        results = self.results(self.evaluate())
        if self.rank == 0:
            checkpoint.atomic_write_text(self.out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        return results


def evaluation_summary(eval_config: dict) -> dict[str, Any]:
    """What the headline robust accuracy is, for results files and tables."""
    labels = [attack["label"] for attack in eval_config["attacks"]]
    return {"protocol": eval_config["protocol"], "attacks": labels, "cascade": eval_config["cascade"],
            "robust_accuracy": "per-example worst case over " + (", ".join(labels) or "no attack (clean only)")}


def _split_output(method: str, output) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(output, torch.Tensor):
        return output, {}
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        logs = {}
        for key, value in output.items():
            if key == "loss":
                continue
            value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise PluginCallError(f"plugin {method!r}: training_step log {key!r} must be a number")
            logs[key] = float(value)
        return output["loss"], logs
    raise PluginCallError(f"plugin {method!r}: training_step must return a loss tensor or a dict with 'loss'")


def _check_metrics(name: str, result) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise PluginCallError(f"plugin {name!r}: evaluate must return a dict of metrics, got {type(result).__name__}")
    checked = {}
    for key, value in result.items():
        if not isinstance(key, str):
            raise PluginCallError(f"plugin {name!r}: metric names must be strings, got {key!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            checked[key] = [float(v) for v in value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            checked[key] = float(value)
        else:
            raise PluginCallError(f"plugin {name!r}: metric {key!r} must be a float or a list of floats, got {value!r}")
    return checked


def load_trained_model(host, run_dir: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model a run directory holds, in eval mode (e.g. a surrogate for a transfer attack)."""
    from advframe.config import load_file, resolve

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    config = resolve(host, load_file(run_dir / "config.yaml"), [f"device={torch.device(device).type}"])
    run = Run.load(host, run_dir / "model.safetensors", config)
    return run.model.eval()
