"""Few-shot segmentation under attack: PANet vs PNODE vs R-PNODE (the R-PNODE claim, IEEE TMI 2023).

The claim (Pandey et al.): R-PNODE's Dice is at least the prototype baseline's on clean queries and
well above it under attack, with no adversarial training. This script trains the three plugins
(``panet``, ``pnode``, ``r-pnode``) on the embedded ``mnist-segmentation`` episodes (train digits
0-4, test digits 5-9: the test classes are never seen in training) with one encoder (the core's
``seg-encoder``) and the same episodes, then evaluates every model on the same fixed 1-way 1-shot
test tasks, attacking the query of each adapted model (prototypes from the clean support):

* FGSM and PGD-10 (L-inf, ``eps``, alpha 2.5 eps / 10, one random start, no early stop: success is
  per pixel), through the core's attacks (the ``fgsm`` / ``pgd`` plugins), differentiating through
  the ODE solver (fixed-step RK4: the gradient is exact, no adaptive-solver masking);
* ``dense-square``: a gradient-free Square-style random search (Andriushchenko et al. 2020) on the
  mean per-pixel cross-entropy of the query, defined here (the ``square`` plugin's margin loss and
  its :class:`~advframe.cost.QueryCounter` need class scores per example, 2-D outputs, and a
  segmenter returns ``B x 2 x H x W``). It reuses the square plugin's stripes initialisation, its
  L-inf window step and its ``p`` schedule, and counts every query through a QueryCounter on the
  flattened logits. If PNODE's advantage under PGD were gradient masking, the gradient-free attack
  would close the gap.
* Mechanism column (METHODS.md: the ODE flow keeps nearby trajectories apart, so input perturbations
  move the features less): the relative feature shift ||F(x_fgsm) - F(x)|| / ||F(x)|| of the query,
  averaged over tasks.

Columns: Dice (mean over tasks), mean ± std over seeds, and the mean over seeds of the 95% confidence
half-width over tasks in brackets; training cost in gradient evaluations (counted by the core:
one per image per forward pass that builds a graph), training process seconds, and the run's wall
seconds (noisy on a shared machine). Usage (single-threaded, one benchmark at a time)::

    OMP_NUM_THREADS=1 flock /tmp/advframe-bench.lock .venv/bin/python benchmarks/rpnode_robustness.py \\
        --out /tmp/rpnode [--seeds 3] [--episodes 600] [--test-tasks 60] [--ode-steps 4] [--eps 0.1]

``--methods`` also takes variants with plugin settings, for ablations: ``'r-pnode[ode_time=0.001]'``
(the ODE flow shrunk to the identity: PANet's head plus R-PNODE's regularisers), or
``'r-pnode[consistency_weight=0]'``.

Finished runs are kept under ``--out`` (a stopped benchmark continues where it stopped); the table is
printed and written to ``OUT/rpnode_robustness.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from advframe import PluginError, hookimpl
from advframe.attacks import project
from advframe.config import resolve
from advframe.cost import QueryCounter
from advframe.plugins import make_plugin_host
from advframe.runner import Run

METHODS = ("panet", "pnode", "r-pnode")
ATTACKS = (("FGSM", "robust_dice/fgsm-1"), ("PGD-10", "robust_dice/pgd-10"),
           ("Square", "robust_dice/dense-square"))


# -- the gradient-free attack -------------------------------------------------------------------------

class FlatScores(nn.Module):
    """The segmenter's logits as one row per image (what a QueryCounter accepts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return self.model(inputs).flatten(1)


class DenseSquare:
    """``dense-square``: L-inf Square-style random search raising the mean per-pixel cross-entropy of
    a segmenter; ``budget`` queries per image, all through a :class:`QueryCounter`."""

    __name__ = "rpnode_robustness.DenseSquare"

    @staticmethod
    @hookimpl
    def default_config():
        return {"budget": 100, "p_init": 0.05}

    @staticmethod
    @hookimpl
    def generate_perturbation(model, inputs, labels, params, ctx):
        from advframe_square import initial_delta, linf_step, p_schedule

        if params["norm"] != "linf" or labels.dim() != 3:
            raise PluginError("dense-square attacks segmenters (labels B x H x W) under the linf norm")
        eps, budget, bounds = params["eps"], params["budget"], ctx.input_bounds
        counter = QueryCounter(FlatScores(model), len(inputs), budget=budget, attack="dense-square")

        def pixel_ce(candidate):
            logits = counter(inputs + candidate).view(len(inputs), -1, *labels.shape[-2:])
            return torch.nn.functional.cross_entropy(logits, labels, reduction="none").flatten(1).mean(1)

        delta = project(initial_delta(inputs, eps, "linf", ctx.generator), inputs, eps, "linf", bounds)
        best = pixel_ce(delta)
        for iteration in range(budget - 1):
            p = p_schedule(params["p_init"], iteration, budget)
            candidate = project(linf_step(inputs, delta, p, eps, ctx.generator), inputs, eps, "linf", bounds)
            loss = pixel_ce(candidate)
            better = loss > best
            delta[better], best[better] = candidate[better], loss[better]
        return (inputs + delta).detach()


# -- runs --------------------------------------------------------------------------------------------

def host_with_attack():
    host = make_plugin_host()
    host.register(DenseSquare(), "dense-square", distribution="benchmarks/rpnode_robustness.py")
    return host


def parse_variant(label: str) -> tuple[str, dict]:
    """``r-pnode[ode_time=0.001,cluster_weight=0]`` -> ("r-pnode", {"ode_time": 0.001, "cluster_weight": 0.0})."""
    import yaml

    method, _, rest = label.partition("[")
    if method not in METHODS or (rest and not rest.endswith("]")):
        raise SystemExit(f"unknown method or variant {label!r}: use one of {', '.join(METHODS)}, "
                         f"e.g. r-pnode[cluster_weight=0]")
    settings = {}
    for item in filter(None, rest[:-1].split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    return method, settings


def run_config(host, label: str, seed: int, args) -> dict:
    method, settings = parse_variant(label)
    # labels of their own, so the metric names below do not depend on eps or the core's label format
    attacks = [{"name": "fgsm", "stop_on_success": False, "label": "fgsm-1"},
               {"name": "pgd", "steps": 10, "restarts": 1, "stop_on_success": False, "label": "pgd-10"},
               {"name": "dense-square", "budget": args.square_queries, "label": "dense-square"}]
    per_epoch = args.episodes // args.epochs
    user = {"seed": seed, "attack": {"eps": args.eps}, "eval": {"attacks": attacks},
            "train": {"epochs": args.epochs},
            "meta": {"tasks_per_epoch": per_epoch, "test_tasks": args.test_tasks}}
    user["plugins"] = {method: {**({} if method == "panet" else {"steps": args.ode_steps}), **settings}}
    return resolve(host, user, [], method)


def feature_shift(run: Run, eps: float) -> float:
    """Mean over test tasks of ||F(x_fgsm) - F(x)|| / ||F(x)|| on the query (F: the trained features)."""
    ctx, shifts = run.ctx, []
    params = ctx.attack_settings("fgsm", eps=eps, stop_on_success=False)
    with ctx.evaluation_randomness(run.config["seed"] + 4242), ctx.counter.paused():
        for task in ctx.test_tasks:
            adapted = ctx.adapt(run.model, task)
            adversarial = ctx.attack(adapted, task.query_inputs, task.query_labels, params)
            with torch.no_grad():
                clean, moved = run.model(task.query_inputs), run.model(adversarial)
            shifts.append(((moved - clean).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1)).mean().item())
    ctx.clear_predictions()
    return statistics.fmean(shifts)


def one_run(method: str, seed: int, args) -> dict:
    folder = Path(args.out) / f"seed{seed}" / method.replace("[", "_").replace("]", "").replace(",", "_")
    done = folder / "benchmark.json"
    if done.is_file():
        return json.loads(done.read_text())
    if folder.exists():  # an unfinished run: start it again
        import shutil

        shutil.rmtree(folder)
    host = host_with_attack()
    run = Run.start(host, run_config(host, method, seed, args), folder)
    results = run.execute()
    results["feature_shift"] = feature_shift(run, args.eps)
    done.write_text(json.dumps(results, indent=2) + "\n")
    return results


# -- the table -----------------------------------------------------------------------------------------

def cell(values: list[float], cis: list[float] | None = None, digits: int = 3) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text + (f" [{statistics.fmean(cis):.{digits}f}]" if cis else "")


def table(results: dict[str, list[dict]], args) -> str:
    header = ["method", "clean Dice", *(name for name, _ in ATTACKS), "feature shift (FGSM)",
              "train grad evals", "train process s", "wall s"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in results.items():
        metrics = [r["metrics"] for r in runs]
        cost = [r["cost"] for r in runs]
        row = [method, cell([m["dice"] for m in metrics], [m["dice_ci95"] for m in metrics])]
        for _, key in ATTACKS:
            ci_key = key.replace("robust_dice/", "robust_dice_ci95/")
            row.append(cell([m[key] for m in metrics], [m[ci_key] for m in metrics]))
        row.append(cell([r["feature_shift"] for r in runs]))
        row.append(f"{statistics.fmean(c['gradient_evaluations'] for c in cost):,.0f}")
        row.append(cell([c["process_seconds"] - c["eval_process_seconds"] for c in cost], digits=0))
        row.append(cell([c["wall_seconds"] for c in cost], digits=0))
        rows.append("| " + " | ".join(row) + " |")
    seeds = len(next(iter(results.values())))
    settings = (f"{seeds} seed(s); {args.episodes} training episodes (1-way 1-shot, 1 query, 5 per Adam step, "
                f"{args.epochs} epochs), {args.test_tasks} fixed test tasks, L-inf eps {args.eps} on the query; "
                f"ODE: RK4 {args.ode_steps} steps over T = 4 (unless a variant sets ode_time); Square: {args.square_queries} queries per query image")
    return "\n".join(rows) + "\n\n" + settings + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--test-tasks", type=int, default=60)
    parser.add_argument("--ode-steps", type=int, default=4)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--square-queries", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="panet, pnode, r-pnode, or variants with plugin settings: 'r-pnode[ode_time=0.001]'")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {m: [] for m in args.methods}
    for seed in range(args.seeds):
        for method in args.methods:
            result = one_run(method, seed, args)
            results[method].append(result)
            m = result["metrics"]
            print(f"seed {seed} {method}: dice {m['dice']:.3f} fgsm {m['robust_dice/fgsm-1']:.3f} "
                  f"pgd {m['robust_dice/pgd-10']:.3f} square {m['robust_dice/dense-square']:.3f} "
                  f"shift {result['feature_shift']:.3f} ({result['cost']['wall_seconds']:.0f} s)", flush=True)
    text = table(results, args)
    command = "python benchmarks/rpnode_robustness.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    (Path(args.out) / "rpnode_robustness.md").write_text(f"`{command}`\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
