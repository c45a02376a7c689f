"""Per-epoch training logs of an ``advframe bench`` folder, mean ± std over seeds, as a markdown table.

    python plugins/advframe-adv4adv/benchmarks/discriminator_curve.py /tmp/bench-adv4adv \\
        --key discriminator_accuracy --key adversarial_accuracy

Reads ``<bench>/<method>/seed-<s>/metrics.jsonl`` (one line per epoch) and prints one row per method
that logged the key, one column per epoch. Adv-4-Adv's mechanism shows here: the logit discriminators'
domain accuracy on the training batches moves towards chance (0.5) when their gradient is reversed
into the model, and stays high for the monitor of FGSM-AT (``adv4adv[gamma=0]``), which learns on
detached logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def curves(bench: Path, key: str) -> dict[str, list[list[float]]]:
    """method folder -> per seed, the key's value per epoch."""
    found: dict[str, list[list[float]]] = {}
    for method in sorted(p for p in bench.iterdir() if p.is_dir()):
        for seed in sorted(method.glob("seed-*")):
            path = seed / "metrics.jsonl"
            if not path.exists():
                continue
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            values = [line[key] for line in lines if key in line]
            if values:
                found.setdefault(method.name, []).append(values)
    return found


def table(found: dict[str, list[list[float]]], key: str) -> str:
    epochs = max((len(v) for runs in found.values() for v in runs), default=0)
    lines = [f"| method ({key}) | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
             "|---|" + "---|" * epochs]
    for method, runs in found.items():
        cells = []
        for epoch in range(epochs):
            values = [run[epoch] for run in runs if len(run) > epoch]
            if not values:
                cells.append("–")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="the --out folder of advframe bench")
    parser.add_argument("--key", action="append", default=None, help="a metrics.jsonl key (repeatable)")
    args = parser.parse_args()
    for key in args.key or ["discriminator_accuracy"]:
        print(table(curves(args.bench, key), key))


if __name__ == "__main__":
    main()
