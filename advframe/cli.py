"""The ``advframe`` command line.

Plugins are loaded inside each command, never at import, so ``--help`` and ``advframe plugins`` keep
working when a plugin is broken. Every :class:`advframe.AdvframeError` ends the command with one line
and a non-zero exit; set ``ADVFRAME_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import click

from advframe import __version__
from advframe.errors import AdvframeError


class Command(click.Group):
    """Turns advframe errors into one clean line."""

    def invoke(self, ctx):
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except AdvframeError as exc:
            if os.environ.get("ADVFRAME_DEBUG"):
                raise
            click.secho(f"Error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.secho("Interrupted. A run continues with `advframe run --resume RUN_DIR`.", fg="yellow", err=True)
            ctx.exit(130)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def _host():
    from advframe.plugins import make_plugin_host

    return make_plugin_host()


@contextlib.contextmanager
def _progress():
    """A live progress display on stderr (rank 0 only; ADVFRAME_PROGRESS=0 turns it off)."""
    if os.environ.get("ADVFRAME_PROGRESS", "1") == "0" or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress


def _print_results(results: dict, out_dir: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics, cost = results["metrics"], results.get("cost", {})
    summary = results.get("evaluation")
    caption = f"protocol {summary['protocol']}: robust_accuracy is the {summary['robust_accuracy']}" if summary else None
    table = Table(title="Results" + (f" ({out_dir})" if out_dir else ""), caption=caption)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if not isinstance(value, list):
            table.add_row(key, _format(key, value))
    for key in ("gradient_evaluations", "forward_passes", "process_seconds", "wall_seconds"):
        if key in cost:
            table.add_row(key, f"{cost[key]:.1f} s" if key.endswith("seconds") else f"{cost[key]:,.0f}")
    console = Console()
    console.print(table)
    per_class = {k: v for k, v in metrics.items() if isinstance(v, list)}
    if per_class:
        classes = Table(title="Per class" + (" (robust: the worst case over the protocol's attacks)" if summary else ""))
        classes.add_column("class", justify="right")
        for key in per_class:
            classes.add_column(key.removeprefix("per_class_"), justify="right")
        for index in range(max(len(v) for v in per_class.values())):
            cells = [_format(key, values[index]) if index < len(values) else "" for key, values in per_class.items()]
            classes.add_row(str(index), *cells)
        console.print(classes)


def _format(key: str, value: float) -> str:
    return f"{100 * value:.1f}%" if "accuracy" in key or "_rate" in key else f"{value:.2f}"


def _version(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"advframe {__version__}")
    host = _host()
    third_party = sorted((info for info in host.infos.values() if not info.builtin), key=lambda i: i.name)
    if third_party:
        click.echo("registered plugins:")
    for info in third_party:
        status = f"  (failed to load: {info.error})" if info.error else ""
        click.echo(f"  {info.name}: {info.distribution} {info.version}{status}")
    ctx.exit()


@click.group(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show the core and plugin versions and exit.")
def cli():
    """advframe: adversarial training, attacks and robust meta-learning as plugins."""


@cli.command()
@click.option("--plugin", "plugin", help="Plugin to run: fills every role its hooks implement (e.g. bat).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: runs/METHOD-TIME).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path), help="Continue the run in this directory.")
def run(plugin, config_file, overrides, out_dir, resume_dir):
    """Train and evaluate one method; write a run directory."""
    from advframe import config as config_module
    from advframe import distributed
    from advframe.errors import ConfigError
    from advframe.runner import Run

    host = _host()
    try:
        with _progress() as progress:
            if resume_dir:
                if plugin or config_file or overrides or out_dir:
                    raise ConfigError("--resume continues a run exactly as configured; "
                                      "drop --plugin, --config, --set and --out")
                if (resume_dir / "results.json").exists():
                    raise ConfigError(f"{resume_dir} has finished; evaluate it again with `advframe eval {resume_dir}`")
                runner = Run.resume(host, resume_dir, progress=progress)
            else:
                user = config_module.load_file(config_file) if config_file else {}
                config = config_module.resolve(host, user, overrides, plugin)
                runner = Run.start(host, config, out_dir, progress=progress)
            results = runner.execute()
        if distributed.rank() == 0:
            _print_results(results, runner.out_dir)
            click.echo(f"Run directory: {runner.out_dir}")
    finally:
        distributed.shutdown()


@cli.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--attack", "attacks", multiple=True, help="Attack plugin to evaluate with (repeatable; default: the run's eval.attacks).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override an evaluation setting (eval.*, attack.eps, plugins.*).")
def evaluate(run_dir, attacks, overrides):
    """Evaluate a saved model again, with its attacks or others."""
    from datetime import datetime

    from advframe import checkpoint
    from advframe import config as config_module
    from advframe.errors import CheckpointError, ConfigError
    from advframe.runner import Run, evaluation_summary

    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    host = _host()
    user = config_module.load_file(run_dir / "config.yaml")
    for item in overrides:
        key = item.partition("=")[0]
        if key.split(".")[0] not in ("eval", "attack", "plugins", "device", "data"):
            raise ConfigError(f"--set {key}: advframe eval only changes evaluation settings (eval.*, attack.eps, ...)")
    if attacks:
        user["eval"]["attacks"] = [{"name": name} for name in attacks]
        user["eval"]["protocol"] = "custom"
    elif any(item.startswith("eval.protocol=") for item in overrides):
        user["eval"].pop("attacks", None)  # the new protocol brings its own list
    elif any(item.startswith("eval.attacks") for item in overrides):
        user["eval"]["protocol"] = "custom"
    if any(item.startswith("attack.") for item in overrides):
        for entry in user["eval"].get("attacks", []):  # re-inherit the threat model that --set changes
            if entry.get("label") == config_module.attack_label({**entry, "label": None}):
                entry.pop("label")  # an automatic label names the old eps
            entry.pop("eps", None), entry.pop("norm", None)
    config = config_module.resolve(host, user, overrides)
    with _progress() as progress:
        runner = Run.load(host, run_dir / "model.safetensors", config, progress=progress)
        evaluation = runner.evaluate()
    results = {"metrics": evaluation["metrics"], "evaluation": evaluation_summary(config["eval"]),
               "attacks": config["eval"]["attacks"], "eval_process_seconds": evaluation["eval_process_seconds"],
               "eval_wall_seconds": evaluation["eval_wall_seconds"]}
    folder = run_dir / "evaluations"
    folder.mkdir(exist_ok=True)
    path = folder / f"{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
    checkpoint.atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    _print_results(results, run_dir)
    click.echo(f"Saved {path}")


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--attack", "attacks", multiple=True, required=True, help="Attack plugin (repeatable).")
@click.option("--model", "model_spec", help="package.module:callable that builds the model (instead of RUN_DIR).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), help="safetensors weights for --model.")
@click.option("--surrogate", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory of a surrogate model, for attacks that take one (e.g. mcg).")
@click.option("--examples", type=int, help="Attack N test examples (a fixed random subset, the same for every run).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting (data.*, attack.eps, plugins.*).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), help="Results file (JSON).")
def attack(run_dir, attacks, model_spec, weights, surrogate, examples, overrides, out_file):
    """Attack a trained model (a run directory, or --model with --weights) with attack plugins."""
    from datetime import datetime

    from advframe import checkpoint
    from advframe import config as config_module
    from advframe.errors import ConfigError
    from advframe.runner import Run, evaluation_summary

    if bool(run_dir) == bool(model_spec):
        raise ConfigError("give either RUN_DIR or --model package.module:callable with --weights")
    host = _host()
    if run_dir:
        user = config_module.load_file(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        if user is None:
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
        weights = run_dir / "model.safetensors"
    else:
        if not weights:
            raise ConfigError("--model needs --weights FILE.safetensors")
        user = {"model": {"name": model_spec}}
    entries = []
    for name in attacks:
        entry = {"name": name}
        if surrogate:
            host.require(name, "attack")
            if "surrogate" in host.default_config(name):
                entry["surrogate"] = str(surrogate)
        entries.append(entry)
    if surrogate and not any("surrogate" in e for e in entries):
        raise ConfigError(f"--surrogate: none of {', '.join(attacks)} takes a surrogate model")
    user.setdefault("eval", {}).update(attacks=entries, protocol="custom")
    if examples:
        user["eval"]["max_examples"] = examples
    config = config_module.resolve(host, user, overrides)
    with _progress() as progress:
        runner = Run.load(host, weights, config, progress=progress)
        evaluation = runner.evaluate()
    results = {"metrics": evaluation["metrics"], "evaluation": evaluation_summary(config["eval"]),
               "attacks": config["eval"]["attacks"], "examples": evaluation["eval_examples"], "eval_process_seconds": evaluation["eval_process_seconds"],
               "eval_wall_seconds": evaluation["eval_wall_seconds"]}
    if out_file is None:
        folder = (run_dir or weights.parent) / "attacks"
        folder.mkdir(exist_ok=True)
        out_file = folder / f"{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
    checkpoint.atomic_write_text(out_file, json.dumps(results, indent=2) + "\n")
    _print_results(results, run_dir or weights)
    click.echo(f"process time {results['eval_process_seconds']:.1f} s, wall time {results['eval_wall_seconds']:.1f} s")
    click.echo(f"Saved {out_file}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include the built-in plugins.")
@click.option("--hook", help="Only plugins implementing this hook.")
def plugins(as_json, show_all, hook):
    """List installed plugins: name, version, distribution, hooks."""
    host = _host()
    infos = [i for i in host.infos.values() if (show_all or not i.builtin) and (not hook or hook in i.hooks)]
    infos.sort(key=lambda i: i.name)
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    if not infos:
        click.echo("No plugins installed (built-ins are listed with --all).")
    for info in infos:
        if info.error:
            click.echo(f"{info.name}  FAILED TO LOAD: {info.error}")
        else:
            click.echo(f"{info.name}  {info.version}  ({info.distribution})  hooks: {', '.join(info.hooks)}")


@cli.command()
@click.option("--plugins", "methods", required=True,
              help="Comma-separated methods; settings in brackets make variants: pgd-at,trades[beta=1].")
@click.option("--seeds", default=3, show_default=True, help="Seeds 0..N-1 for every method.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="Shared YAML config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Shared override (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Bench directory (default: runs/bench-TIME).")
@click.option("--baseline", default="pgd-at", show_default=True, help="Method the cost is measured against.")
@click.option("--metrics", "extra", default="", help="Extra metrics to tabulate (comma-separated names from results.json).")
def bench(methods, seeds, config_file, overrides, out_dir, baseline, extra):
    """Compare training methods on one config over seeds: table (markdown, CSV) and plot."""
    from datetime import datetime

    from advframe import bench as bench_module
    from advframe import checkpoint
    from advframe import config as config_module

    host = _host()
    parsed = bench_module.parse_methods(methods)
    user = config_module.load_file(config_file) if config_file else {}
    out_dir = out_dir or Path("runs") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [m.strip() for m in extra.split(",") if m.strip()]
    with _progress() as progress:
        records = bench_module.run_bench(host, parsed, seeds, user, list(overrides), out_dir, progress=progress,
                                         echo=lambda text: click.echo(text, err=True))
    rows = bench_module.summarise(records, baseline if baseline in {m.label for m in parsed} else None, extra)
    table = bench_module.markdown(rows, baseline, extra)
    checkpoint.atomic_write_text(out_dir / "summary.md", table)
    bench_module.write_csv(out_dir / "summary.csv", rows)
    bench_module.write_runs_csv(out_dir / "runs.csv", records)
    bench_module.plot(out_dir / "robust_vs_time.png", rows)
    click.echo(table)
    click.echo(f"Saved {out_dir}/summary.md, summary.csv, runs.csv and robust_vs_time.png")


@cli.command("config")
@click.option("--plugin", "plugin", help="Show the config a run of this plugin would use.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def show_config(plugin, config_file, overrides):
    """Print the resolved config (defaults, plugin defaults, your file and --set) as YAML."""
    from advframe import config as config_module

    host = _host()
    user = config_module.load_file(config_file) if config_file else {}
    click.echo(config_module.dump(config_module.resolve(host, user, overrides, plugin)), nl=False)


def main():  # pragma: no cover - console entry point
    cli(prog_name="advframe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
