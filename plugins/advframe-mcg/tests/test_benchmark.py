"""The query-table benchmark runs end to end on digits (one seed, a few images, tiny settings)."""

import importlib.util
import sys
from pathlib import Path


def test_benchmark_writes_the_plain_and_robust_table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("mcg_benchmark", Path(__file__).parents[1] / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    settings = ["data.name=digits", "plugins.mcg.meta_examples=64", "plugins.mcg.meta_tasks=2",
                "plugins.mcg.pretrain_epochs=1", "plugins.mcg.hidden=16", "plugins.mcg.cma_popsize=4"]
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--out", str(tmp_path), "--seeds", "0", "--examples", "3",
                                      "--budget", "12", "--epochs", "1", "--attacks", "square",
                                      *[a for s in settings for a in ("--set", s)]])
    benchmark.main()
    table = (tmp_path / "table.md").read_text()
    for target in ("plain", "robust"):
        for variant in ("square", "mcg+square", "mcg latent search (CMA-ES over z)"):
            assert f"| {target} | {variant} | 1 |" in table, table
    assert (tmp_path / "seed-0" / "robust" / "results.json").is_file()
