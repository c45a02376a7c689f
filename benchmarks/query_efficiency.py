"""Query efficiency of the query-based attacks alone and seeded by MCG (the MCG seed claim).

    OMP_NUM_THREADS=1 flock /tmp/advframe-bench.lock .venv/bin/python benchmarks/query_efficiency.py \
        --out /tmp/mcg-qe --seeds 0 1 2 --examples 200 --budget 1000

Per seed, on the embedded MNIST subset (core defaults: 4,000 train / 1,000 test, L-inf eps 0.2):

* the target, a small CNN (core ``small-cnn``), is trained on the even-indexed half of the training
  split, and the surrogate, a differently shaped model (``--surrogate-model``, default an MLP with
  hidden layers 512-256), on the odd-indexed half, both with the core runner (``erm``, core
  defaults: Adam 1e-3, ``--epochs`` epochs); the halves are disjoint;
* ``--examples`` test images the target classifies correctly (a fixed random order, the same for
  every variant of a seed) are attacked by each query attack alone and seeded by MCG (``mcg`` with
  ``attack: <name>``), plus MCG's ablations on square: no per-example fine-tuning, no surrogate
  adaptation, and the generator without meta-training (pre-trained only); and Square seeded by MCG
  with the official MCG's Square window schedule (``p_init`` 0.0375, small windows that refine the
  seed), next to Square alone with that schedule as the control;
* every variant gets the same budget, the clean query included, and draws its randomness from
  ``seed + 999``.

Reported per variant (mean ± std over seeds): attack success rate over the attacked examples, mean
and median queries over the successful ones (clean query included), first-query success rate (the
share of attacked examples that succeed at the first query after the clean one: G's perturbation
for MCG, the attack's own start otherwise), and process / wall seconds of the attack. MCG's
one-off (meta-)training of its generator is timed separately and not inside the attack's seconds.

``--set plugins.mcg.KEY=VALUE`` changes MCG settings for every MCG variant (e.g. fewer
``meta_tasks``), ``--set plugins.square.KEY=VALUE`` an attack's settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from advframe import config as config_module
from advframe.plugins import make_plugin_host
from advframe.runner import Run

ATTACKS = ("square", "simba", "nes", "bandits")
SEEDED_P_INIT = 0.0375  # official MCG Square: p_init 0.3 with the schedule started 500 of 10,000 iterations in
ABLATIONS = {
    "mcg+square, no per-example fine-tune": {"attack": "square", "finetune": False},
    "mcg+square, no surrogate adaptation": {"attack": "square", "adapt_surrogate": False},
    "mcg+square, G not meta-trained": {"attack": "square", "meta_train": False},
}


def train(host, out: Path, model: dict, half: int, seed: int, epochs: int) -> Path:
    """A finished run directory: ``model`` trained with erm on one half of the training split."""
    if (out / "results.json").is_file():
        return out
    user = {"seed": seed, "model": model, "train": {"method": "erm", "epochs": epochs}, "eval": {"attacks": []}}
    config = config_module.resolve(host, user, ["train.monitor_examples=0"])
    run = Run.start(host, config, out)
    run.splits.train = run.splits.train.subset(torch.arange(half, len(run.splits.train), 2))
    run.execute()
    (out / "half.json").write_text(json.dumps({"train_indices": f"{half}::2 of the training split"}) + "\n")
    return out


def attack(run: Run, inputs, labels, params, seed: int) -> dict[str, float]:
    """One variant on the attacked images; its per-example query records captured from the attack."""
    ctx, records = run.ctx, []
    ctx.record_queries = lambda queries, success, counted=None: records.append(
        (queries.cpu(), success.cpu(), torch.ones_like(success.cpu()) if counted is None else counted.cpu()))
    process, wall = time.process_time(), time.perf_counter()
    with ctx.evaluation_randomness(seed + 999), ctx.counter.paused():
        ctx.attack(run.model, inputs, labels, params)
    process, wall = time.process_time() - process, time.perf_counter() - wall
    del ctx.record_queries
    queries, success, counted = (torch.cat(column) for column in zip(*records))
    won = queries[success & counted].float()
    return {"asr": float((success & counted).sum() / counted.sum()),
            "mean_q": float(won.mean()) if len(won) else float("nan"),
            "median_q": float(won.median()) if len(won) else float("nan"),  # over query counts, never booleans
            "fasr": float((success & counted & (queries == 2)).sum() / counted.sum()),
            "attacked": int(counted.sum()), "process_s": process, "wall_s": wall}


def variants(budget: int, surrogate: Path, attacks: tuple[str, ...]) -> dict[str, tuple[str, dict]]:
    rows = {}
    for name in attacks:
        rows[name] = (name, {"budget": budget})
        rows[f"mcg+{name}"] = ("mcg", {"attack": name, "budget": budget, "surrogate": str(surrogate)})
    for label, settings in ABLATIONS.items():
        rows[label] = ("mcg", {**settings, "budget": budget, "surrogate": str(surrogate)})
    if "square" in attacks:  # the official MCG's seeded Square schedule, and Square alone with it (control)
        rows[f"square, p_init {SEEDED_P_INIT}"] = ("square", {"budget": budget, "p_init": SEEDED_P_INIT})
        rows[f"mcg+square, p_init {SEEDED_P_INIT}"] = ("mcg", {"attack": "square", "budget": budget,
                                                              "surrogate": str(surrogate),
                                                              "attack_overrides": {"p_init": SEEDED_P_INIT}})
    return rows


def one_seed(args, seed: int) -> dict[str, dict[str, float]]:
    host = make_plugin_host()
    folder = args.out / f"seed-{seed}"
    target_dir = train(host, folder / "target", {"name": "small-cnn"}, 0, seed, args.epochs)
    surrogate_dir = train(host, folder / "surrogate", args.surrogate_model, 1, seed, args.epochs)
    user = config_module.load_file(target_dir / "config.yaml")
    user["eval"]["attacks"] = []
    run = Run.load(host, target_dir, config_module.resolve(host, user, ["device=cpu", *args.overrides]))
    run.model.eval()
    test = run.splits.test
    with torch.no_grad():
        correct = run.model(test.batch(torch.arange(len(test)), run.ctx.device)[0]).argmax(1).cpu() == test.labels
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    chosen = order[correct[order]][:args.examples].sort().values
    inputs, labels = test.batch(chosen, run.ctx.device)
    results = {"_clean_accuracy": {"value": float(correct.float().mean())}}
    # MCG's one-off generator training, timed apart from the attacks (cached for every MCG variant)
    import advframe_mcg

    for label, (name, overrides) in variants(args.budget, surrogate_dir, tuple(args.attacks)).items():
        params = run.ctx.attack_settings(name, **overrides)
        if name == "mcg":
            process = time.process_time()
            advframe_mcg.meta_generator(run.ctx, params, run.ctx.device)
            spent = time.process_time() - process
            if spent > 0.5:
                results.setdefault("_generator_training_process_s", {})[label] = spent
        results[label] = attack(run, inputs, labels, params, seed)
        print(f"seed {seed} {label}: {results[label]}", flush=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def cell(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def table(per_seed: list[dict]) -> str:
    labels = [k for k in per_seed[0] if not k.startswith("_")]
    header = ("| variant | seeds | success % | mean queries | median queries | first-query success % | "
              "process s | wall s |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        rows = [r[label] for r in per_seed]
        lines.append(f"| {label} | {len(rows)} | {cell([r['asr'] for r in rows], scale=100)} | "
                     f"{cell([r['mean_q'] for r in rows])} | {cell([r['median_q'] for r in rows])} | "
                     f"{cell([r['fasr'] for r in rows], scale=100)} | {cell([r['process_s'] for r in rows])} | "
                     f"{cell([r['wall_s'] for r in rows])} |")
    clean = cell([r["_clean_accuracy"]["value"] for r in per_seed], scale=100)
    training = [sum(r.get("_generator_training_process_s", {}).values()) for r in per_seed]
    attacked = [r[labels[0]]["attacked"] for r in per_seed]
    lines.append("")
    lines.append(f"Target clean accuracy {clean} %; attacked examples per seed {attacked}; MCG generator "
                 f"(pre-)training, all variants together, process s per seed: {cell(training)}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--surrogate-model", type=json.loads, default={"name": "mlp", "args": {"hidden": [512, 256]}})
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(one_seed(args, seed))
        (args.out / "table-partial.md").write_text(table(per_seed) + "\n")  # what has finished so far
    text = table(per_seed)
    print(text)
    (args.out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
