"""SRoUDA against source-only, UDA and naive robust self-training on MNIST -> scikit-learn digits.

All four are the ``srouda`` plugin with another ``mode`` (so data, model, optimizer, epochs and
evaluation are identical): ``source_only`` (CE on the labelled source), ``uda`` (DANN + RMA for every
epoch), ``naive_self_training`` (the same pre-training, then a frozen teacher's pseudo-labels and PGD
adversarial training of the student on the strong target view) and ``srouda`` (the teacher is also
updated, by its UDA loss and the meta signal from the student's source loss). ``--ablation`` adds
``srouda[meta_sign=-1]`` and ``srouda[meta_sign=0]``. Small-scale settings (``SHARED``): all 5,000 source
images, batch 64, mu = 2, 6 epochs (3 of MDD + RMA pre-training, 3 of self-training: ~240 steps,
against 20k in the paper), training PGD-10 at eps 0.1 (step 2.5 eps / 10).

Reported, 3 seeds, mean ± std: target (digits) clean and PGD-20 accuracy (eps 0.1, step 0.025, as
METHODS.md's small check), the teacher's clean target accuracy, the pseudo-label accuracy on the target
training images per epoch (from each run's metrics.jsonl; phase 1 epochs: the UDA model's argmax,
phase 2 epochs: the teacher's hard labels) and METHODS.md's pass criteria.

Usage (about 20 minutes single-threaded)::

    OMP_NUM_THREADS=1 flock /tmp/advframe-bench.lock \
        .venv/bin/python benchmarks/srouda_robustness.py --seeds 3 --out /tmp/bench-srouda

It is an ``advframe bench`` with fixed methods and extra tables; finished runs are kept, so a stopped
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from advframe import bench
from advframe.checkpoint import atomic_write_text
from advframe.plugins import make_plugin_host

METHODS = "srouda[mode=source_only],srouda[mode=uda],srouda[mode=naive_self_training],srouda"
ABLATION = ",srouda[meta_sign=-1],srouda[meta_sign=0]"
# small-scale settings: all 5,000 source images, batch 64, mu = 2 target images per source image, 6 epochs
# (3 of UDA pre-training with MDD + RMA, 3 of self-training, about 240 steps), training PGD-10 at eps 0.1
SHARED = [
    "data.name=mnist-to-digits", "data.target_ratio=2",
    "train.epochs=6", "train.batch_size=64", "train.monitor_examples=0", "train.checkpoint_every=0",
    "plugins.srouda.pretrain_epochs=3",
    "attack.eps=0.1", "attack.steps=10",
    "eval.attacks=[{name: pgd, steps: 20, alpha: 0.025, stop_on_success: true}]",
]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def pseudo_label_table(out: Path, records) -> tuple[str, dict[str, list[float]]]:
    """Pseudo-label accuracy on the target training images per epoch, mean ± std over seeds."""
    curves: dict[str, list[list[float]]] = {}
    for record in records:
        lines = (out / bench.folder_name(record["method"]) / f"seed-{record['seed']}" / "metrics.jsonl").read_text()
        logged = [json.loads(line) for line in lines.splitlines()]
        curves.setdefault(record["method"], []).append([line.get("pseudo_label_accuracy") for line in logged])
    epochs = max(len(c) for runs in curves.values() for c in runs)
    header = ["method", *(f"epoch {e + 1}" for e in range(epochs))]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    final = {}
    for method, runs in curves.items():
        cells = [_mean_std([run[e] for run in runs if e < len(run) and run[e] is not None]) for e in range(epochs)]
        table.append(f"| {method} | " + " | ".join(cells) + " |")
        final[method] = [run[-1] for run in runs]
    return "\n".join(table) + "\n", final


def criteria(rows, final_pla) -> str:
    """METHODS.md Part II §5's pass criteria for the small CPU check."""
    by = {row["method"]: row for row in rows}
    srouda, uda, naive = by.get("srouda"), by.get("srouda[mode=uda]"), by.get("srouda[mode=naive_self_training]")
    if not (srouda and uda and naive):
        return ""
    ra, sa = srouda["robust_accuracy"][0], srouda["clean_accuracy"][0]
    ra_uda, sa_uda = uda["robust_accuracy"][0], uda["clean_accuracy"][0]
    pla, pla_naive = statistics.fmean(final_pla["srouda"]), statistics.fmean(final_pla["srouda[mode=naive_self_training]"])
    checks = [
        (f"RA(srouda) {100 * ra:.1f} >= RA(uda) {100 * ra_uda:.1f} + 20", ra >= ra_uda + 0.20),
        (f"SA(srouda) {100 * sa:.1f} >= SA(uda) {100 * sa_uda:.1f} - 3", sa >= sa_uda - 0.03),
        (f"final pseudo-label accuracy srouda {100 * pla:.1f} > naive {100 * pla_naive:.1f}", pla > pla_naive),
    ]
    return "\n".join(f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-srouda"))
    parser.add_argument("--ablation", action="store_true", help="also srouda[meta_sign=-1] and srouda[meta_sign=0]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="shared config override")
    args = parser.parse_args()

    host = make_plugin_host()
    methods = METHODS + (ABLATION if args.ablation else "")
    overrides = [*SHARED, *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    records = bench.run_bench(host, bench.parse_methods(methods), args.seeds, {}, overrides, args.out)
    extra = ["teacher_clean_accuracy"]
    rows = bench.summarise(records, "srouda[mode=uda]", extra)
    curves, final = pseudo_label_table(args.out, records)
    report = (f"Methods {methods}, {args.seeds} seeds, overrides {overrides}\n\n"
              + bench.markdown(rows, "srouda[mode=uda]", extra)
              + "\nPseudo-label accuracy on the target training images per epoch (%, mean ± std over seeds):\n\n"
              + curves + "\nMETHODS.md small-check criteria:\n\n" + criteria(rows, final))
    atomic_write_text(args.out / "srouda_robustness.md", report)
    bench.write_csv(args.out / "summary.csv", rows)
    bench.write_runs_csv(args.out / "runs.csv", records)
    print(report)


if __name__ == "__main__":
    main()
