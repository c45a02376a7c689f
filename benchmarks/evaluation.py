"""Is advframe's default evaluation as strong as AutoAttack, and how much cheaper?

On models trained by advframe on the embedded MNIST subset (plain training, PGD-AT, TRADES, MART;
small-cnn, 5 epochs, L-inf eps 0.2: the core defaults), one model per method and seed, the same test
images and eps for every evaluator, interleaved model by model in one process:

* advframe ``eval.protocol: quick`` and ``standard`` (``Run.evaluate``, the code every run uses);
* the reference AutoAttack, standard version (fra31/auto-attack; MIT; its path is an argument, the
  project never imports it);
* torchattacks' AutoAttack, standard version (``pip install --no-deps torchattacks``).

Reported per method: robust accuracy (mean ± std over seeds; an example counts when the model gets it
right clean and after the attack) and cost per test image: gradient evaluations (forward passes of
the attacked model that build a graph, each followed by a backward pass) and forward-only passes,
counted by one forward hook on the model for every evaluator, and process seconds. Every adversarial
batch an outside evaluator returns is checked to lie in the eps ball and in [0, 1].

Models are trained once into ``--runs`` (``<method>/seed-<s>``, the layout of ``advframe bench``, so an
``advframe bench`` output folder with these methods is reused as it is).

Usage (one benchmark at a time on a shared machine)::

    OMP_NUM_THREADS=1 flock /tmp/advframe-bench.lock python benchmarks/evaluation.py \\
        --runs /tmp/leaderboard --seeds 3 --examples 200 --reference ../shared/reference/auto-attack
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from advframe import config as config_module
from advframe.plugins import make_plugin_host
from advframe.runner import Run

METHODS = ("erm", "pgd-at", "trades", "mart")
EVALUATORS = ("advframe quick", "advframe standard", "reference AutoAttack", "torchattacks AutoAttack")


class PassCounter:
    """Counts, per example, the forward passes of one model: with a graph (gradient evaluations) or without."""

    def __init__(self, model: torch.nn.Module):
        self.gradient = self.forward = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        if torch.is_grad_enabled() and output.requires_grad:
            self.gradient += output.shape[0]
        else:
            self.forward += output.shape[0]


def trained_run(host, runs: Path, method: str, seed: int, wait: bool) -> Path:
    """The run directory of ``method`` and ``seed``: trained now unless it holds a finished run, or
    (``wait``) finished by another process, such as an ``advframe bench`` writing into ``runs``."""
    run_dir = runs / method / f"seed-{seed}"
    while wait and not (run_dir / "results.json").exists():
        time.sleep(30)
    if not (run_dir / "results.json").exists():
        config = config_module.resolve(host, {}, [f"seed={seed}"], method)
        print(f"training {method} seed {seed} into {run_dir}", flush=True)
        Run.start(host, config, run_dir).execute()
    return run_dir


def advframe_evaluator(host, run_dir: Path, protocol: str, examples: int) -> Run:
    # the saved config holds the run's own attack list: the protocol brings its own
    user = config_module.load_file(run_dir / "config.yaml")
    user["eval"].pop("attacks", None)
    config = config_module.resolve(host, user, [f"eval.protocol={protocol}", f"eval.max_examples={examples}"])
    run = Run.load(host, run_dir / "model.safetensors", config)
    return run


def test_images(run: Run, examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``Run.evaluate`` uses with ``eval.max_examples``: a fixed random subset."""
    dataset = run.splits.test
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:examples]
    return dataset.batch(chosen.sort().values)


def checked_accuracy(model, attack, inputs, labels, eps: float, batch_size: int) -> float:
    kept = []
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
        adversarial = attack(x, y)
        if (adversarial - x).abs().max() > eps + 1e-5 or adversarial.min() < 0 or adversarial.max() > 1:
            raise RuntimeError("an outside evaluator returned a point outside the eps ball or [0, 1]")
        with torch.no_grad():
            kept.append((model(adversarial).argmax(1) == y) & (model(x).argmax(1) == y))
    return torch.cat(kept).float().mean().item()


def measure(model, evaluate) -> dict[str, float]:
    counter = PassCounter(model)
    start = time.process_time()
    try:
        accuracy = evaluate()
    finally:
        counter.handle.remove()
    return {"robust": accuracy, "process_s": time.process_time() - start,
            "gradient": counter.gradient, "forward": counter.forward}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of trained runs (<method>/seed-<s>)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds FIRST .. FIRST+SEEDS-1 (split a run in parts)")
    parser.add_argument("--raw", type=Path, help="also append every measurement to this JSON-lines file")
    parser.add_argument("--table-from", type=Path, nargs="+", metavar="RAW",
                        help="print the table of earlier --raw files (several parts of one benchmark) and stop")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--reference", type=Path, default=Path("../shared/reference/auto-attack"),
                        help="folder holding the reference autoattack package")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--wait", action="store_true",
                        help="wait for another process (advframe bench --out RUNS) to finish each run instead of training it")
    args = parser.parse_args(argv)
    if args.table_from:
        results: dict[str, dict[str, list[dict]]] = {}
        rows = [json.loads(line) for path in args.table_from for line in path.read_text().splitlines()]
        for row in sorted(rows, key=lambda r: r["seed"]):  # seeds in order: deltas pair runs of one model
            results.setdefault(row["method"], {}).setdefault(row["evaluator"], []).append(row)
        print(table(results, args, len({r["seed"] for rows in results.values() for r in rows["clean"]})))
        return
    if args.seeds < 1 or args.examples < 1:
        parser.error("--seeds and --examples must be >= 1")
    torch.set_num_threads(1)
    if not (args.reference / "autoattack").is_dir():
        parser.error(f"--reference {args.reference}: no autoattack package there")
    sys.path.insert(0, str(args.reference.resolve()))
    from autoattack import AutoAttack

    try:
        import torchattacks
    except ImportError:
        parser.error("torchattacks is not installed: pip install --no-deps torchattacks")

    host = make_plugin_host()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results: dict[str, dict[str, list[dict]]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method in methods:
            run_dir = trained_run(host, args.runs, method, seed, args.wait)
            rows = results.setdefault(method, {})
            for protocol in ("quick", "standard"):
                run = advframe_evaluator(host, run_dir, protocol, args.examples)
                row = measure(run.model, lambda: run.evaluate()["metrics"]["robust_accuracy"])
                rows.setdefault(f"advframe {protocol}", []).append(row)
            model = run.model.eval()
            eps = run.config["attack"]["eps"]
            inputs, labels = test_images(run, args.examples)
            with torch.no_grad():
                rows.setdefault("clean", []).append({"robust": (model(inputs).argmax(1) == labels).float().mean().item()})
            reference = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=torch.device("cpu"),
                                   seed=seed, verbose=False)

            def run_reference(x, y):
                with contextlib.redirect_stdout(io.StringIO()):
                    return reference.run_standard_evaluation(x, y, bs=args.batch_size)

            rows.setdefault("reference AutoAttack", []).append(measure(model, lambda: checked_accuracy(
                model, run_reference, inputs, labels, eps, args.batch_size)))
            ported = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=seed)
            rows.setdefault("torchattacks AutoAttack", []).append(measure(model, lambda: checked_accuracy(
                model, ported, inputs, labels, eps, args.batch_size)))
            if args.raw:
                with args.raw.open("a") as raw:
                    for name in ("clean", *EVALUATORS):
                        raw.write(json.dumps({"seed": seed, "method": method, "evaluator": name, **rows[name][-1]}) + "\n")
            line = ", ".join(f"{name} {100 * rows[name][-1]['robust']:.1f}" for name in ("clean", *EVALUATORS))
            print(f"seed {seed} {method}: {line}", flush=True)
        print(table(results, args, seed + 1 - args.first_seed), flush=True)  # a stopped benchmark still reports


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(results: dict, args, seeds: int) -> str:
    lines = [f"\nsmall-cnn on the embedded MNIST subset, L-inf eps 0.2, {args.examples} test images, "
             f"{seeds} seeds (mean ± std)\n",
             "| model | evaluator | robust % | Δ vs reference (points) | grad. evals / image | forward passes / image "
             "| process s | × reference (process) |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rows in results.items():
        lines.append(f"| {method} | clean | {mean_std([r['robust'] for r in rows['clean']], 100)} | | | | | |")
        reference_robust = [r["robust"] for r in rows["reference AutoAttack"]]
        reference_seconds = statistics.fmean(r["process_s"] for r in rows["reference AutoAttack"])
        for name in EVALUATORS:
            runs = rows[name]
            delta = [100 * (r["robust"] - ref) for r, ref in zip(runs, reference_robust)]
            seconds = statistics.fmean(r["process_s"] for r in runs)
            lines.append(
                f"| {method} | {name} | {mean_std([r['robust'] for r in runs], 100)} | {mean_std(delta, 1)} "
                f"| {statistics.fmean(r['gradient'] for r in runs) / args.examples:,.0f} "
                f"| {statistics.fmean(r['forward'] for r in runs) / args.examples:,.0f} "
                f"| {mean_std([r['process_s'] for r in runs], 1, 1)} | {seconds / reference_seconds:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
