"""CONTRIBUTING.md's walk-through, done for real: its files, built and installed with pip, are listed
by `advframe plugins` and run with `--plugin`; a plugin that raises on import is reported while every
other plugin keeps working; the tutorial's own tests pass without installing it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["--set", "data.name=digits", "--set", "data.train_size=64", "--set", "data.test_size=32",
        "--set", "train.epochs=1", "--set", "train.monitor_examples=0", "--set", "model.args={width: 8, hidden: 16}",
        "--set", "eval.attacks=[{name: none}]", "--set", "attack.name=none"]


def tutorial_files() -> dict[str, str]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    blocks = re.findall(r"`(advframe-noisy/[\w/.]+)`:\n\n```\w+\n(.*?)```", text, re.DOTALL)
    return {path: body for path, body in blocks}


def pip_install(package: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True, capture_output=True, text=True, timeout=300)


def advframe(*args, site: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(site), "ADVFRAME_PROGRESS": "0"}
    env.pop("ADVFRAME_STRICT_PLUGINS", None)
    return subprocess.run([str(BIN / "advframe"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("thirdparty")
    files = tutorial_files()
    assert set(files) == {"advframe-noisy/pyproject.toml", "advframe-noisy/advframe_noisy.py",
                          "advframe-noisy/tests/test_noisy.py"}
    for relative, body in files.items():
        (workspace / relative).parent.mkdir(parents=True, exist_ok=True)
        (workspace / relative).write_text(body)
    broken = workspace / "advframe-broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text(files["advframe-noisy/pyproject.toml"]
                                           .replace("advframe-noisy", "advframe-broken")
                                           .replace('noisy = "advframe_noisy"', 'broken = "advframe_broken"')
                                           .replace('"advframe_noisy"', '"advframe_broken"'))
    (broken / "advframe_broken.py").write_text("import a_module_that_does_not_exist\n")
    site = workspace / "site"
    pip_install(workspace / "advframe-noisy", site)
    pip_install(broken, site)
    return workspace, site


def test_an_installed_plugin_is_listed_and_runs(installed):
    workspace, site = installed
    listing = advframe("plugins", "--json", site=site, cwd=workspace)
    plugins = {entry["name"]: entry for entry in json.loads(listing.stdout)}
    assert plugins["noisy"]["version"] == "0.1.0" and plugins["noisy"]["distribution"] == "advframe-noisy"
    assert plugins["noisy"]["hooks"] == ["default_config", "training_step"]
    run = advframe("run", "--plugin", "noisy", "--set", "plugins.noisy.sigma=0.2", *TINY, "--out",
                   str(workspace / "run"), site=site, cwd=workspace)
    assert run.returncode == 0, run.stderr
    config = (workspace / "run" / "config.yaml").read_text()
    assert "method: noisy" in config and "sigma: 0.2" in config
    bad = advframe("run", "--plugin", "noisy", "--set", "plugins.noisy.sigma=-1", *TINY, "--out",
                   str(workspace / "bad"), site=site, cwd=workspace)
    assert bad.returncode != 0 and "noisy: sigma must be >= 0" in bad.stderr and "Traceback" not in bad.stderr


def test_a_plugin_that_raises_on_import_is_reported_and_the_others_work(installed):
    workspace, site = installed
    listing = advframe("plugins", site=site, cwd=workspace)
    assert listing.returncode == 0
    assert "broken" in listing.stdout and "FAILED TO LOAD" in listing.stdout and "a_module_that_does_not_exist" in listing.stdout
    assert "advframe-broken" in listing.stderr  # warned, with the distribution named
    assert "noisy" in listing.stdout
    run = advframe("run", "--plugin", "broken", *TINY, "--out", str(workspace / "b"), site=site, cwd=workspace)
    assert run.returncode != 0 and "a_module_that_does_not_exist" in run.stderr and "Traceback" not in run.stderr
    version = advframe("--version", site=site, cwd=workspace)
    assert version.returncode == 0 and "noisy: advframe-noisy 0.1.0" in version.stdout


def test_the_tutorial_tests_pass_without_installing_the_plugin(installed):
    workspace, _ = installed
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=workspace / "advframe-noisy", capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ADVFRAME_PROGRESS": "0"})
    assert result.returncode == 0, result.stdout[-2000:]
    assert "2 passed" in result.stdout
