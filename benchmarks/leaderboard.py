"""The leaderboard: every training method of this repository under the default evaluation protocol.

Reads the run directories an ``advframe bench`` wrote (``BENCH/<method>/seed-<s>/results.json``) and
prints one markdown table, mean ± std over seeds: clean accuracy, the headline robust accuracy (the
per-example worst case over the protocol's attacks), the PGD-20 row, worst-class robust accuracy, and
the cost of training (gradient evaluations, also relative to PGD-AT; forward passes without a graph;
process seconds) and of the evaluation (process seconds).

Usage (the bench first, then the table)::

    OMP_NUM_THREADS=1 flock /tmp/advframe-bench.lock advframe bench --seeds 3 --out /tmp/leaderboard \\
        --set eval.max_examples=500 \\
        --plugins erm,pgd-at,trades,mart,fgsm-rs,free-at,backward-smoothing,advprop,bat,mat,adv4adv,jsigr,bregman-at,misclassified-at
    python benchmarks/leaderboard.py /tmp/leaderboard > benchmarks/leaderboard.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PGD_ROW = "robust_accuracy_after/pgd-ce-linf-0.2-20"


def stat(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def load(bench: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(bench.glob("*/seed-*/results.json")):
        runs.setdefault(path.parent.parent.name, []).append(json.loads(path.read_text()))
    return runs


def table(runs: dict[str, list[dict]], order: list[str]) -> str:
    baseline = statistics.fmean(r["cost"]["gradient_evaluations"] for r in runs["pgd-at"]) if "pgd-at" in runs else None
    protocols = {r.get("evaluation", {}).get("protocol") for rs in runs.values() for r in rs}
    attacks = {", ".join(r.get("evaluation", {}).get("attacks", [])) for rs in runs.values() for r in rs}
    lines = [f"Protocol: {', '.join(sorted(map(str, protocols)))} ({'; '.join(sorted(attacks))}); "
             f"robust % is the per-example worst case over these attacks, PGD-20 % the first of them alone.", "",
             "| method | seeds | clean % | robust % (worst case) | PGD-20 % | worst-class robust % | grad. evals | "
             "× pgd-at | forward passes | training process s | evaluation process s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in [m for m in order if m in runs] + sorted(set(runs) - set(order)):
        results = runs[method]
        metric = lambda key: [r["metrics"][key] for r in results if key in r["metrics"]]  # noqa: E731
        cost = lambda key: [r["cost"].get(key, 0) for r in results]  # noqa: E731
        evals = statistics.fmean(cost("gradient_evaluations"))
        lines.append("| " + " | ".join([
            method, str(len(results)), stat(metric("clean_accuracy")), stat(metric("robust_accuracy")),
            stat(metric(PGD_ROW)), stat(metric("worst_class_robust_accuracy")), f"{evals:,.0f}",
            f"{evals / baseline:.2f}" if baseline else "–", f"{statistics.fmean(cost('forward_passes')):,.0f}",
            stat(cost("process_seconds"), 1, 0), stat(cost("eval_process_seconds"), 1, 0)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="the folder advframe bench --out wrote")
    parser.add_argument("--order", default="erm,pgd-at,trades,mart,fgsm-rs,free-at,backward-smoothing,advprop,bat,"
                                           "mat,adv4adv,jsigr,bregman-at,misclassified-at")
    args = parser.parse_args(argv)
    runs = load(args.bench)
    if not runs:
        parser.error(f"no results.json under {args.bench}/<method>/seed-<s>/")
    print(table(runs, args.order.split(",")), end="")


if __name__ == "__main__":
    main()
