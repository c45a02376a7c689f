"""Few-shot classification on Omniglot alphabets held out from training: MAML, ProtoNet and RFS.

The RFS claim (Tian et al., ECCV 2020): a supervised embedding of all training classes with a linear
probe per task matches or beats meta-learners, and born-again distillation adds a little more. This
script measures it on 5-way 1-shot and 20-way 1-shot tasks drawn from alphabets no method trains on,
with one backbone (conv4) and one data split for every method, 3 seeds (seeds change the training;
every method is tested on the same fixed tasks):

* ``ProtoNet``: ``protonet`` trained on 60-way 1-shot episodes with 5 queries (the official Omniglot
  recipe's width), one episode per Adam step; one training serves both test settings.
* ``RFS-simple`` / ``RFS-distill``: one ``rfs`` run with one born-again generation. Its teacher is the
  generation-0 network, i.e. exactly what a ``generations: 0`` run with the same seed trains (the
  rfs tests check this), so RFS-simple is evaluated from it and costs the first half of the run.
  The probe is fit on 5 augmented copies of each support image, as the official protocol.
* ``FOMAML`` (when the ``maml`` plugin is installed): first-order MAML, trained separately for each
  setting (its head has one output per way) with the paper's Omniglot inner loops (5-way: 1 step of
  0.4; 20-way: 5 steps of 0.1), 4 tasks per meta-batch, 10 inner steps at test time.
* Ablations of RFS-simple, evaluation only (same weights): without L2 normalisation, without the
  support augmentation.

Every meta-learner gets the same training budget in counted gradient evaluations: one RFS generation
(``--epochs`` passes over the training split); episodes per run are set to match. Cost columns are the
core's counts (training only; evaluation is not counted) and process / wall seconds. The training
accuracy column is each method's own objective at its last epoch (RFS: classification over all
training classes; ProtoNet: 60-way query accuracy; MAML: query accuracy after the inner loop): how far
each optimisation got within the budget.

The data are the small Omniglot background sets (``images_background_small1/2``: 8 alphabets once
merged, 183 characters in training, Sanskrit and Tagalog held out by default) under ``--root``
(default ``../shared/data/omniglot`` relative to the repository), 28x28, each rotation by a multiple
of 90 degrees a class of its own (Vinyals et al.'s protocol, used by ProtoNet and MAML; train and test
alike): 732 training classes, 18,640 images. Usage::

    flock /tmp/advframe-bench.lock python benchmarks/fewshot.py --out /tmp/fewshot [--seeds 3] [--epochs 3]

Finished runs and evaluations are kept under ``--out``, so a stopped benchmark continues where it
stopped. The tables are printed and written to ``OUT/fewshot.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advframe import config as config_module
from advframe import data
from advframe.checkpoint import atomic_write_text
from advframe.errors import AdvframeError
from advframe.plugins import make_plugin_host
from advframe.runner import Run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "omniglot"
SETTINGS = {"5-way 1-shot": 5, "20-way 1-shot": 20}


@dataclass
class Training:
    """One training recipe; ``per_setting`` recipes train once per test setting (N-way heads)."""

    name: str
    plugin: str
    overrides: list[str]
    per_setting: dict[str, list[str]] | None = None


@dataclass
class Variant:
    """One reported predictor: a trained run, evaluated as it is or with evaluation-only changes."""

    label: str
    training: str
    overrides: list[str] = field(default_factory=list)
    teacher: bool = False  # evaluate the run's teacher (RFS: the generation-0 network)


def trainings(budget: int, epochs: int, train_queries: int, queries: int, with_maml: bool) -> list[Training]:
    episode = 60 * (1 + train_queries)
    recipes = [
        Training("protonet", "protonet", ["plugins.protonet.train_ways=60", f"plugins.protonet.train_queries={train_queries}",
                                          "meta.tasks_per_batch=1", f"meta.tasks_per_epoch={max(1, budget // episode // epochs)}"]),
        Training("rfs", "rfs", ["plugins.rfs.generations=1"]),
    ]
    if with_maml:
        per_setting = {}
        for setting, ways in SETTINGS.items():
            steps, inner_lr = (1, 0.4) if ways == 5 else (5, 0.1)
            per_task = ways * steps + ways * queries  # support passes of the inner loop, then the query
            tasks = max(4, budget // per_task // epochs // 4 * 4)
            per_setting[setting] = [f"plugins.maml.inner_steps={steps}", f"plugins.maml.inner_lr={inner_lr}",
                                    f"meta.tasks_per_epoch={tasks}"]
        recipes.append(Training("maml", "maml", ["plugins.maml.first_order=true", "plugins.maml.test_inner_steps=10",
                                                 "meta.tasks_per_batch=4"], per_setting))
    return recipes


VARIANTS = [
    Variant("FOMAML", "maml"),
    Variant("ProtoNet", "protonet"),
    Variant("RFS-simple", "rfs", teacher=True),
    Variant("RFS-distill", "rfs"),
    Variant("RFS-simple, no L2 normalisation", "rfs", ["plugins.rfs.normalize=false"], teacher=True),
    Variant("RFS-simple, no support augmentation", "rfs", ["plugins.rfs.support_augmentations=0"], teacher=True),
]


def setting_overrides(setting: str, tasks: dict[str, int]) -> list[str]:
    return [f"meta.ways={SETTINGS[setting]}", "meta.test_shots=1", f"meta.test_tasks={tasks[setting]}"]


def train(host, recipe: Training, setting: str | None, seed: int, shared: list[str], tasks, out: Path) -> Path:
    """Train (or keep) one run; its directory."""
    first = setting or next(iter(SETTINGS))
    run_dir = out / "runs" / (recipe.name if recipe.per_setting is None else f"{recipe.name}-{SETTINGS[first]}way") / f"seed-{seed}"
    if (run_dir / "results.json").exists():
        return run_dir
    # the run's own evaluation is a single task: every reported number comes from evaluate() below
    overrides = [*shared, *setting_overrides(first, tasks), "meta.test_tasks=1", *recipe.overrides,
                 *((recipe.per_setting or {}).get(first, [])), f"seed={seed}"]
    config = config_module.resolve(host, {}, overrides, recipe.plugin)
    print(f"train {run_dir.relative_to(out)}", flush=True)
    if (run_dir / "state.safetensors").exists():
        run = Run.resume(host, run_dir)
    else:
        if run_dir.exists():
            for leftover in run_dir.iterdir():
                leftover.unlink()
        run = Run.start(host, config, run_dir)
    run.execute()
    return run_dir


def evaluate(host, run_dir: Path, variant: Variant, setting: str, tasks, out: Path) -> dict:
    """Clean (and attacked) accuracy of one variant on one setting's fixed test tasks (cached)."""
    cache = out / "evaluations" / f"{run_dir.parent.name}-{run_dir.name}-{variant.label}-{SETTINGS[setting]}way.json"
    cache = cache.with_name(cache.name.replace(" ", "_").replace(",", ""))
    if cache.exists():
        return json.loads(cache.read_text())
    trained = config_module.load_file(run_dir / "config.yaml")
    overrides = [*setting_overrides(setting, tasks), *variant.overrides]
    config = config_module.resolve(host, trained, overrides)
    print(f"evaluate {variant.label}, {setting}, {run_dir.parent.name}/{run_dir.name}", flush=True)
    run = Run.load(host, run_dir, config)
    if variant.teacher:
        run.model.load_state_dict(run.ctx.models["teacher"].state_dict())
    metrics = run.evaluate()["metrics"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(metrics) + "\n")
    return metrics


def training_cost(run_dir: Path, teacher: bool) -> dict[str, float]:
    """Counted gradient evaluations, seconds, and the training accuracy of the last epoch (on the
    method's own objective); for the teacher, those of generation 0 only."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cost = json.loads((run_dir / "results.json").read_text())["cost"]
    last, share = lines[-1], 1.0
    if teacher:
        generations = config_module.load_file(run_dir / "config.yaml")["plugins"]["rfs"]["generations"]
        last = lines[len(lines) // (generations + 1) - 1]
        share = last["epoch"] / len(lines)
    accuracy = last.get("train_accuracy", last.get("query_accuracy", float("nan")))
    return {"gradient_evaluations": last["gradient_evaluations"], "process_seconds": last["process_seconds"],
            "wall_seconds": cost["wall_seconds"] * share, "training_accuracy": accuracy}


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[dict], attacked: bool) -> str:
    header = ["method", "clean acc. % (mean ± std over seeds)", "95% CI over tasks (mean)"]
    header += ["robust acc. %"] if attacked else []
    header += ["training acc. % (last epoch)", "grad. evals (training)", "process s", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        clean, ci = stats(row["clean"]), statistics.fmean(row["ci"])
        cells = [row["label"], f"{100 * clean[0]:.1f} ± {100 * clean[1]:.1f}", f"± {100 * ci:.1f}"]
        if attacked:
            robust = stats(row["robust"])
            cells.append(f"{100 * robust[0]:.1f} ± {100 * robust[1]:.1f}")
        grads, process, wall = (stats(row[k]) for k in ("gradient_evaluations", "process_seconds", "wall_seconds"))
        cells.append(f"{100 * stats(row['training_accuracy'])[0]:.1f}")
        cells += [f"{grads[0]:,.0f}", f"{process[0]:.0f} ± {process[1]:.0f}", f"{wall[0]:.0f} ± {wall[1]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="Omniglot folder (folders or official zips)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fewshot"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training split: one RFS generation, "
                        "and every method's budget in gradient evaluations")
    parser.add_argument("--width", type=int, default=32, help="conv4 filters (64 in the papers' Omniglot runs)")
    parser.add_argument("--rotations", default="[0, 90, 180, 270]", help="data.rotations (each one a class)")
    parser.add_argument("--queries", type=int, default=15, help="query images per class at test time (and MAML's)")
    parser.add_argument("--tasks-5way", type=int, default=100)
    parser.add_argument("--tasks-20way", type=int, default=50)
    parser.add_argument("--attack-eps", type=float, default=0.0, help="> 0: also PGD-10 robust accuracy at this eps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="shared config override")
    args = parser.parse_args()
    if not (args.root.is_dir() and (any(args.root.glob("*.zip")) or any(args.root.glob("images_*")))):
        sys.exit(f"fewshot.py: no Omniglot data at {args.root}; pass --root DIR, a folder holding images_background*/ "
                 f"or the official zip files")
    torch.set_num_threads(args.threads)
    try:
        run_benchmark(args)
    except AdvframeError as exc:
        sys.exit(f"fewshot.py: {exc}")


def run_benchmark(args) -> None:
    host = make_plugin_host()
    maml = host.infos.get("maml")
    with_maml = maml is not None and maml.error is None and "adapt_task" in maml.hooks
    tasks = {"5-way 1-shot": args.tasks_5way, "20-way 1-shot": args.tasks_20way}
    attack = [f"eval.attacks=[{{name: pgd, steps: 10, eps: {args.attack_eps}}}]"] if args.attack_eps > 0 else ["eval.attacks=[]"]
    shared = ["data.name=omniglot", f"data.root={args.root}", f"data.rotations={args.rotations}", "model.name=conv4", f"model.args={{width: {args.width}}}",
              f"meta.queries={args.queries}", f"train.epochs={args.epochs}", "train.monitor_examples=0",
              "train.checkpoint_every=0", *attack, *args.overrides]
    probe = config_module.resolve(host, {}, shared, "rfs")
    train_images = len(data.load(probe["data"]).train)
    budget = args.epochs * train_images
    recipes = {r.name: r for r in trainings(budget, args.epochs, 5, args.queries, with_maml)}
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, dict]] = {setting: {} for setting in SETTINGS}
    failed: dict[str, str] = {}
    for seed in range(args.seeds):
        for variant in VARIANTS:
            recipe = recipes.get(variant.training)
            if recipe is None or recipe.name in failed:
                continue
            for setting in SETTINGS:
                try:
                    run_dir = train(host, recipe, setting if recipe.per_setting else None, seed, shared, tasks, args.out)
                    metrics = evaluate(host, run_dir, variant, setting, tasks, args.out)
                except Exception as exc:
                    if recipe.plugin in ("protonet", "rfs"):
                        raise
                    failed[recipe.name] = str(exc)  # another developer's plugin: report it, keep going
                    print(f"{recipe.name} failed: {exc}", flush=True)
                    break
                row = results[setting].setdefault(variant.label, {"label": variant.label, "clean": [], "ci": [],
                                                                  "robust": []})
                row["clean"].append(metrics["clean_accuracy"])
                row["ci"].append(metrics["clean_accuracy_ci95"])
                if "robust_accuracy" in metrics:
                    row["robust"].append(metrics["robust_accuracy"])
                for key, value in training_cost(run_dir, variant.teacher).items():
                    row.setdefault(key, []).append(value)

    command = "flock /tmp/advframe-bench.lock python benchmarks/fewshot.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = [f"`{command}`\n",
              f"Omniglot at {args.root}: {train_images} training images; conv4 width {args.width}; {args.seeds} seeds; "
              f"budget {budget:,} gradient evaluations per method ({args.epochs} passes over the training split); "
              f"{args.queries} queries per class; test tasks: {tasks}; shared overrides: {shared}\n"]
    for setting in SETTINGS:
        rows = [row for row in results[setting].values() if not any(row["label"] == v.label and v.training in failed
                                                                     for v in VARIANTS)]
        report.append(f"\n{setting} (held-out alphabets)\n\n" + table(rows, args.attack_eps > 0))
    report += [f"\n{name} failed and is left out: {message}\n" for name, message in failed.items()]
    text = "\n".join(report)
    atomic_write_text(args.out / "fewshot.md", text)
    print(text)


if __name__ == "__main__":
    main()
