"""Test helpers for plugin authors (loaded by pytest automatically once advframe is installed).

In a plugin's tests::

    from advframe.testing import assert_conforms, tiny_run
    import advframe_myplugin

    def test_contract(tmp_path):
        assert_conforms(advframe_myplugin, "myplugin", tmp_path)

:func:`assert_conforms` registers the module without installing it, then calls every hook it
implements on a tiny model and batch and checks the contract: a perturbation stays in its eps ball
and in [0, 1], the model's mode is restored, the training loss is finite and carries a gradient (or
the plugin stepped), ``adapt_task`` leaves the meta-parameters alone, metrics are ``str -> float``.
It finishes with a one-epoch run through the real runner. Everything runs on CPU in seconds on
scikit-learn's digits, so no download is ever needed.

Fixtures: ``plugin_host`` (built-ins plus the ``test-pgd`` reference attack), ``tiny_splits``,
``tiny_model``, ``tiny_batch``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from advframe.hookspecs import hookimpl

TINY_OVERRIDES = {
    "data": {"name": "digits", "train_size": 96, "test_size": 48},
    "model": {"name": "small-cnn", "args": {"width": 8, "hidden": 32}},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "checkpoint_every": 0, "monitor_examples": 16},
    "attack": {"name": "test-pgd", "eps": 0.1},
    "eval": {"attacks": [{"name": "test-pgd", "steps": 3}], "batch_size": 64},
}


class ReferencePGD:
    """``test-pgd``: an L-inf/L2 PGD on the core primitive, so plugin tests need no attack plugin."""

    __name__ = "advframe.testing.ReferencePGD"

    @staticmethod
    @hookimpl
    def default_config():
        return {"alpha": 0.04, "steps": 3, "random_start": "uniform", "targeted": False}

    @staticmethod
    @hookimpl
    def generate_perturbation(model, inputs, labels, params, ctx):
        from advframe.attacks import pgd

        return pgd(model, inputs, labels, eps=params["eps"], alpha=params["alpha"], steps=params["steps"],
                   norm=params["norm"], random_start=params["random_start"], targeted=params["targeted"],
                   generator=ctx.generator, bounds=ctx.input_bounds)


def make_host(*plugins: tuple[Any, str]):
    """Built-ins, ``test-pgd``, and each ``(module, name)`` registered without installing."""
    from advframe.plugins import make_plugin_host

    host = make_plugin_host(entrypoints=False)
    host.register(ReferencePGD(), "test-pgd", distribution="advframe.testing")
    for plugin, name in plugins:
        host.register(plugin, name, distribution="(test)")
    return host


def tiny_config(host, plugin: str | None = None, overrides: list[str] | tuple = (), user: dict | None = None) -> dict:
    from advframe.config import resolve

    merged = copy.deepcopy(TINY_OVERRIDES)
    for section, values in (user or {}).items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return resolve(host, merged, list(overrides), plugin)


def tiny_run(plugin_module, name: str, out_dir: Path, overrides=(), user: dict | None = None,
             extra_plugins: tuple = ()) -> dict:
    """Train and evaluate ``plugin_module`` (registered as ``name``) for one tiny epoch; the results."""
    from advframe.runner import Run

    host = make_host((plugin_module, name), *extra_plugins)
    config = tiny_config(host, name, overrides, user)
    return Run.start(host, config, Path(out_dir)).execute()


def assert_conforms(plugin_module, name: str, tmp_path: Path, overrides=(), user: dict | None = None) -> None:
    """Check every hook ``plugin_module`` implements against its contract (see the module docstring)."""
    import torch

    from advframe.runner import Run

    host = make_host((plugin_module, name))
    info = host.infos[name]
    assert info.roles or "default_config" in info.hooks, f"{name} implements no hook"
    if "default_config" in info.hooks:
        defaults = host.call("default_config", name)
        assert isinstance(defaults, dict), "default_config must return a dict"
    config = tiny_config(host, name if info.roles else None, overrides, user)
    run = Run.start(host, config, Path(tmp_path) / f"contract-{name}")
    ctx, model = run.ctx, run.model
    inputs, labels = run.splits.train.batch(torch.arange(16), ctx.device)

    if "generate_perturbation" in info.hooks:
        params = ctx.attack_settings(name) if config["attack"]["name"] != name else config["attack"]
        model.train()
        first = ctx.attack(model, inputs, labels, params)  # checks shape, eps ball and [0, 1]
        assert model.training, f"{name}: generate_perturbation did not restore train mode"
        assert all(p.grad is None for p in model.parameters()), f"{name}: left gradients on the parameters"
        ctx.generator.manual_seed(0)
        again = ctx.attack(model, inputs, labels, params)
        ctx.generator.manual_seed(0)
        assert torch.equal(ctx.attack(model, inputs, labels, params), again), \
            f"{name}: not deterministic under a fixed ctx.generator"
        assert first.shape == inputs.shape

    if "training_step" in info.hooks and config["train"]["method"] == name:
        model.train()
        before = [p.detach().clone() for p in model.parameters()]
        ctx._stepped = False
        output = ctx.call("training_step", name, model=run.train_model, batch=(inputs, labels),
                          optimizer=ctx.optimizers["model"], perturb=ctx.perturb)
        loss = output["loss"] if isinstance(output, dict) else output
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0, f"{name}: training_step must return a scalar loss"
        assert torch.isfinite(loss), f"{name}: training loss is not finite"
        if not ctx._stepped:
            assert loss.requires_grad, f"{name}: loss carries no gradient and the plugin did not call ctx.step"
            ctx.step(loss)
        assert model.training, f"{name}: training_step left the model in eval mode"
        changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert changed, f"{name}: one training step did not change the model"

    if "adapt_task" in info.hooks:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        support = (inputs[:10], labels[:10] % 5)
        adapted = ctx.call("adapt_task", name, model=model, support=support)
        assert callable(adapted), f"{name}: adapt_task must return a callable model"
        logits = adapted(inputs)
        assert logits.shape[0] == len(inputs), f"{name}: the adapted model returned {tuple(logits.shape)}"
        for key, value in model.state_dict().items():
            assert torch.equal(before[key], value), f"{name}: adapt_task changed the meta-parameter {key}"

    results = run.execute()
    metrics = results["metrics"]
    assert all(isinstance(k, str) for k in metrics)
    assert all(isinstance(v, (float, list)) for v in metrics.values())
    for required in ("clean_accuracy", "robust_accuracy"):
        assert 0.0 <= metrics[required] <= 1.0


def pytest_configure(config):
    """Tests use one thread each (ADVFRAME_TEST_THREADS overrides): tiny models gain nothing from more,
    and on a shared machine extra threads only spin against each other."""
    import os

    import torch

    torch.set_num_threads(int(os.environ.get("ADVFRAME_TEST_THREADS", "1")))


# -- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture
def plugin_host():
    return make_host()


@pytest.fixture
def tiny_splits():
    from advframe import data

    return data.load({"name": "digits", "train_size": 256, "test_size": 128, "validation_size": 0})


@pytest.fixture
def tiny_model(tiny_splits):
    import torch

    from advframe import models

    torch.manual_seed(0)
    return models.build({"name": "small-cnn", "args": {"width": 8, "hidden": 32}}, tiny_splits.input_shape, 10)


@pytest.fixture
def tiny_batch(tiny_splits):
    import torch

    return tiny_splits.train.batch(torch.arange(32))
