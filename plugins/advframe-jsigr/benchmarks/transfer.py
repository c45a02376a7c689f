"""J-SIGR against PGD-AT and plain training under *transferred* adversarial examples.

For every seed s, an independent surrogate (plain training, seed 1000 + s, same data and
architecture unless ``--surrogate-set`` says otherwise) is trained; adversarial examples of the whole
test set are crafted on it with the core's PGD (20 steps, uniform start, step 2.5 eps / 20) and with
MI-FGSM (Dong et al. 2018; 10 iterations, momentum 1.0, step eps / 10: the attack of J-SIGR's official
code), and fed to each defended model, trained with seed s through the ordinary runner (an
``advframe bench`` of the methods, with ``eval.evaluators=[jsigr]`` so every model also gets the
gradient metrics). The table gives mean ± std over seeds of:

* clean accuracy; accuracy on the transferred PGD-20 and MI-FGSM examples (all test examples; a
  clean mistake counts as a mistake); white-box PGD-20 robust accuracy (the run's own evaluation);
* ``input_gradient_norm`` (||grad_x log p_y||), ``saliency_gradient_energy`` (fraction of the squared
  input gradient inside the perturbation-saliency mask) from J-SIGR's evaluator;
* training cost: counted gradient evaluations (forward passes that build a graph: J-SIGR's double
  backpropagation is not counted there), process and wall seconds.

Usage (finished runs are kept, so a stopped benchmark continues where it stopped)::

    flock /tmp/advframe-bench.lock .venv/bin/python plugins/advframe-jsigr/benchmarks/transfer.py \\
        --seeds 3 --out /tmp/bench-jsigr-transfer [--methods erm,pgd-at,jsigr] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from advframe import bench
from advframe.attacks import ascent_direction, pgd, project, step_size
from advframe.checkpoint import atomic_write_text
from advframe.config import load_file, resolve
from advframe.models import eval_mode
from advframe.plugins import make_plugin_host
from advframe.runner import Run

SURROGATE_SEED = 1000


def mi_fgsm(model, inputs, labels, *, eps: float, steps: int, momentum: float, norm: str = "linf") -> torch.Tensor:
    """Momentum iterative FGSM (Dong et al., CVPR 2018): the step follows an accumulated gradient,
    each new gradient normalised by its L1 norm; the core's projection keeps the ball and the box."""
    alpha = eps / steps
    delta = torch.zeros_like(inputs)
    velocity = torch.zeros_like(inputs)
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(inputs + delta), labels, reduction="sum")
            grad, = torch.autograd.grad(loss, delta)
            l1 = grad.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
            velocity = momentum * velocity + grad / l1
            delta = project(delta.detach() + alpha * ascent_direction(velocity, norm), inputs, eps, norm)
    return (inputs + delta).detach()


def finished_run(host, run_dir: Path) -> Run:
    """A trained run's model, loaded for evaluation."""
    return Run.load(host, run_dir, resolve(host, load_file(run_dir / "config.yaml")))


def surrogate(host, out: Path, seed: int, overrides: list[str]) -> Run:
    run_dir = out / "surrogate" / f"seed-{seed}"
    if not (run_dir / "results.json").exists():
        config = resolve(host, {}, [*overrides, "eval.evaluators=[]", f"seed={SURROGATE_SEED + seed}"], "erm")
        run = Run.resume(host, run_dir) if (run_dir / "state.safetensors").exists() else Run.start(host, config, run_dir)
        run.execute()
    return finished_run(host, run_dir)


def transferred(run: Run, seed: int) -> dict[str, torch.Tensor]:
    """Adversarial examples of the whole test set, crafted on the surrogate ``run``."""
    model, dataset = run.model.eval(), run.splits.test
    attack = run.config["attack"]
    eps, norm = attack["eps"], attack["norm"]
    generator = torch.Generator().manual_seed(SURROGATE_SEED + seed)
    crafted = {"pgd-20": [], "mi-fgsm": []}
    for inputs, labels in dataset.batches(500, run.device):
        crafted["pgd-20"].append(pgd(model, inputs, labels, eps=eps, alpha=step_size({"eps": eps, "steps": 20}),
                                     steps=20, norm=norm, random_start="uniform", generator=generator))
        crafted["mi-fgsm"].append(mi_fgsm(model, inputs, labels, eps=eps, steps=10, momentum=1.0, norm=norm))
    return {name: torch.cat(parts) for name, parts in crafted.items()}


def accuracy(model, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad(), eval_mode(model):
        predictions = torch.cat([model(inputs[i:i + 500]).argmax(1) for i in range(0, len(inputs), 500)])
    return (predictions == labels).float().mean().item()


def stat(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-jsigr-transfer"))
    parser.add_argument("--methods", default="erm,pgd-at,jsigr", help="bench method list (variants allowed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="shared config override")
    parser.add_argument("--surrogate-set", dest="surrogate_overrides", action="append", default=[],
                        help="override for the surrogate only (e.g. model.args={width: 32})")
    args = parser.parse_args()

    host = make_plugin_host()
    methods = bench.parse_methods(args.methods)
    overrides = ["eval.evaluators=[jsigr]", *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    records = bench.run_bench(host, methods, args.seeds, {}, overrides, args.out / "targets")
    rows: dict[str, dict[str, list[float]]] = {m.label: {} for m in methods}
    surrogate_rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        source = surrogate(host, args.out, seed, [*args.overrides, *args.surrogate_overrides])
        examples = transferred(source, seed)
        labels = source.splits.test.labels.to(source.device)
        for name, inputs in examples.items():
            surrogate_rows.setdefault(name, []).append(accuracy(source.model, inputs, labels))
        for record in (r for r in records if r["seed"] == seed):
            target = finished_run(host, args.out / "targets" / bench.folder_name(record["method"]) / f"seed-{seed}")
            metrics, cost = record["results"]["metrics"], record["results"]["cost"]
            row = rows[record["method"]]
            values = {"clean": metrics["clean_accuracy"], "white-box pgd-20": metrics["robust_accuracy"],
                      **{f"transfer {n}": accuracy(target.model, x.to(target.device), labels.to(target.device))
                         for n, x in examples.items()},
                      "input_gradient_norm": metrics["input_gradient_norm"],
                      "saliency_gradient_energy": metrics["saliency_gradient_energy"],
                      "gradient_evaluations": cost["gradient_evaluations"],
                      "process_seconds": cost["process_seconds"], "wall_seconds": cost["wall_seconds"]}
            for key, value in values.items():
                row.setdefault(key, []).append(value)

    header = ["method", "clean %", "transfer PGD-20 %", "transfer MI-FGSM %", "white-box PGD-20 %",
              "‖∇x log p_y‖", "saliency energy", "grad. evals", "process s", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in rows.items():
        lines.append("| " + " | ".join([
            method, stat(row["clean"]), stat(row["transfer pgd-20"]), stat(row["transfer mi-fgsm"]),
            stat(row["white-box pgd-20"]), stat(row["input_gradient_norm"], 1, 3),
            stat(row["saliency_gradient_energy"], 1, 3), f"{statistics.fmean(row['gradient_evaluations']):,.0f}",
            stat(row["process_seconds"], 1, 0), stat(row["wall_seconds"], 1, 0)]) + " |")
    report = (f"Methods {args.methods}; {args.seeds} seeds; overrides {overrides}; surrogate: erm, seed 1000 + s"
              f"{', ' + str(args.surrogate_overrides) if args.surrogate_overrides else ''}\n\n"
              + "\n".join(lines) + "\n\n"
              + "Surrogate accuracy on its own examples (white-box sanity check): "
              + ", ".join(f"{name} {stat(values)} %" for name, values in surrogate_rows.items()) + "\n")
    atomic_write_text(args.out / "transfer.md", report)
    atomic_write_text(args.out / "transfer.json", json.dumps({"rows": rows, "surrogate": surrogate_rows}, indent=2))
    print(report)


if __name__ == "__main__":
    main()
