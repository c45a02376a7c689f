"""What the framework costs: one PGD-AT epoch through advframe against a hand-written PyTorch loop
doing the same arithmetic (same model, initial weights, data order, PGD-10 with the same random
starts, same optimizer), interleaved in one process.

The hand-written loop is what a researcher would write without a framework. Both end with the same
weights (checked), so the time difference is the framework alone: plugin dispatch, the perturbation
checks, the gradient counter, learning-rate scheduling, logging and the checkpoints it writes.

Usage::

    python benchmarks/overhead.py --repeats 5

Prints the time per epoch of each (process time and wall time, median over repeats) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from advframe import config as config_module
from advframe.plugins import make_plugin_host
from advframe.runner import Run, learning_rate

SETTINGS = ["train.epochs=1", "train.monitor_examples=0", "attack.steps=10", "train.method=pgd-at"]


def advframe_epoch(host, config, folder: Path) -> tuple[Run, float, float]:
    run = Run.start(host, config, folder)
    start_process, start_wall = time.process_time(), time.perf_counter()
    run.train()
    return run, time.process_time() - start_process, time.perf_counter() - start_wall


def hand_written_epoch(host, config) -> tuple[torch.nn.Module, float, float]:
    """The same epoch as plain PyTorch (setup is shared code and not timed)."""
    run = Run(host, config, None)  # only to build the same data and initial model; nothing is written
    model, train = run.model, run.splits.train
    attack, train_config = config["attack"], config["train"]
    eps, steps = attack["eps"], attack["steps"]
    alpha = attack["alpha"] if attack["alpha"] is not None else 2.5 * eps / steps
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config["lr"], weight_decay=train_config["weight_decay"])
    generator = torch.Generator().manual_seed(config["seed"])
    batch_size = train_config["batch_size"]
    batches = -(-len(train) // batch_size)

    start_process, start_wall = time.process_time(), time.perf_counter()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config["seed"] * 100003))
    model.train()
    for index in range(batches):
        inputs, labels = train.batch(order[index * batch_size:(index + 1) * batch_size])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(train_config["lr"], index / batches, train_config, 1)
        model.eval()
        delta = (torch.rand(inputs.shape, generator=generator) * 2 - 1) * eps
        delta = torch.max(torch.min(delta, 1 - inputs), -inputs)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(inputs + delta), labels, reduction="none").sum()
            grad, = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
            delta = torch.max(torch.min(delta, 1 - inputs), -inputs)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs + delta), labels).backward()
        optimizer.step()
    return model, time.process_time() - start_process, time.perf_counter() - start_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    host = make_plugin_host()
    config = config_module.resolve(host, {}, [*SETTINGS, *args.overrides])
    times = {"advframe": {"process": [], "wall": []}, "hand-written": {"process": [], "wall": []}}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            order = ("advframe", "hand-written") if repeat % 2 == 0 else ("hand-written", "advframe")
            for name in order:
                if name == "advframe":
                    run, process, wall = advframe_epoch(host, config, Path(scratch) / f"run{repeat}")
                    framework_weights = run.model.state_dict()
                else:
                    model, process, wall = hand_written_epoch(host, config)
                    hand_weights = model.state_dict()
                times[name]["process"].append(process)
                times[name]["wall"].append(wall)
            same = all(torch.allclose(framework_weights[k].float(), hand_weights[k].float(), atol=1e-5)
                       for k in framework_weights)
            print(f"repeat {repeat + 1}: advframe {times['advframe']['wall'][-1]:.2f} s, hand-written "
                  f"{times['hand-written']['wall'][-1]:.2f} s (wall); same final weights: {same}")
            if not same:
                raise SystemExit("the two loops did not do the same arithmetic; the comparison is void")
    print(f"\nOne PGD-AT epoch (PGD-{config['attack']['steps']}, {config['model']['name']}, "
          f"{config['data']['name']}), median of {args.repeats} interleaved repeats:\n")
    print("| loop | process s | wall s |\n|---|---|---|")
    for name, measured in times.items():
        print(f"| {name} | {statistics.median(measured['process']):.2f} | {statistics.median(measured['wall']):.2f} |")
    for kind in ("process", "wall"):
        ratios = [a / b for a, b in zip(times["advframe"][kind], times["hand-written"][kind])]
        print(f"\n{kind} time ratio advframe / hand-written: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
