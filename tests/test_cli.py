"""Bad input as a new user would type it: one clear line, a non-zero exit, no traceback, nothing lost."""

import json

import pytest
from click.testing import CliRunner

from advframe import cli
from advframe.testing import make_host


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setattr(cli, "_host", lambda: make_host())
    return CliRunner()


def invoke(runner, *args):
    result = runner.invoke(cli.cli, list(args), catch_exceptions=False)
    return result, result.output


def assert_one_clean_line(result, fragment):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_run_eval_and_config(runner, tmp_path, tiny_args):
    result, output = invoke(runner, "run", "--plugin", "erm", *tiny_args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, output
    assert "clean_accuracy" in output and "worst_class_robust_accuracy" in output
    result, output = invoke(runner, "eval", str(tmp_path / "run"), "--attack", "none")
    assert result.exit_code == 0, output
    saved = list((tmp_path / "run" / "evaluations").glob("*.json"))
    assert len(saved) == 1
    metrics = json.loads(saved[0].read_text())["metrics"]
    assert metrics["robust_accuracy"] == metrics["clean_accuracy"]  # the identity attack changes nothing
    result, output = invoke(runner, "config", "--plugin", "test-pgd", "--set", "train.epochs=3",
                            "--set", "eval.attacks=[{name: none}]")
    assert "epochs: 3" in output and "name: test-pgd" in output


@pytest.mark.parametrize("args, fragment", [
    (["run", "--plugin", "erm", "--set", "train.epocs=2"], "did you mean train.epochs?"),
    (["run", "--plugin", "erm", "--set", "attack.eps=-1"], "attack.eps must be >= 0, got -1"),
    (["run", "--plugin", "erm", "--set", "data.name=cifar10", "--set", "data.root=/no/such/dir"], "missing data_batch_1"),
    (["run", "--plugin", "bta"], "no plugin named 'bta' is installed"),
    (["run", "--plugin", "erm", "--config", "/no/such/file.yaml"], "cannot read config file"),
    (["eval", "/no/such/run"], "not a run directory"),
])
def test_bad_input_ends_with_one_clear_line(runner, args, fragment, tmp_path):
    if args[0] == "run":
        args = [*args, "--set", "attack.name=test-pgd", "--set", "eval.attacks=[{name: test-pgd}]",
                "--out", str(tmp_path / "out")]
    result = runner.invoke(cli.cli, args)
    assert_one_clean_line(result, fragment)


def test_a_truncated_weights_file_is_reported_and_left_alone(runner, tmp_path, tiny_args):
    invoke(runner, "run", "--plugin", "erm", *tiny_args, "--out", str(tmp_path / "run"))
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    truncated = weights.read_bytes()
    result = runner.invoke(cli.cli, ["eval", str(tmp_path / "run")])
    assert_one_clean_line(result, "truncated or corrupt")
    assert weights.read_bytes() == truncated
    state = tmp_path / "run" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:50])
    (tmp_path / "run" / "results.json").unlink()
    result = runner.invoke(cli.cli, ["run", "--resume", str(tmp_path / "run")])
    assert_one_clean_line(result, "truncated or corrupt")


def test_an_existing_run_is_never_overwritten(runner, tmp_path, tiny_args):
    invoke(runner, "run", "--plugin", "erm", *tiny_args, "--out", str(tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    result = runner.invoke(cli.cli, ["run", "--plugin", "erm", *tiny_args, "--out", str(tmp_path / "run")])
    assert_one_clean_line(result, "already holds a run")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    result = runner.invoke(cli.cli, ["run", "--resume", str(tmp_path / "run")])
    assert_one_clean_line(result, "has finished")


def test_plugins_json_lists_names_versions_and_hooks(runner):
    result, output = invoke(runner, "plugins", "--json", "--all")
    listed = {entry["name"]: entry for entry in json.loads(output)}
    assert listed["test-pgd"]["hooks"] == ["default_config", "generate_perturbation"]
    assert listed["erm"]["roles"] == ["training"] and listed["erm"]["version"]


def test_version_lists_the_core(runner):
    result, output = invoke(runner, "--version")
    assert output.startswith("advframe 0.1.0")


def test_attack_a_run_directory_or_a_callable_with_weights(runner, tmp_path, tiny_args):
    invoke(runner, "run", "--plugin", "erm", *tiny_args, "--out", str(tmp_path / "run"))
    result, output = invoke(runner, "attack", str(tmp_path / "run"), "--attack", "test-pgd", "--examples", "20",
                            "--out", str(tmp_path / "a.json"))
    assert result.exit_code == 0, output
    saved = json.loads((tmp_path / "a.json").read_text())
    metrics = saved["metrics"]
    label = saved["attacks"][0]["label"]
    assert saved["examples"] == 20 and 0 <= metrics[f"attack_success_rate/{label}"] <= 1
    # the same weights through --model: a plain safetensors file and the callable that builds the model
    result, output = invoke(runner, "attack", "--model", "advframe.models:SmallCNN", "--weights",
                            str(tmp_path / "run" / "model.safetensors"), "--attack", "none",
                            "--set", "data.name=digits", "--set", "model.args={width: 8, hidden: 16}",
                            "--set", "attack.name=none",
                            "--out", str(tmp_path / "b.json"))
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "b.json").read_text())["metrics"]["attack_success_rate/none-linf-0.2"] == 0
    result = runner.invoke(cli.cli, ["attack", "--attack", "none"])
    assert_one_clean_line(result, "give either RUN_DIR or --model")
