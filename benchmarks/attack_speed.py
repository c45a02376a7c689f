"""advframe's PGD against torchattacks' PGD (and ART's, if installed) on the same model, inputs, eps,
steps, step size and random start, interleaved in one process.

advframe's evaluation PGD (the ``pgd`` plugin with ``stop_on_success: true``, the default
``eval.attacks`` entry) is the core primitive ``advframe.attacks.pgd``: it freezes every example at
its first misclassified iterate, so the robust accuracy can only fall (an example counts as broken
once any iterate breaks it, where torchattacks looks only at the last iterate) and the time falls
with every example broken. ``advframe (no early stop)`` is the same primitive without it, to separate
the loop from the early stopping.

Two more rows measure a proposed core change, not what advframe does today: ``advframe + proposed
patch`` runs the same core PGD on the model with eval-mode BatchNorm folded into its convolutions and
channels-last memory (the same function up to float rounding; see ``proposed_view``), and
``torchattacks, same patched model`` gives torchattacks that model too, so the table separates what
the transformation buys any library from what advframe's early stop adds.

Two models by default, both small-cnn (width 16, BatchNorm) on the embedded MNIST subset (4,000 train
/ 1,000 test): ``natural`` (2 epochs of plain training: most examples break within a few steps) and
``robust`` (PGD-AT, PGD-10 at eps 0.2 for ``--robust-epochs`` epochs: most examples never break, so the
early stop saves little). Threat model: L-inf eps 0.2, ``--steps`` steps of 2.5 eps / steps, uniform
random start (advframe's defaults), batches of 500 (advframe's ``eval.batch_size``).

Each repeat attacks the whole test set once with every implementation, in an order that alternates
between repeats; one untimed warm-up pass each first. Reported per implementation: robust accuracy
(clean-correct and still correct; mean ± std over repeats, each repeat with its own random start),
process and wall seconds, gradient evaluations (examples in forward passes that build a graph), and
throughput relative to torchattacks (per-repeat ratio of times, mean ± std).

Setup (torchattacks' metadata would pull torchvision and a CUDA torch, so install it alone)::

    pip install --no-deps torchattacks

Usage::

    flock /tmp/advframe-bench.lock python benchmarks/attack_speed.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from advframe import attacks, data, models
from advframe.cost import GradientCounter


def load_torchattacks():
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed. Install it without its dependencies (they would pull "
              "torchvision and a CUDA torch):\n\n    pip install --no-deps torchattacks\n")
        sys.exit(0)
    return torchattacks


def load_art():
    try:
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        return None
    return ProjectedGradientDescent, PyTorchClassifier


def train(splits, kind: str, epochs: int, eps: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build({"name": "small-cnn", "args": {}}, splits.input_shape, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(splits.train), generator=generator)
        for start in range(0, len(order), 128):
            inputs, labels = splits.train.batch(order[start:start + 128])
            if kind == "robust":
                inputs = attacks.pgd(model, inputs, labels, eps=eps, alpha=2.5 * eps / 10, steps=10,
                                     generator=generator)
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval()


class Wrapped(torch.nn.Module):
    """The model behind a module the gradient counter can hook (the model itself stays hook-free, so
    ``torch.fx`` can copy it); ``channels_last`` also hands it channels-last inputs."""

    def __init__(self, model: torch.nn.Module, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model

    def forward(self, inputs):
        return self.model(inputs.contiguous(memory_format=torch.channels_last) if self.channels_last else inputs)


def proposed_view(model: torch.nn.Module, counter: GradientCounter) -> torch.nn.Module:
    """The model as the proposed core patch would attack it: the same function (up to float rounding),
    with eval-mode BatchNorm folded into the convolution before it (``torch.fx`` fusion) and
    channels-last memory, which makes a forward and backward pass cheaper on CPU. Built per call, as
    the core would (a training attack sees new weights at every step)."""
    from torch.fx.experimental.optimization import fuse

    view = Wrapped(fuse(model), channels_last=True).eval()
    counter.attach(view)
    return view


def implementations(model, eps: float, alpha: float, steps: int, torchattacks, art, counter: GradientCounter):
    counted = Wrapped(model).eval()
    counter.attach(counted)

    def advframe_pgd(stop_on_success, patched=False):
        def run(inputs, labels, seed):
            target = proposed_view(model, counter) if patched else counted
            return attacks.pgd(target, inputs, labels, eps=eps, alpha=alpha, steps=steps, random_start="uniform",
                               stop_on_success=stop_on_success, generator=torch.Generator().manual_seed(seed))
        return run

    def torchattacks_pgd(patched=False):
        reference = torchattacks.PGD(counted, eps=eps, alpha=alpha, steps=steps, random_start=True)

        def run(inputs, labels, seed):
            torch.manual_seed(seed)
            if patched:
                return torchattacks.PGD(proposed_view(model, counter), eps=eps, alpha=alpha, steps=steps,
                                        random_start=True)(inputs, labels)
            return reference(inputs, labels)
        return run

    table = {"advframe": advframe_pgd(True), "advframe (no early stop)": advframe_pgd(False),
             "torchattacks": torchattacks_pgd(),
             "advframe + proposed patch": advframe_pgd(True, patched=True),
             "torchattacks, same patched model": torchattacks_pgd(patched=True)}
    if art is not None:
        ProjectedGradientDescent, PyTorchClassifier = art
        classifier = PyTorchClassifier(counted, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                       nb_classes=10, clip_values=(0.0, 1.0))
        attack = ProjectedGradientDescent(classifier, norm="inf", eps=eps, eps_step=alpha, max_iter=steps,
                                          num_random_init=1, batch_size=500, verbose=False)

        def art_pgd(inputs, labels, seed):
            torch.manual_seed(seed)
            import numpy as np

            np.random.seed(seed)
            return torch.from_numpy(attack.generate(inputs.numpy(), labels.numpy()))

        table["ART"] = art_pgd
    return table


def attack_all(run, model, dataset, batch_size: int, seed: int, counter: GradientCounter):
    counter.count = 0
    robust = []
    start_process, start_wall = time.process_time(), time.perf_counter()
    for index, (inputs, labels) in enumerate(dataset.batches(batch_size)):
        adversarial = run(inputs, labels, seed * 1000 + index)
        with torch.no_grad():
            robust.append((model(adversarial).argmax(1) == labels) & (model(inputs).argmax(1) == labels))
    process, wall = time.process_time() - start_process, time.perf_counter() - start_wall
    return torch.cat(robust).float().mean().item(), process, wall, counter.count


def mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def benchmark(model, dataset, args, torchattacks, art) -> str:
    alpha = 2.5 * args.eps / args.steps
    counter = GradientCounter()
    table = implementations(model, args.eps, alpha, args.steps, torchattacks, art, counter)
    names = list(table)
    for name in names:  # warm-up, untimed
        attack_all(table[name], model, dataset.subset(torch.arange(args.batch_size)), args.batch_size, 0, counter)
    rows = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            rows[name].append(attack_all(table[name], model, dataset, args.batch_size, repeat + 1, counter))
    counter.detach()
    reference = rows["torchattacks"]
    header = ["attack", "robust acc %", "process s", "wall s", "grad. evals", "examples/s (process)",
              "× torchattacks (process)", "× torchattacks (wall)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        accuracy, process, wall, grads = zip(*rows[name])
        ratio_process = [r[1] / p for r, p in zip(reference, process)]
        ratio_wall = [r[2] / w for r, w in zip(reference, wall)]
        cells = [name, mean_std(accuracy, 100, 1), mean_std(process), mean_std(wall), f"{statistics.fmean(grads):,.0f}",
                 f"{len(dataset) / statistics.fmean(process):.0f}", mean_std(ratio_process), mean_std(ratio_wall)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="natural,robust", help="comma-separated: natural, robust")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--robust-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torchattacks = load_torchattacks()
    art = load_art()
    torch.set_num_threads(args.threads)
    splits = data.load({"name": "mnist"})
    print(f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, ART {'present' if art else 'absent'}, "
          f"{args.threads} thread(s); L-inf eps {args.eps}, {args.steps} steps of {2.5 * args.eps / args.steps:.4f}, "
          f"uniform start; {len(splits.test)} test images in batches of {args.batch_size}; {args.repeats} repeats")
    for kind in args.models.split(","):
        epochs = 2 if kind == "natural" else args.robust_epochs
        model = train(splits, kind, epochs, args.eps, args.seed)
        with torch.no_grad():
            clean = sum((model(x).argmax(1) == y).sum().item() for x, y in splits.test.batches(500)) / len(splits.test)
        print(f"\n### {kind} model ({epochs} epochs{', PGD-10 AT' if kind == 'robust' else ''}), "
              f"clean accuracy {100 * clean:.1f}%\n")
        print(benchmark(model, splits.test, args, torchattacks, art), flush=True)


if __name__ == "__main__":
    main()
