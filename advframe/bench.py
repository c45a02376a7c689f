"""``advframe bench``: several methods on one config, side by side, over seeds.

Every method runs with the same data, model, epochs, training attack budget, evaluation attacks and
seeds; each run is an ordinary run directory under ``OUT/<label>/seed-<s>``, so a bench that is
stopped continues where it stopped (finished runs are kept, an interrupted one is resumed). The
summary (mean and standard deviation over seeds) is printed and saved as ``summary.md``,
``summary.csv`` and ``robust_vs_time.png``; ``runs.csv`` holds every run.

A method entry is a plugin name, optionally with settings in brackets, which make it a variant:
``trades[beta=1]`` sets ``plugins.trades.beta``; a dotted key is a config key, as in
``fgsm-rs[train.epochs=10;attack.steps=1]``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advframe import config as config_module
from advframe.errors import ConfigError

COLUMNS = ("clean_accuracy", "robust_accuracy", "worst_class_robust_accuracy")


@dataclass
class Method:
    label: str
    plugin: str
    overrides: list[str] = field(default_factory=list)


def parse_methods(text: str) -> list[Method]:
    """``"pgd-at,trades[beta=1;train.lr=0.1]"`` -> methods, splitting on commas outside brackets."""
    entries, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    entries.append(current)
    methods = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        plugin, _, settings = entry.partition("[")
        if settings and not settings.endswith("]"):
            raise ConfigError(f"bench method {entry!r}: settings go in brackets, e.g. trades[beta=1]")
        overrides = []
        for item in filter(None, (s.strip() for s in settings[:-1].split(";"))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"bench method {entry!r}: expected key=value, got {item!r}")
            overrides.append(f"{key}={value}" if "." in key else f"plugins.{plugin.strip()}.{key}={value}")
        methods.append(Method(entry, plugin.strip(), overrides))
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError("bench: a method is listed twice")
    return methods


def folder_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def run_bench(host, methods: list[Method], seeds: int, user: dict, overrides: list[str], out_dir: Path,
              *, progress=None, echo=print) -> list[dict[str, Any]]:
    """Run (or finish) every method x seed; one record per run."""
    from advframe.runner import Run

    # validate every configuration before the first minute of compute
    plans = []  # seed-major: a bench stopped early still has every method on its first seeds
    for seed in range(seeds):
        for method in methods:
            config = config_module.resolve(host, user, [*overrides, *method.overrides, f"seed={seed}"], method.plugin)
            plans.append((method, seed, config))
    records = []
    for index, (method, seed, config) in enumerate(plans, 1):
        run_dir = out_dir / folder_name(method.label) / f"seed-{seed}"
        results_path = run_dir / "results.json"
        if results_path.exists():
            echo(f"[{index}/{len(plans)}] {method.label} seed {seed}: done before, kept")
            results = json.loads(results_path.read_text())
        else:
            echo(f"[{index}/{len(plans)}] {method.label} seed {seed}")
            if (run_dir / "state.safetensors").exists():
                run = Run.resume(host, run_dir, progress=progress)
            else:
                if run_dir.exists():  # started but never saved a state: nothing to keep
                    for leftover in run_dir.iterdir():
                        leftover.unlink()
                run = Run.start(host, config, run_dir, progress=progress)
            results = run.execute()
        records.append({"method": method.label, "seed": seed, "results": results})
    return records


def summarise(records: list[dict[str, Any]], baseline: str | None, extra: list[str] = ()) -> list[dict[str, Any]]:
    """Mean and standard deviation per method, and cost relative to ``baseline``."""
    by_method: dict[str, list[dict]] = {}
    for record in records:
        by_method.setdefault(record["method"], []).append(record["results"])
    rows = []
    for method, runs in by_method.items():
        row: dict[str, Any] = {"method": method, "seeds": len(runs)}
        for key in (*COLUMNS, *extra):
            values = [r["metrics"].get(key) for r in runs if isinstance(r["metrics"].get(key), (int, float))]
            row[key] = _stats(values)
        for key in ("gradient_evaluations", "process_seconds", "wall_seconds"):
            row[key] = _stats([r["cost"][key] for r in runs])
        rows.append(row)
    reference = next((r for r in rows if r["method"] == baseline), None)
    for row in rows:
        for key in ("gradient_evaluations", "process_seconds", "wall_seconds"):
            row[f"{key}_relative"] = (row[key][0] / reference[key][0]) if reference and reference[key][0] else None
    return rows


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return (math.nan, math.nan)
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(stat: tuple[float, float]) -> str:
    return f"{100 * stat[0]:.1f} ± {100 * stat[1]:.1f}"


def markdown(rows: list[dict[str, Any]], baseline: str | None, extra: list[str] = ()) -> str:
    base = baseline or "baseline"
    header = ["method", "clean %", "robust % (worst case)", "worst-class robust %", *extra, "grad. evals",
              f"× {base} (grad.)", "process s", f"× {base} (process)", "wall s", f"× {base} (wall)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], *(_pct(row[c]) for c in COLUMNS)]
        cells += [_pct(row[k]) if "accuracy" in k else f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in extra]
        for key in ("gradient_evaluations", "process_seconds", "wall_seconds"):
            mean, std = row[key]
            cells.append(f"{mean:,.0f}" if key == "gradient_evaluations" else f"{mean:.0f} ± {std:.0f}")
            relative = row[f"{key}_relative"]
            cells.append(f"{relative:.2f}" if relative is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from advframe.checkpoint import atomic_write_text

    header = []
    for key, value in rows[0].items():
        header += [f"{key}_mean", f"{key}_std"] if isinstance(value, tuple) else [key]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow([part for value in row.values() for part in (value if isinstance(value, tuple) else (value,))])
    atomic_write_text(path, buffer.getvalue())


def write_runs_csv(path: Path, records: list[dict[str, Any]]) -> None:
    from advframe.checkpoint import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "seed", *COLUMNS, "gradient_evaluations", "process_seconds", "wall_seconds"])
    for record in records:
        metrics, cost = record["results"]["metrics"], record["results"]["cost"]
        writer.writerow([record["method"], record["seed"], *(metrics.get(c) for c in COLUMNS),
                         cost["gradient_evaluations"], cost["process_seconds"], cost["wall_seconds"]])
    atomic_write_text(path, buffer.getvalue())


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Robust accuracy against wall time (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for row in rows:
        (time_mean, time_std), (acc_mean, acc_std) = row["wall_seconds"], row["robust_accuracy"]
        axis.errorbar(time_mean, 100 * acc_mean, xerr=time_std, yerr=100 * acc_std, fmt="o", capsize=3)
        axis.annotate(row["method"], (time_mean, 100 * acc_mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.set_xlabel("training wall time (s)")
    axis.set_ylabel("robust accuracy, worst case over eval.attacks (%)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
