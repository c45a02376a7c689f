"""pnode: the wrapped model (encoder + the core's ODE block, tested in tests/test_ode.py) is
trained, saved and restored, prototypes come from the support only, and a tiny run reports Dice.

``assert_conforms`` is not used: it feeds classification batches (digits, integer labels) to
``training_step`` and ``adapt_task``, which a segmentation method rejects by design; the same
contract pieces are checked here on segmentation episodes."""

import advframe_pnode
import pytest
import torch
from safetensors.torch import load_file

from advframe import PluginError
from advframe.ode import ODEEncoder
from advframe.runner import Run
from advframe.segmentation import support_prototypes
from advframe.testing import make_host, tiny_config

USER = {"data": {"name": "mnist-segmentation", "train_size": 120, "test_size": 60},
        "model": {"name": "seg-encoder", "args": {"width": 8}},
        "meta": {"tasks_per_epoch": 8, "tasks_per_batch": 4, "test_tasks": 4},
        "train": {"lr": 0.003, "monitor_examples": 0},
        "eval": {"attacks": [{"name": "test-pgd", "steps": 2, "alpha": 0.05}]},
        "plugins": {"pnode": {"steps": 2}}}


def start(tmp_path, overrides=(), name="run"):
    host = make_host((advframe_pnode, "pnode"))
    return Run.start(host, tiny_config(host, "pnode", overrides, USER), tmp_path / name)


def test_setup_wraps_the_encoder_and_the_ode_is_trained_saved_and_restored(tmp_path):
    run = start(tmp_path)
    assert isinstance(run.model, ODEEncoder) and run.model.ode.steps == 2
    ode_before = [p.detach().clone() for p in run.model.ode.parameters()]
    results = run.execute()
    metrics = results["metrics"]
    assert metrics["test_tasks"] == 4 and 0 <= metrics["dice"] <= 1 and metrics["robust_dice"] <= metrics["dice"]
    assert any(not torch.equal(b, p) for b, p in zip(ode_before, run.model.ode.parameters()))
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.startswith("ode.") for k in saved) and any(k.startswith("encoder.") for k in saved)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"nfe": 8.0' in lines  # rk4, 2 steps, 4 evaluations each


def test_prototypes_come_from_the_support_only(tmp_path):
    run = start(tmp_path)
    ctx, model, task = run.ctx, run.model, run.ctx.test_tasks[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = ctx.call("adapt_task", "pnode", model=model, support=task.support)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert adapted.prototypes.shape == (2, 8) and not adapted.prototypes.requires_grad
    with torch.no_grad():
        expected = support_prototypes(model(task.support_inputs), task.support_labels)
        assert torch.allclose(adapted.prototypes, expected, atol=1e-6)
        # in a training episode support and query share one forward pass: the query does not move them
        mixed = model(torch.cat([task.support_inputs, torch.rand_like(task.query_inputs)]))
        assert torch.allclose(support_prototypes(mixed[:1], task.support_labels), expected, atol=1e-5)
    assert adapted(task.query_inputs).shape == (1, 2, 56, 56)


def test_bad_settings_and_models_raise_one_clear_error(tmp_path):
    with pytest.raises(PluginError, match="solver"):
        start(tmp_path, ["plugins.pnode.solver=magic"], "bad")
    with pytest.raises(PluginError, match="steps"):
        start(tmp_path, ["plugins.pnode.steps=0"], "zero")
    with pytest.raises(PluginError, match="feature maps"):
        start(tmp_path, ["model.name=small-cnn"], "cnn")
