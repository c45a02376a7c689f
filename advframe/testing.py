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

Query-based (score-based black-box) attacks share a test suite, :class:`QueryAttackTests`: subclass
it in the plugin's test file, set ``module`` and ``name`` (and the class attributes where the attack
legitimately differs), and keep only the attack's own tests there::

    import advframe_myattack
    from advframe.testing import QueryAttackTests

    class TestMyAttack(QueryAttackTests):
        module, name = advframe_myattack, "myattack"
        settings = {"samples": 20}  # small enough for a test

:class:`QueryRecorder` wraps a model to see every query an attack makes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

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


# -- a shared suite for query-based attacks ------------------------------------------------------------

class QueryRecorder(nn.Module):
    """A model seen from outside: keeps the inputs of every forward pass (``calls``) and counts their
    rows (``rows``); with ``labels_only`` it answers argmax labels, as a decision-only API would."""

    def __init__(self, model: nn.Module, labels_only: bool = False):
        super().__init__()
        self.model, self.labels_only, self.calls = model, labels_only, []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        logits = self.model(x)
        return logits.argmax(1) if self.labels_only else logits

    @property
    def rows(self) -> int:
        return sum(len(c) for c in self.calls)


class QueryAttackTests:
    """The behaviour every score-based query attack plugin must show, as a reusable test class.

    Subclass it as ``Test<Name>`` in the plugin's test file (pytest collects the subclass, not this
    class) and keep only the attack's own tests there; methods of the subclass may use the
    ``trained`` fixture. Every test runs on ``trained``: a small CNN trained on digits by the core
    runner (once per subclass), its ``ctx`` and 48 test images. The suite checks:

    * the hook contract (:func:`assert_conforms`, budget 40);
    * the result stays in the eps ball and in [0, 1] (L-inf and L2) even from an ``init`` far outside;
    * it breaks the trained model (each of ``break_cases``): > 80% of the attacked examples succeed,
      robust accuracy falls by > 0.5, and ``success`` is exactly what the model says of the returned
      points;
    * query counts are exact (the model's rows equal the reported queries) and within the budget;
      examples misclassified before the attack cost exactly the clean query; a failed example stops
      only when one more iteration no longer fits (more than ``budget - iteration_queries`` spent);
    * a labels-only model gets a clear ``PluginError`` ("needs class scores");
    * ``params["init"]`` is the starting point: the first query after the clean one is ``x + init``;
    * a caller (MCG) can pass its own ``counter`` and ``counted``: no clean query, one count;
    * seeded by ``ctx.generator``; targeted successes reach the target (> 30% at
      ``targeted_budget``); a bad ``budget`` or ``norm`` is a ``PluginError``.

    Class attributes (the parts where attacks legitimately differ):

    :cvar module: the plugin module. :cvar name: its attack name.
    :cvar settings: the attack's own settings for every call (on top of eps 0.3 and budget 300):
        small enough for a test, e.g. fewer NES samples.
    :cvar iteration_queries: what one iteration costs (the attack stops an example when fewer are
        left): 1 for an attack that spends its whole budget.
    :cvar start_settings: extra settings for the ``init`` test (budget 5).
    :cvar targeted_budget: the budget of the targeted test.
    :cvar break_cases: the settings (norm, eps, ...) under which the attack must break the model.
    """

    module: ClassVar[Any] = None
    name: ClassVar[str] = ""
    settings: ClassVar[dict] = {}
    iteration_queries: ClassVar[int] = 1
    start_settings: ClassVar[dict] = {}
    targeted_budget: ClassVar[int] = 150
    break_cases: ClassVar[tuple[dict, ...]] = ({"norm": "linf", "eps": 0.3}, {"norm": "l2", "eps": 1.5})

    def pytest_generate_tests(self, metafunc):
        if "break_case" in metafunc.fixturenames:
            ids = ["-".join(str(v) for v in case.values()) for case in self.break_cases]
            metafunc.parametrize("break_case", self.break_cases, ids=ids)

    @pytest.fixture(scope="class")
    @classmethod
    def trained(cls, tmp_path_factory):
        """A small CNN trained on digits by the core runner, its context and 48 test images."""
        from advframe.runner import Run

        host = make_host((cls.module, cls.name))
        config = tiny_config(host, None, ["train.epochs=8", "data.train_size=500", "data.test_size=48",
                                          "train.batch_size=64", "train.monitor_examples=0"])
        run = Run.start(host, config, tmp_path_factory.mktemp(f"trained-{cls.name}"))
        run.execute()
        inputs, labels = run.splits.test.batch(torch.arange(48), run.ctx.device)
        return run.model.eval(), run.ctx, inputs, labels

    def attack(self, trained, model=None, records=None, labels=None, **overrides):
        """The attack through ``ctx.attack`` (the core checks the ball and [0, 1]); each
        ``ctx.record_queries`` call is appended to ``records`` as (queries, success, counted)."""
        net, ctx, inputs, true_labels = trained
        params = ctx.attack_settings(self.name, **{"eps": 0.3, "budget": 300, **self.settings, **overrides})
        ctx.record_queries = lambda queries, success, counted=None: (records if records is not None else []).append(
            (queries, success, counted))
        return ctx.attack(model or net, inputs, true_labels if labels is None else labels, params)

    def generate(self, trained, model=None, **overrides):
        """The plugin's hook called directly (no core checks), with ``settings`` and ``overrides``."""
        net, ctx, inputs, labels = trained
        params = ctx.attack_settings(self.name, **{**self.settings, **overrides})
        return self.module.generate_perturbation(model=model or net, inputs=inputs, labels=labels, params=params,
                                                 ctx=ctx)

    def test_contract(self, tmp_path):
        settings = {**self.settings, "budget": 40}
        assert_conforms(self.module, self.name, tmp_path, user={"plugins": {self.name: settings}})

    @pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 1.5)])
    def test_stays_in_ball_and_box_even_from_a_large_init(self, trained, norm, eps):
        inputs = trained[2]
        init = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(1)) * 3
        adversarial = self.generate(trained, norm=norm, eps=eps, budget=60, init=init)
        delta = (adversarial - inputs).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert size.max() <= eps * (1 + 1e-5)
        assert adversarial.min() >= 0 and adversarial.max() <= 1

    def test_breaks_a_trained_model(self, trained, break_case):
        net, _, inputs, labels = trained
        records = []
        adversarial = self.attack(trained, records=records, **break_case)
        with torch.no_grad():
            clean = (net(inputs).argmax(1) == labels).float().mean()
            robust = (net(adversarial).argmax(1) == labels).float().mean()
        _, success, counted = records[0]
        assert clean > 0.8
        assert (success & counted).sum() / counted.sum() > 0.8
        assert robust < clean - 0.5
        with torch.no_grad():  # success is what the model says about the returned point
            assert torch.equal(success[counted], net(adversarial).argmax(1)[counted] != labels[counted])

    def test_query_counts_are_exact_and_within_budget(self, trained):
        recorder, records, budget = QueryRecorder(trained[0]), [], 25
        self.attack(trained, model=recorder, records=records, budget=budget)
        queries, success, counted = records[0]
        assert (~counted).any() and (counted & ~success).any()  # both kinds present: the checks below bite
        assert recorder.rows == int(queries.sum())
        assert queries.max() <= budget
        assert torch.all(queries[~counted] == 1)  # initially misclassified: only the clean query
        # a failure stops only when one more iteration no longer fits (the whole budget when it costs 1)
        assert torch.all(queries[counted & ~success] > budget - self.iteration_queries)

    def test_labels_only_model_gets_a_clear_message(self, trained):
        from advframe.errors import PluginError

        with pytest.raises(PluginError, match="needs class scores"):
            self.attack(trained, model=QueryRecorder(trained[0], labels_only=True))

    def test_given_init_is_the_starting_point(self, trained):
        net, _, inputs, labels = trained
        recorder = QueryRecorder(net)
        self.generate(trained, model=recorder, eps=0.3, budget=5, init=torch.full_like(inputs, 0.1),
                      **self.start_settings)
        assert torch.equal(recorder.calls[0], inputs)  # the clean query, then the start: x + init
        with torch.no_grad():
            counted = net(inputs).argmax(1) == labels
        assert torch.allclose(recorder.calls[1], (inputs[counted] + 0.1).clamp(0, 1))

    def test_caller_can_continue_its_own_count(self, trained):
        """Another method (MCG) passes its counter and which examples to attack: no clean query."""
        from advframe.cost import QueryCounter

        inputs = trained[2]
        recorder, records = QueryRecorder(trained[0]), []
        counter = QueryCounter(recorder, len(inputs), budget=30)
        counter(inputs)  # the caller's own query
        self.attack(trained, model=recorder, records=records, budget=30, counter=counter,
                    init=torch.zeros_like(inputs), counted=torch.ones(len(inputs), dtype=torch.bool))
        queries = records[0][0]
        assert torch.equal(queries, counter.counts) and queries.max() <= 30
        assert int(queries.sum()) == recorder.rows
        assert torch.equal(recorder.calls[1], inputs)  # the attack's first query is at x + init (init = 0)

    def test_seeded(self, trained):
        ctx = trained[1]
        outputs = []
        for seed in (3, 3, 4):
            ctx.generator.manual_seed(seed)
            outputs.append(self.attack(trained, budget=30))
        assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])

    def test_targeted_successes_reach_the_target(self, trained):
        net, labels = trained[0], trained[3]
        targets = (labels + 1) % 10
        records = []
        adversarial = self.attack(trained, records=records, targeted=True, labels=targets,
                                  budget=self.targeted_budget)
        _, success, counted = records[0]
        with torch.no_grad():
            predicted = net(adversarial).argmax(1)
        assert success[counted].float().mean() > 0.3
        assert torch.all(predicted[success] == targets[success])

    @pytest.mark.parametrize("setting", [{"budget": 0}, {"budget": 2.5}, {"budget": True}, {"norm": "l1"}],
                             ids=["budget-0", "budget-float", "budget-bool", "norm-l1"])
    def test_bad_budget_or_norm_is_a_user_error(self, trained, setting):
        from advframe.errors import PluginError

        with pytest.raises(PluginError, match=next(iter(setting))):
            self.attack(trained, **setting)
