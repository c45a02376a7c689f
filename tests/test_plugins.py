import importlib.metadata
import sys
import types

import pytest

from advframe import hookimpl
from advframe.errors import PluginCallError, PluginLoadError, UnknownPluginError
from advframe.plugins import PluginHost, PluginLoadWarning, make_plugin_host


class FakeDist:
    def __init__(self, name, version="1.0"):
        self.name, self.version = name, version


class FakeEntryPoint:
    def __init__(self, name, target, dist):
        self.name, self.target, self.dist = name, target, FakeDist(dist)

    def load(self):
        if isinstance(self.target, Exception):
            raise self.target
        return self.target


def install_fake_entry_points(monkeypatch, *entry_points):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: list(entry_points))


def attack_module(name):
    module = types.ModuleType(name)

    @hookimpl
    def generate_perturbation(inputs):
        return inputs.clone()

    module.generate_perturbation = generate_perturbation
    return module


def test_a_plugin_that_fails_to_import_is_reported_and_others_work(monkeypatch):
    install_fake_entry_points(
        monkeypatch,
        FakeEntryPoint("good", attack_module("good_mod"), "advframe-good"),
        FakeEntryPoint("broken", ImportError("No module named 'missing_dep'"), "advframe-broken"),
    )
    with pytest.warns(PluginLoadWarning, match="broken.*advframe-broken.*missing_dep"):
        host = make_plugin_host()
    assert "good" in host.available("attack")
    assert host.infos["broken"].error and "missing_dep" in host.infos["broken"].error
    with pytest.raises(UnknownPluginError, match="missing_dep"):
        host.require("broken")


def test_strict_mode_turns_a_load_failure_into_an_error(monkeypatch):
    install_fake_entry_points(monkeypatch, FakeEntryPoint("broken", RuntimeError("boom"), "advframe-broken"))
    monkeypatch.setenv("ADVFRAME_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="boom"):
        make_plugin_host()


def test_two_distributions_claiming_one_name_is_an_error(monkeypatch):
    install_fake_entry_points(
        monkeypatch,
        FakeEntryPoint("pgd", attack_module("a"), "advframe-pgd"),
        FakeEntryPoint("pgd", attack_module("b"), "pgd-fork"),
    )
    with pytest.warns(PluginLoadWarning):
        host = make_plugin_host()
    with pytest.raises(UnknownPluginError, match="advframe-pgd and pgd-fork"):
        host.require("pgd")


def test_a_plugin_may_not_take_a_builtin_name(monkeypatch):
    install_fake_entry_points(monkeypatch, FakeEntryPoint("erm", attack_module("x"), "evil"))
    with pytest.warns(PluginLoadWarning, match="claimed by both"):
        make_plugin_host()


def test_allow_and_block_lists(monkeypatch):
    install_fake_entry_points(monkeypatch, FakeEntryPoint("a", attack_module("a"), "d-a"),
                              FakeEntryPoint("b", attack_module("b"), "d-b"))
    monkeypatch.setenv("ADVFRAME_LOAD_PLUGINS", "a")
    assert "b" not in make_plugin_host().infos
    monkeypatch.setenv("ADVFRAME_LOAD_PLUGINS", "")
    assert {"a", "b"}.isdisjoint(make_plugin_host().infos)
    monkeypatch.delenv("ADVFRAME_LOAD_PLUGINS")
    monkeypatch.setenv("ADVFRAME_DISABLE_PLUGINS", "b")
    assert set(make_plugin_host().infos) >= {"a"} and "b" not in make_plugin_host().infos


def test_a_misspelled_hook_is_rejected_at_registration(host):
    module = types.ModuleType("typo")

    @hookimpl
    def training_stepp(model):
        return None

    module.training_stepp = training_stepp
    with pytest.raises(Exception, match="training_stepp"):
        host.register(module, "typo")
    assert "typo" not in host.infos


def test_only_the_selected_plugin_answers_whatever_the_registration_order(host, tiny_batch):
    answers = []
    for name in ("first", "second"):
        module = types.ModuleType(name)

        def make(tag):
            @hookimpl
            def generate_perturbation(inputs):
                answers.append(tag)
                return inputs + 0

            return generate_perturbation

        module.generate_perturbation = make(name)
        host.register(module, name)
    inputs, labels = tiny_batch
    host.call("generate_perturbation", "first", model=None, inputs=inputs, labels=labels, params={}, ctx=None)
    host.call("generate_perturbation", "second", model=None, inputs=inputs, labels=labels, params={}, ctx=None)
    assert answers == ["first", "second"]


def test_a_hook_returning_none_breaks_the_contract(host):
    module = types.ModuleType("forgetful")

    @hookimpl
    def training_step(model):
        pass

    module.training_step = training_step
    host.register(module, "forgetful")
    with pytest.raises(PluginCallError, match="returned None"):
        host.call("training_step", "forgetful", model=None, batch=None, optimizer=None, perturb=None, ctx=None)


def test_roles_follow_the_hooks_implemented(host):
    assert host.infos["erm"].roles == ["training"]
    assert host.infos["none"].roles == ["attack"]
    assert host.infos["noadapt"].roles == ["meta"]
    assert host.infos["accuracy"].roles == ["evaluator"]
    assert host.infos["test-pgd"].as_dict()["hooks"] == ["default_config", "generate_perturbation"]


def test_fresh_hosts_share_nothing():
    first, second = PluginHost(), PluginHost()
    first.register(attack_module("only_here"), "only-here")
    assert "only-here" not in second.infos
    assert "advframe.hookspecs" in sys.modules
