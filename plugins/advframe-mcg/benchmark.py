"""MCG's query table: query attacks alone vs seeded by MCG's flow, and MCG's latent search, against a
plain and an adversarially trained (PGD-AT) target.

    OMP_NUM_THREADS=1 flock /tmp/advframe-bench.lock .venv/bin/python plugins/advframe-mcg/benchmark.py \
        --out /tmp/mcg-flow --seeds 0 1 2 --examples 30 --budget 1000

Per seed, on the embedded MNIST subset (core defaults: 4,000 train / 1,000 test, L-inf eps 0.2):

* two targets, both the core ``small-cnn`` trained on the even-indexed half of the training split for
  ``--epochs`` epochs: ``plain`` with ``erm`` and ``robust`` with ``pgd-at`` (the core's training PGD
  at eps 0.2); the surrogate, an MLP 784-512-256-10, is trained with ``erm`` on the odd-indexed
  half (disjoint from the targets'); MCG's flow is trained once per seed on the surrogate and serves
  both targets;
* per target, ``--examples`` test images that target classifies correctly (a fixed random order per
  seed) are attacked by square, nes, bandits and simba alone, by each seeded by MCG (``mcg`` with
  ``attack: <name>``), and by MCG's latent search (``attack: latent``, CMA-ES over z);
* every variant gets the same budget, the clean query included, and draws its randomness from
  ``seed + 999``.

Reported per target and variant (mean ± std over seeds): success rate over the attacked examples, mean
and median queries over the successful ones (clean query included), first-query success (success with
exactly 2 queries: G's perturbation for MCG, the attack's own start otherwise) and process seconds of
the attack. MCG's one-off flow training is timed apart. ``--set KEY=VALUE`` applies to the training
runs and the attacks alike (``plugins.mcg.*``, ``plugins.square.*``, or ``data.*`` for another data set). The per-example records come from the
attacks' own ``ctx.record_queries`` calls (``benchmarks/query_efficiency.py``'s ``attack``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import advframe_mcg
from advframe import config as config_module
from advframe.plugins import make_plugin_host
from advframe.runner import Run

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import query_efficiency  # noqa: E402  (the shared attack runner and table cell of the MCG benchmarks)

ATTACKS = ("square", "nes", "bandits", "simba")
TARGETS = {"plain": "erm", "robust": "pgd-at"}


def train(host, out: Path, model: dict, half: int, seed: int, epochs: int, method: str, overrides=()) -> Path:
    """A finished run directory: ``model`` trained with ``method`` on one half of the training split."""
    if not (out / "results.json").is_file():
        user = {"seed": seed, "model": model, "train": {"method": method, "epochs": epochs}, "eval": {"attacks": []}}
        run = Run.start(host, config_module.resolve(host, user, ["train.monitor_examples=0", *overrides]), out)
        run.splits.train = run.splits.train.subset(torch.arange(half, len(run.splits.train), 2))
        run.execute()
    return out


def variants(budget: int, surrogate: Path, attacks) -> dict[str, tuple[str, dict]]:
    rows = {}
    for name in attacks:
        rows[name] = (name, {"budget": budget})
        rows[f"mcg+{name}"] = ("mcg", {"attack": name, "budget": budget, "surrogate": str(surrogate)})
    rows["mcg latent search (CMA-ES over z)"] = ("mcg", {"attack": "latent", "budget": budget,
                                                         "surrogate": str(surrogate)})
    return rows


def one_seed(args, seed: int, results: dict) -> None:
    host = make_plugin_host()
    folder = args.out / f"seed-{seed}"
    surrogate_dir = train(host, folder / "surrogate", {"name": "mlp", "args": {"hidden": [512, 256]}}, 1, seed,
                          args.epochs, "erm", args.overrides)
    for target, method in TARGETS.items():
        started = time.process_time()
        target_dir = train(host, folder / target, {"name": "small-cnn"}, 0, seed, args.epochs, method, args.overrides)
        print(f"seed {seed} {target}: trained in {time.process_time() - started:.0f} process s", flush=True)
        user = config_module.load_file(target_dir / "config.yaml")
        user["eval"]["attacks"] = []
        run = Run.load(host, target_dir, config_module.resolve(host, user, ["device=cpu", *args.overrides]))
        run.model.eval()
        test = run.splits.test
        with torch.no_grad():
            correct = run.model(test.batch(torch.arange(len(test)), run.ctx.device)[0]).argmax(1).cpu() == test.labels
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
        inputs, labels = test.batch(order[correct[order]][:args.examples].sort().values, run.ctx.device)
        record = results.setdefault(target, {}).setdefault(seed, {"_clean_accuracy": float(correct.float().mean())})
        for label, (name, overrides) in variants(args.budget, surrogate_dir, args.attacks).items():
            params = run.ctx.attack_settings(name, **overrides)
            if name == "mcg":
                started = time.process_time()
                advframe_mcg.meta_generator(run.ctx, params, run.ctx.device)
                if time.process_time() - started > 0.5:
                    record["_flow_training_process_s"] = time.process_time() - started
            record[label] = query_efficiency.attack(run, inputs, labels, params, seed)
            print(f"seed {seed} {target} {label}: {record[label]}", flush=True)
            (args.out / "table-partial.md").write_text(table(results) + "\n")  # what has finished so far
    (folder / "results.json").write_text(json.dumps({t: results[t][seed] for t in results}, indent=2) + "\n")


def cell(values: list[float], scale: float = 1.0) -> str:
    """mean ± std over the seeds with a value (query columns have none where nothing succeeded)."""
    present = [v for v in values if not math.isnan(v)]
    if not present:
        return "–"
    text = query_efficiency.cell(present, scale=scale)
    return text if len(present) == len(values) else f"{text} ({len(present)} seeds)"


def table(results: dict) -> str:
    lines = ["| target | variant | seeds | success % | mean queries | median queries | first-query success % | "
             "process s |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for target, per_seed in results.items():
        seeds = [s for s in per_seed.values() if any(not k.startswith("_") for k in s)]
        if not seeds:
            continue
        for label in (k for k in seeds[0] if not k.startswith("_")):
            rows = [s[label] for s in seeds if label in s]
            lines.append(f"| {target} | {label} | {len(rows)} | {cell([r['asr'] for r in rows], scale=100)} | "
                         f"{cell([r['mean_q'] for r in rows])} | {cell([r['median_q'] for r in rows])} | "
                         f"{cell([r['fasr'] for r in rows], scale=100)} | {cell([r['process_s'] for r in rows])} |")
        attacked = [s[next(k for k in s if not k.startswith("_"))]["attacked"] for s in seeds]
        notes.append(f"{target} target: clean accuracy {cell([s['_clean_accuracy'] for s in seeds], scale=100)} %, "
                     f"attacked examples per seed {attacked}")
    flow = [s["_flow_training_process_s"] for per_seed in results.values() for s in per_seed.values()
            if "_flow_training_process_s" in s]
    notes.append(f"MCG flow training (likelihood + Reptile), process s per seed: {cell(flow) if flow else 'n/a'}")
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=30)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for seed in args.seeds:
        one_seed(args, seed, results)
    text = table(results)
    print(text)
    (args.out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
