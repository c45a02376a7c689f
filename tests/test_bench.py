import csv

import pytest
from click.testing import CliRunner

from advframe import bench, cli
from advframe.errors import ConfigError
from advframe.testing import make_host


def test_methods_parse_with_bracketed_settings():
    methods = bench.parse_methods("pgd-at, trades[beta=1;train.lr=0.1],erm")
    assert [m.label for m in methods] == ["pgd-at", "trades[beta=1;train.lr=0.1]", "erm"]
    assert methods[1].overrides == ["plugins.trades.beta=1", "train.lr=0.1"]
    with pytest.raises(ConfigError, match="listed twice"):
        bench.parse_methods("erm,erm")
    with pytest.raises(ConfigError, match="key=value"):
        bench.parse_methods("trades[beta]")


def test_bench_runs_every_method_and_seed_and_resumes(monkeypatch, tmp_path, tiny_args):
    monkeypatch.setattr(cli, "_host", lambda: make_host())
    runner = CliRunner()
    args = ["bench", "--plugins", "erm,erm[train.lr=0.01]", "--seeds", "2", *tiny_args, "--out", str(tmp_path),
            "--baseline", "erm"]
    result = runner.invoke(cli.cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["method"] for r in rows] == ["erm", "erm[train.lr=0.01]"]
    assert float(rows[0]["gradient_evaluations_relative"]) == 1.0
    assert (tmp_path / "robust_vs_time.png").stat().st_size > 1000
    assert len(list(csv.DictReader((tmp_path / "runs.csv").open()))) == 4
    assert "| erm |" in (tmp_path / "summary.md").read_text()
    again = runner.invoke(cli.cli, args, catch_exceptions=False)
    assert again.output.count("done before, kept") == 4
