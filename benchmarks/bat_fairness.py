"""BAT against TRADES, PGD-AT and plain training: robust fairness and the mechanism BAT relies on.

Same data (the embedded MNIST subset), model, epochs, training-attack budget (eps, PGD-10) and
evaluation attack (PGD-20) for every method, 3 seeds. Every method is evaluated by the ``accuracy``
evaluator and by BAT's ``evaluate`` (``eval.evaluators=[bat]``), so the fairness metrics are measured
the same way for all four:

* clean, robust and worst-class robust accuracy, class-wise spread of robust accuracy;
* the normalised entropy of the classes adversarial examples land in (1 = uniform): BAT's
  target-class constraint should make it higher than TRADES';
* per-class mean attack steps to the decision boundary (source-class strength adaptation) and the
  boundary invariants: every last-clean point is still correct, every stopped first-adversarial
  point is wrong.

Usage (about 15 minutes on 2 CPU cores)::

    python benchmarks/bat_fairness.py --seeds 3 --out runs/bench-bat [--set train.epochs=5 ...]

It is an ``advframe bench`` with fixed methods and extra columns; finished runs are kept, so a stopped
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from advframe import bench
from advframe.checkpoint import atomic_write_text
from advframe.plugins import make_plugin_host

METHODS = "erm,pgd-at,trades,bat"
MECHANISM = ["robust_accuracy_class_std", "robust_fairness_gap", "adversarial_target_entropy",
             "boundary_steps_class_spread", "last_clean_correct_fraction", "first_adversarial_wrong_fraction"]


def per_class_steps_table(records) -> str:
    """Mean attack steps to the boundary per class (mean over seeds), one row per method."""
    by_method: dict[str, list[list[float]]] = {}
    for record in records:
        by_method.setdefault(record["method"], []).append(record["results"]["metrics"]["per_class_boundary_steps"])
    classes = len(next(iter(by_method.values()))[0])
    lines = ["| method | " + " | ".join(f"class {c}" for c in range(classes)) + " |", "|" + "---|" * (classes + 1)]
    for method, runs in by_method.items():
        means = [statistics.fmean(run[c] for run in runs) for c in range(classes)]
        lines.append(f"| {method} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-bat"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="shared config override")
    args = parser.parse_args()

    host = make_plugin_host()
    methods = bench.parse_methods(METHODS)
    overrides = ["eval.evaluators=[bat]", *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    records = bench.run_bench(host, methods, args.seeds, {}, overrides, args.out)
    rows = bench.summarise(records, "pgd-at", MECHANISM)
    report = (f"Methods {METHODS}, {args.seeds} seeds, overrides {overrides}\n\n"
              + bench.markdown(rows, "pgd-at", MECHANISM)
              + "\nMean attack steps to the decision boundary, per class (BAT's source-class mechanism):\n\n"
              + per_class_steps_table(records))
    atomic_write_text(args.out / "bat_fairness.md", report)
    bench.write_csv(args.out / "summary.csv", rows)
    bench.write_runs_csv(args.out / "runs.csv", records)
    print(report)


if __name__ == "__main__":
    main()
