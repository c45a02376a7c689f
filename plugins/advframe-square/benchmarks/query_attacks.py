"""Success rate and queries of a query-based attack on trained runs, mean ± std over the runs.

    python query_attacks.py --attack square --examples 200 --set plugins.square.budget=1000 RUN_DIR...

Each run directory is a finished ``advframe run`` (one per seed). The attack runs through the core's
evaluation path (``ctx.predictions`` / ``ctx.query_statistics``, the attack's randomness from
``seed + 999`` as in ``advframe eval``) on a class-balanced random subset of the test split: the same
``--examples`` images for every run (``eval.max_examples`` takes a fixed random subset, which is not
balanced). ``--set`` takes the keys ``advframe eval`` takes
(``attack.norm``, ``attack.eps``, ``plugins.<attack>.*``). Prints one markdown row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from advframe import config as config_module
from advframe.context import attack_label
from advframe.plugins import make_plugin_host
from advframe.runner import Run


def balanced_subset(labels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` indices, as many from each class as possible, in a fixed random order."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [members[torch.randperm(len(members), generator=generator)]
                 for members in (torch.nonzero(labels == c).squeeze(1) for c in classes)]
    picked = torch.stack([torch.cat([m[i:i + 1] for m in per_class]) for i in range(count // len(classes) + 1)
                          if all(len(m) > i for m in per_class)]).flatten()
    return picked[:count].sort().values


def evaluate(run_dir: Path, attack: str, examples: int, overrides: list[str]) -> dict[str, float]:
    host = make_plugin_host()
    user = config_module.load_file(run_dir / "config.yaml")
    user["eval"].update(attacks=[{"name": attack}], protocol="custom")  # the run's own protocol brings another list
    config = config_module.resolve(host, user, overrides)
    run = Run.load(host, run_dir, config)
    dataset = run.splits.test.subset(balanced_subset(run.splits.test.labels, examples))
    params = config["eval"]["attacks"][0]
    ctx, model = run.ctx, run.model.eval()
    process, wall = time.process_time(), time.perf_counter()
    with ctx.evaluation_randomness(config["seed"] + 999), ctx.counter.paused():
        clean = ctx.predictions(model, dataset)
        adversarial = ctx.predictions(model, dataset, params)
        queries = ctx.query_statistics(model, dataset, params)
    return {"clean": clean.correct.float().mean().item(),
            "robust": (clean.correct & adversarial.correct).float().mean().item(),
            "success": queries["attack_success_rate"], "mean_q": queries["mean_queries"],
            "median_q": queries["median_queries"], "process_s": time.process_time() - process,
            "wall_s": time.perf_counter() - wall, "label": attack_label(params), "norm": params["norm"],
            "eps": params["eps"]}


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--attack", required=True)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default=None, help="row label (default: the attack and its --set values)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = [evaluate(run, args.attack, args.examples, args.overrides) for run in args.runs]
    for run, row in zip(args.runs, rows):
        print(f"<!-- {run}: {row} -->")
    name = args.name or " ".join([args.attack, *args.overrides])
    first = rows[0]
    print(f"| {name} | {first['norm']} {first['eps']:g} | {len(rows)} | {cell([r['clean'] for r in rows], 100)} | "
          f"{cell([r['robust'] for r in rows], 100)} | {cell([r['success'] for r in rows], 100)} | "
          f"{cell([r['mean_q'] for r in rows])} | {cell([r['median_q'] for r in rows])} | "
          f"{cell([r['process_s'] for r in rows], digits=0)} | {cell([r['wall_s'] for r in rows], digits=0)} |")


if __name__ == "__main__":
    main()
