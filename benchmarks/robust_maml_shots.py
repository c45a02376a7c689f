"""Standard vs robust MAML when meta-training with more shots than meta-testing (Duan et al. 2022).

The seed paper's claims, measured at small scale:

1. the robustness regulariser lowers the intrinsic dimension (ID) of clean features;
2. more training shots (K_train > K_test) raise clean accuracy and ID with little loss of robustness;
3. with more training shots the results depend less on the number of inner steps in meta-training.

Grid (every cell ``--seeds`` seeds; the seed changes the meta-training, every model is tested on the
same fixed tasks and its ID is measured on the same test images):

* ``standard``: first-order MAML (``maml``), clean inner and outer loops;
* ``robust``: ``robust-maml``, first order, R-MAML-AT: clean inner loop, outer loss
  CE(Q) + CE(Q_adv) with Q_adv one FGSM-RS step (1.25 eps, uniform start) at the adapted weights;
* K_train in {1, 2, 5} with K_test = 1 (``meta.train_shots`` / ``meta.test_shots``), for both;
* inner-steps sensitivity: ``robust`` at K_train in {1, 5} meta-trained with s = 3 inner steps as well
  as s = 1 (the test protocol, 10 clean fine-tuning steps, is unchanged).

Setting (METHODS.md Part II §2, "small CPU check", scaled down to fit the shared 2-core machine): the
small Omniglot background sets (8 alphabets once merged; Sanskrit and Tagalog held out for testing),
28x28, rotations 0/90/270 as extra classes; Conv-4 with ``--width`` filters; 5-way, 5 queries per
class, 4 tasks per meta-batch, ``--iterations`` meta-iterations of Adam (lr 1e-3); inner lr 0.4,
1 inner step; eps 0.2 (L-inf) for training and evaluation. Evaluation: ``--test-tasks`` fixed 5-way
1-shot tasks from the held-out alphabets, 10 clean fine-tuning steps on the support, clean accuracy
and PGD-10 (step 2.5 eps / 10, uniform start, no early stop: BatchNorm is transductive) robust
accuracy on the query set, each with its 95% CI over tasks; ID (TwoNN, MLE, PCA 90%) of the
meta-initialisation's clean penultimate features of 500 held-out images.

Usage::

    flock /tmp/advframe-bench.lock python benchmarks/robust_maml_shots.py --out /tmp/robust-maml-shots

Runs are ordinary run directories under ``OUT/<label>/seed-<s>``: a stopped benchmark continues where
it stopped. The tables are printed and written to ``OUT/robust_maml_shots.md``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

from advframe import bench
from advframe.checkpoint import atomic_write_text
from advframe.plugins import make_plugin_host

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "omniglot"
SHOTS = (1, 2, 5)
STEPS_SHOTS = (1, 5)
ID_COLUMNS = ("intrinsic_dimension/twonn", "intrinsic_dimension/mle", "intrinsic_dimension/pca")


def method(kind: str, shots: int, steps: int = 1, second_order: bool = False) -> bench.Method:
    plugin = "maml" if kind == "standard" else "robust-maml"
    overrides = [f"meta.train_shots={shots}", f"plugins.{plugin}.first_order={not second_order}",
                 f"plugins.{plugin}.inner_steps={steps}"]
    if kind == "robust":
        overrides += ["plugins.robust-maml.regulariser=at", "plugins.robust-maml.weight=1",
                      "plugins.robust-maml.adversary=fgsm-rs"]
    return bench.Method(f"{kind} K{shots} s{steps}" + (" second-order" if second_order else ""), plugin, overrides)


def shared_overrides(args) -> list[str]:
    data = (["data.name=omniglot", f"data.root={args.root}", "data.rotations=[0, 90, 270]"]
            if args.data == "omniglot" else ["data.name=mnist-fewshot"])
    return [*data, "model.name=conv4", f"model.args={{width: {args.width}}}",
            "meta.ways=5", "meta.test_shots=1", "meta.queries=5", "meta.tasks_per_batch=4",
            f"meta.tasks_per_epoch={4 * args.iterations}", f"meta.test_tasks={args.test_tasks}",
            "train.epochs=1", "train.lr=0.001", "train.monitor_examples=0", "train.checkpoint_every=50",
            "attack.eps=0.2", "eval.attacks=[{name: pgd, steps: 10, stop_on_success: false}]",
            "eval.evaluators=[robust-maml]", "plugins.robust-maml.id_examples=500",
            "plugins.maml.inner_lr=0.4", "plugins.robust-maml.inner_lr=0.4",
            "plugins.maml.test_inner_steps=10", "plugins.robust-maml.test_inner_steps=10", *args.overrides]


def by_label(records) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["method"], []).append(record["results"])
    return grouped


def stats(runs: list[dict], key: str, scale: float = 1.0) -> tuple[float, float]:
    values = [scale * run["metrics"][key] for run in runs]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(runs, key, scale=100.0, digits=1) -> str:
    mean, std = stats(runs, key, scale)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def cost(runs, key) -> str:
    return f"{statistics.fmean(run['cost'][key] for run in runs):,.0f}"


def shots_table(grouped) -> str:
    header = ["method", "K_train", "clean %", "± CI95 (tasks)", "PGD-10 robust %", "± CI95 (tasks)",
              "ID TwoNN", "ID MLE", "ID PCA", "grad. evals", "process s", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind in ("standard", "robust"):
        for shots in SHOTS:
            runs = grouped[method(kind, shots).label]
            lines.append("| " + " | ".join([
                kind, str(shots), cell(runs, "clean_accuracy"), f"{stats(runs, 'clean_accuracy_ci95', 100)[0]:.1f}",
                cell(runs, "robust_accuracy"), f"{stats(runs, 'robust_accuracy_ci95', 100)[0]:.1f}",
                *(cell(runs, key, 1.0, 2) for key in ID_COLUMNS),
                cost(runs, "gradient_evaluations"), cost(runs, "process_seconds"), cost(runs, "wall_seconds")]) + " |")
    return "\n".join(lines) + "\n"


def steps_table(grouped) -> str:
    header = ["method", "K_train", "clean % (s=1)", "clean % (s=3)", "Δ clean (abs.)", "robust % (s=1)",
              "robust % (s=3)", "Δ robust (abs.)", "ID TwoNN (s=1)", "ID TwoNN (s=3)", "process s (s=1 / s=3)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shots in STEPS_SHOTS:
        one, three = grouped[method("robust", shots, 1).label], grouped[method("robust", shots, 3).label]
        row = ["robust", str(shots)]
        for key in ("clean_accuracy", "robust_accuracy"):
            row += [cell(one, key), cell(three, key),
                    f"{abs(stats(three, key, 100)[0] - stats(one, key, 100)[0]):.1f}"]
        row += [cell(one, ID_COLUMNS[0], 1.0, 2), cell(three, ID_COLUMNS[0], 1.0, 2),
                f"{cost(one, 'process_seconds')} / {cost(three, 'process_seconds')}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def order_table(grouped) -> str:
    header = ["method", "K_train", "clean %", "PGD-10 robust %", "ID TwoNN", "grad. evals", "process s", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for second_order in (False, True):
        runs = grouped[method("standard", 1, second_order=second_order).label]
        lines.append("| " + " | ".join([
            "MAML (second order)" if second_order else "FOMAML (first order)", "1", cell(runs, "clean_accuracy"),
            cell(runs, "robust_accuracy"), cell(runs, ID_COLUMNS[0], 1.0, 2), cost(runs, "gradient_evaluations"),
            cost(runs, "process_seconds"), cost(runs, "wall_seconds")]) + " |")
    return "\n".join(lines) + "\n"


def checks(grouped, with_steps: bool) -> str:
    """METHODS.md's pass criteria for the small check, each with the numbers behind it."""
    def mean(kind, shots, key, steps=1, scale=100.0):
        return stats(grouped[method(kind, shots, steps).label], key, scale)[0]

    twonn = ID_COLUMNS[0]
    rows = [
        ("regulariser lowers ID: ID(robust,K1) < ID(standard,K1)",
         mean("robust", 1, twonn, scale=1) < mean("standard", 1, twonn, scale=1),
         f"{mean('robust', 1, twonn, scale=1):.2f} vs {mean('standard', 1, twonn, scale=1):.2f}"),
        ("more shots restore ID: ID(robust,K5) > ID(robust,K1)",
         mean("robust", 5, twonn, scale=1) > mean("robust", 1, twonn, scale=1),
         f"{mean('robust', 5, twonn, scale=1):.2f} vs {mean('robust', 1, twonn, scale=1):.2f}"),
        ("more shots raise clean accuracy: SA(robust,K5) - SA(robust,K1) >= 3 points",
         mean("robust", 5, "clean_accuracy") - mean("robust", 1, "clean_accuracy") >= 3,
         f"{mean('robust', 5, 'clean_accuracy') - mean('robust', 1, 'clean_accuracy'):+.1f} points"),
        ("little loss of robustness: RA(robust,K5) >= RA(robust,K1) - 2 points",
         mean("robust", 5, "robust_accuracy") >= mean("robust", 1, "robust_accuracy") - 2,
         f"{mean('robust', 5, 'robust_accuracy') - mean('robust', 1, 'robust_accuracy'):+.1f} points"),
    ]
    if with_steps:
        spread = {shots: abs(mean("robust", shots, "clean_accuracy", 3) - mean("robust", shots, "clean_accuracy", 1))
                  for shots in STEPS_SHOTS}
        rows.append(("less sensitive to inner steps: abs(SA(s=3) - SA(s=1)) smaller at K5 than at K1",
                     spread[5] < spread[1], f"{spread[5]:.1f} vs {spread[1]:.1f} points"))
    lines = ["| claim (METHODS.md small check) | holds | numbers |", "|---|---|---|"]
    lines += [f"| {claim} | {'yes' if ok else 'no'} | {numbers} |" for claim, ok, numbers in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/robust-maml-shots"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", choices=("omniglot", "mnist-fewshot"), default="omniglot")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="Omniglot folder or zip files")
    parser.add_argument("--iterations", type=int, default=300, help="meta-iterations (4 tasks each)")
    parser.add_argument("--width", type=int, default=32, help="Conv-4 filters")
    parser.add_argument("--test-tasks", type=int, default=100)
    parser.add_argument("--steps", action=argparse.BooleanOptionalAction, default=True,
                        help="also meta-train robust K1/K5 with 3 inner steps")
    parser.add_argument("--second-order", action=argparse.BooleanOptionalAction, default=True,
                        help="also meta-train standard MAML K1 with second-order meta-gradients")
    parser.add_argument("--only", action="append", default=[],
                        help="run only the cells with this label (e.g. 'robust K1 s1'); no tables")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="shared config override")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.data == "omniglot" and not args.root.exists():
        sys.exit(f"no Omniglot data at {args.root}; pass --root or --data mnist-fewshot")

    methods = [method(kind, shots) for kind in ("standard", "robust") for shots in SHOTS]
    if args.steps:
        methods += [method("robust", shots, 3) for shots in STEPS_SHOTS]
    if args.second_order:
        methods.append(method("standard", 1, second_order=True))
    if args.only:
        unknown = set(args.only) - {m.label for m in methods}
        if unknown:
            sys.exit(f"--only: unknown cells {sorted(unknown)}; known: {', '.join(m.label for m in methods)}")
        methods = [m for m in methods if m.label in args.only]
    overrides = shared_overrides(args)
    args.out.mkdir(parents=True, exist_ok=True)
    records = bench.run_bench(make_plugin_host(), methods, args.seeds, {}, overrides, args.out)
    if args.only:
        for record in records:
            metrics = record["results"]["metrics"]
            print(record["method"], record["seed"], {k: round(v, 4) for k, v in metrics.items()})
        return
    grouped = by_label(records)
    command = "python benchmarks/robust_maml_shots.py " + shlex.join(sys.argv[1:])
    report = (f"`{command}`: {args.seeds} seeds, {args.iterations} meta-iterations, conv4 width {args.width}, "
              f"{args.test_tasks} test tasks (5-way 1-shot)\n\nShared overrides: `{' '.join(overrides)}`\n\n"
              "Clean and PGD-10 robust accuracy, mean ± std over seeds (± CI95: the mean over seeds of each run's "
              "95% CI half-width over its test tasks); ID of clean features at the meta-initialisation:\n\n"
              + shots_table(grouped))
    if args.steps:
        report += "\nInner-steps sensitivity (robust MAML meta-trained with s = 1 or 3 inner steps):\n\n" + \
            steps_table(grouped)
    if args.second_order:
        report += "\nFirst- against second-order MAML (the standard K1 cell, same budget in meta-iterations):\n\n" + \
            order_table(grouped)
    report += "\nThe claims, as METHODS.md's small check states them:\n\n" + checks(grouped, args.steps)
    atomic_write_text(args.out / "robust_maml_shots.md", report)
    bench.write_runs_csv(args.out / "runs.csv", records)
    print(report)


if __name__ == "__main__":
    main()
