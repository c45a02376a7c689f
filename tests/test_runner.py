import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from advframe import checkpoint, hookimpl
from advframe.errors import CheckpointError, PluginCallError, TrainingDiverged
from advframe.runner import Run
from advframe.testing import make_host, tiny_config


def test_a_run_writes_its_directory(host, tmp_path):
    config = tiny_config(host, overrides=["train.epochs=2"])
    results = Run.start(host, config, tmp_path / "run").execute()
    run_dir = tmp_path / "run"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "model.safetensors",
                                                     "state.safetensors", "results.json"}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"loss", "seconds", "gradient_evaluations", "test_clean_accuracy"} <= set(lines[0])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    metrics = saved["metrics"]
    assert len(metrics["per_class_robust_accuracy"]) == 10
    for key in ("clean_accuracy", "robust_accuracy", "worst_class_robust_accuracy"):
        assert 0 <= metrics[key] <= 1
    assert metrics["worst_class_robust_accuracy"] <= metrics["robust_accuracy"] <= metrics["clean_accuracy"]
    # ERM: one forward+backward per example per epoch, counted by the core
    assert saved["cost"]["gradient_evaluations"] == 2 * 96
    tensors, metadata = checkpoint.load_tensors(run_dir / "model.safetensors")
    assert metadata["advframe_version"] and json.loads(metadata["plugins"])["erm"]
    assert "train:" in metadata["config"]


def test_a_run_never_reuses_a_run_directory(host, tmp_path):
    config = tiny_config(host)
    Run.start(host, config, tmp_path / "run").execute()
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a run"):
        Run.start(host, config, tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_training_state_round_trips_bit_for_bit(host, tmp_path):
    config = tiny_config(host, overrides=["train.optimizer=adam"])
    run = Run.start(host, config, tmp_path / "a")
    run.train()
    run.ctx.state["buffer"] = torch.randn(3, 4)
    run.save_state()
    again = Run.resume(host, tmp_path / "a")
    for (name, a), (_, b) in zip(run.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    first, second = run.ctx.optimizers["model"].state_dict(), again.ctx.optimizers["model"].state_dict()
    for index in first["state"]:
        for key, value in first["state"][index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(second["state"][index][key]))
    assert torch.equal(run.ctx.state["buffer"], again.ctx.state["buffer"])
    assert torch.equal(run.ctx.generator.get_state(), again.ctx.generator.get_state())


RUN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from advframe import hookimpl
    from advframe.runner import Run
    from advframe.testing import make_host, tiny_config

    class Killer:
        __name__ = "killer"
        @staticmethod
        @hookimpl(wrapper=True)
        def training_step(ctx):
            if ctx.global_step == int(os.environ.get("KILL_AT_STEP", "-1")):
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill: nothing is saved on the way out
            return (yield)

    host = make_host((Killer(), "killer"))
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "resume":
        Run.resume(host, out).execute()
    else:
        config = tiny_config(host, "pgd-at-test", [
            "train.epochs=3", "train.batch_size=16", "train.checkpoint_every=5", "train.optimizer=sgd",
            "attack.name=test-pgd", "model.name=mlp", "model.args={hidden: [32], dropout: 0.2}"])
        Run.start(host, config, out).execute()
""")

TEST_PGD_AT = textwrap.dedent("""
    import torch.nn.functional as F
    from advframe import hookimpl

    @hookimpl
    def training_step(model, batch, perturb):
        inputs, labels = batch
        return F.cross_entropy(model(perturb(model, inputs, labels)), labels)
""")


def run_script(tmp_path, *args, kill_at=None):
    script = RUN_SCRIPT.replace('host = make_host((Killer(), "killer"))',
                                'import pgd_at_test\nhost = make_host((Killer(), "killer"), (pgd_at_test, "pgd-at-test"))')
    (tmp_path / "runscript.py").write_text(script)
    (tmp_path / "pgd_at_test.py").write_text(TEST_PGD_AT)
    kill_step = str(kill_at if kill_at is not None else -1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path), "KILL_AT_STEP": kill_step}
    return subprocess.run([sys.executable, str(tmp_path / "runscript.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_resume_after_a_kill_mid_epoch_gives_the_same_weights(tmp_path):
    whole = run_script(tmp_path, "start", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    # 96 training images / 16 = 6 steps per epoch: step 8 is inside the second epoch, after the
    # checkpoint at step 5 and the epoch-end save at step 6
    killed = run_script(tmp_path, "start", str(tmp_path / "killed"), kill_at=8)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = run_script(tmp_path, "resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    expected, _ = checkpoint.load_tensors(tmp_path / "whole" / "model.safetensors")
    actual, _ = checkpoint.load_tensors(tmp_path / "killed" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    lines = lambda d: [json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert lines("killed") == lines("whole")


def test_a_nan_loss_stops_the_run_and_keeps_the_last_state(tmp_path):
    state = {"calls": 0}
    module = types.ModuleType("diverging")

    @hookimpl
    def training_step(model, batch):
        state["calls"] += 1
        loss = model(batch[0]).logsumexp(1).mean()
        return loss * float("nan") if state["calls"] > 4 else loss

    module.training_step = training_step
    host = make_host((module, "diverging"))
    config = tiny_config(host, "diverging", ["train.checkpoint_every=2", "train.epochs=3"])
    run = Run.start(host, config, tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        run.train()
    tensors, _ = checkpoint.load_tensors(tmp_path / "run" / "state.safetensors")
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("weights/"))


def test_a_duplicate_metric_names_both_plugins(tmp_path):
    module = types.ModuleType("copycat")

    @hookimpl
    def evaluate():
        return {"clean_accuracy": 1.0}

    module.evaluate = evaluate
    host = make_host((module, "copycat"))
    config = tiny_config(host, "copycat")
    run = Run.start(host, config, tmp_path / "run")
    with pytest.raises(PluginCallError, match="'accuracy' and 'copycat'"):
        run.execute()


def test_a_method_that_steps_itself_is_not_stepped_again(tmp_path):
    module = types.ModuleType("replay")

    @hookimpl
    def training_step(model, batch, ctx):
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            ctx.step(loss)
        ctx.state["steps"] = ctx.state.get("steps", torch.zeros(())) + 3
        return loss.detach()

    module.training_step = training_step
    host = make_host((module, "replay"))
    run = Run.start(host, tiny_config(host, "replay"), tmp_path / "run")
    results = run.execute()
    assert int(run.ctx.state["steps"]) == 3 * 3  # 96 images / 32 = 3 batches
    assert results["cost"]["gradient_evaluations"] == 3 * 96


def test_setup_can_add_models_that_are_saved_and_restored(tmp_path):
    module = types.ModuleType("twins")

    @hookimpl
    def setup(model, ctx):
        ctx.add_model("twin", ctx.build_model())

    @hookimpl
    def training_step(model, batch, ctx):
        twin = ctx.models["twin"]
        return sum(torch.nn.functional.cross_entropy(m(batch[0]), batch[1]) for m in (model, twin))

    module.setup, module.training_step = setup, training_step
    host = make_host((module, "twins"))
    run = Run.start(host, tiny_config(host, "twins"), tmp_path / "run")
    run.execute()
    tensors, _ = checkpoint.load_tensors(tmp_path / "run" / "model.safetensors")
    assert any(k.startswith("twin/") for k in tensors) and any("/" not in k for k in tensors)
    loaded = Run.load(host, tmp_path / "run", run.config)
    for key, value in run.ctx.models["twin"].state_dict().items():
        assert torch.equal(loaded.ctx.models["twin"].state_dict()[key], value)
    assert set(run.ctx.optimizers) == {"model", "twin"}


def test_learning_rate_schedules():
    from advframe.runner import learning_rate

    config = {"schedule": "step", "milestones": [0.5, 0.75], "warmup_epochs": 0.0}
    assert [learning_rate(1.0, p, config, 10) for p in (0.0, 0.6, 0.8)] == pytest.approx([1, 0.1, 0.01])
    config = {"schedule": "onecycle", "milestones": [], "warmup_epochs": 0.0}
    assert learning_rate(1.0, 0.4, config, 10) == pytest.approx(1.0) and learning_rate(1.0, 1.0, config, 10) == 0
    config = {"schedule": "cosine", "milestones": [], "warmup_epochs": 2.0}
    assert learning_rate(1.0, 0.1, config, 10) == pytest.approx(0.5)


def test_max_examples_evaluates_a_fixed_subset_of_many_classes(tmp_path):
    host = make_host()
    embedded = ["data.name=mnist", "data.train_size=128", "eval.max_examples=30", "train.epochs=1"]
    first = Run.start(host, tiny_config(host, "erm", embedded), tmp_path / "a").execute()
    per_class = first["metrics"]["per_class_robust_accuracy"]
    assert first["eval_examples"] == 30
    assert sum(not math.isnan(v) for v in per_class) >= 8  # the split is stored class by class
    again = Run.start(host, tiny_config(host, "erm", [*embedded, "seed=1"]), tmp_path / "b").execute()
    present = lambda results: [math.isnan(v) for v in results["metrics"]["per_class_robust_accuracy"]]
    assert present(first) == present(again)  # the same examples whatever the seed
