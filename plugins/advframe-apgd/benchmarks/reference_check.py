"""Does this package's APGD / FAB-T match the reference? Robust accuracy of APGD-CE, APGD-DLR, APGD-T
and FAB-T here against torchattacks' ports of the reference code (torchattacks.APGD, APGDT and FAB with
``multi_targeted``, which follow fra31/auto-attack), on the same adversarially trained models and test
images, with AutoAttack's settings (100 iterations, 9 target classes, 1 restart).

Models: small-cnn (width 16, BatchNorm) trained with PGD-10 AT (L-inf eps 0.2, 3 epochs, Adam 1e-3) on
the embedded MNIST subset, one per seed; each seed also seeds the attacks. Reported: robust accuracy
(clean-correct and still correct after the attack) mean ± std over seeds, and process seconds.

Setup: ``pip install --no-deps torchattacks`` (its metadata would pull torchvision and a CUDA torch).

Usage::

    OMP_NUM_THREADS=1 flock /tmp/advframe-bench-c.lock python plugins/advframe-apgd/benchmarks/reference_check.py \
        --seeds 3 --examples 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from advframe_apgd import apgd, apgd_targeted
from advframe_apgd.fab import fab_targeted

from advframe import attacks, data, models


def train(splits, epochs: int, eps: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build({"name": "small-cnn", "args": {}}, splits.input_shape, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(splits.train), generator=generator)
        for start in range(0, len(order), 128):
            inputs, labels = splits.train.batch(order[start:start + 128])
            inputs = attacks.pgd(model, inputs, labels, eps=eps, alpha=eps / 4, steps=10, generator=generator)
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    return model.eval()


def ours(model, eps, steps, seed):
    def generator():
        return torch.Generator().manual_seed(seed)
    return {
        "APGD-CE": lambda x, y: apgd(model, x, y, eps=eps, steps=steps, loss="ce", generator=generator()).adversarial,
        "APGD-DLR": lambda x, y: apgd(model, x, y, eps=eps, steps=steps, loss="dlr", generator=generator()).adversarial,
        "APGD-T": lambda x, y: apgd_targeted(model, x, y, eps=eps, steps=steps, generator=generator()).adversarial,
        "FAB-T": lambda x, y: fab_targeted(model, x, y, eps=eps, steps=steps)[0],
    }


def reference(model, eps, steps, seed, torchattacks):
    return {
        "APGD-CE": torchattacks.APGD(model, eps=eps, steps=steps, loss="ce", seed=seed),
        "APGD-DLR": torchattacks.APGD(model, eps=eps, steps=steps, loss="dlr", seed=seed),
        "APGD-T": torchattacks.APGDT(model, eps=eps, steps=steps, seed=seed, n_classes=10),
        "FAB-T": torchattacks.FAB(model, eps=eps, steps=steps, seed=seed, multi_targeted=True, n_classes=10),
    }


def robust(model, attack, inputs, labels, batch_size):
    start = time.process_time()
    kept = []
    for begin in range(0, len(inputs), batch_size):
        x, y = inputs[begin:begin + batch_size], labels[begin:begin + batch_size]
        adversarial = attack(x, y)
        assert (adversarial - x).abs().max() <= ATTACK_EPS + 1e-5 and 0 <= adversarial.min() <= adversarial.max() <= 1
        with torch.no_grad():
            kept.append((model(adversarial).argmax(1) == y) & (model(x).argmax(1) == y))
    return torch.cat(kept).float().mean().item(), time.process_time() - start


ATTACK_EPS = 0.2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed: pip install --no-deps torchattacks")
        sys.exit(0)
    torch.set_num_threads(1)
    splits = data.load({"name": "mnist"})
    # a fixed random subset (the test split is sorted by class)
    order = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(data.SPLIT_SEED))
    inputs, labels = splits.test.batch(order[: args.examples].sort().values)
    rows: dict[str, dict[str, list]] = {}
    for seed in range(args.seeds):
        model = train(splits, args.epochs, ATTACK_EPS, seed)
        with torch.no_grad():
            clean = (model(inputs).argmax(1) == labels).float().mean().item()
        rows.setdefault("clean", {}).setdefault("advframe", []).append((clean, 0.0))
        mine = ours(model, ATTACK_EPS, args.steps, seed)
        theirs = reference(model, ATTACK_EPS, args.steps, seed, torchattacks)
        for name in mine:
            for label, attack in (("advframe", mine[name]), ("torchattacks", theirs[name])):
                rows.setdefault(name, {}).setdefault(label, []).append(
                    robust(model, attack, inputs, labels, args.batch_size))
        print(f"seed {seed} done", flush=True)
    print(f"\nPGD-AT small-cnn, MNIST, L-inf eps {ATTACK_EPS}, {args.examples} test images, {args.steps} iterations, "
          f"{args.seeds} seeds (mean ± std)\n")
    print("| attack | advframe robust % | reference port robust % | advframe process s | port process s |")
    print("|---|---|---|---|---|")
    for name, by in rows.items():
        cells = [name]
        for label in ("advframe", "torchattacks"):
            values = [v[0] for v in by.get(label, [])]
            cells.append(f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
                         if len(values) > 1 else (f"{100 * values[0]:.1f}" if values else "–"))
        for label in ("advframe", "torchattacks"):
            values = [v[1] for v in by.get(label, [])]
            cells.append(f"{statistics.fmean(values):.1f}" if values and name != "clean" else "–")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
