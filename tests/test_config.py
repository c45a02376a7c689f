import pytest

from advframe import config
from advframe.errors import ConfigError, UnknownPluginError
from advframe.testing import tiny_config

BASE = {"attack": {"name": "test-pgd"}, "eval": {"attacks": [{"name": "test-pgd"}]}}


def with_base(user):
    return {**BASE, **user}


def test_defaults_resolve_and_attack_inherits_plugin_defaults(host):
    resolved = config.resolve(host, {"attack": {"name": "test-pgd", "eps": 0.2},
                                     "eval": {"attacks": [{"name": "test-pgd", "steps": 7}]}})
    assert resolved["attack"]["alpha"] == 0.04 and resolved["attack"]["steps"] == 3
    evaluation = resolved["eval"]["attacks"][0]
    assert evaluation["steps"] == 7 and evaluation["eps"] == 0.2 and evaluation["norm"] == "linf"
    assert resolved["plugins"]["test-pgd"]["steps"] == 3


def test_eval_attack_keeps_its_own_eps(host):
    resolved = config.resolve(host, {"attack": {"name": "test-pgd", "eps": 0.2},
                                     "eval": {"attacks": [{"name": "test-pgd", "eps": 0.05}]}})
    assert resolved["eval"]["attacks"][0]["eps"] == 0.05


@pytest.mark.parametrize("user, fragment", [
    ({"train": {"epochz": 3}}, "unknown config key train.epochz; did you mean train.epochs?"),
    ({"trian": {}}, "did you mean train?"),
    ({"attack": {"name": "test-pgd", "stepz": 3}}, "did you mean attack.steps?"),
    ({"attack": {"name": "test-pgd", "eps": -1}}, "attack.eps must be >= 0, got -1"),
    ({"train": {"epochs": 0}}, "train.epochs must be >= 1, got 0"),
    ({"train": {"lr": 0}}, "train.lr must be > 0"),
    ({"train": {"epochs": "many"}}, "train.epochs must be an integer, got 'many'"),
    ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
    ({"train": {"optimizer": "sgdd"}}, "did you mean 'sgd'?"),
    ({"attack": {"name": "test-pgd", "norm": "linfinity"}}, "attack.norm must be one of"),
    ({"plugins": {"test-pgd": {"alpah": 0.1}}}, "did you mean plugins.test-pgd.alpha?"),
    ({"eval": {"attacks": [{"steps": 3}]}}, "each entry of eval.attacks needs a name"),
])
def test_bad_values_are_rejected_with_the_key_path(host, user, fragment):
    with pytest.raises(ConfigError) as error:
        config.resolve(host, with_base(user))
    assert fragment in str(error.value)


def test_unknown_plugin_suggests_the_closest(host):
    with pytest.raises(UnknownPluginError, match="Did you mean 'test-pgd'"):
        config.resolve(host, with_base({"attack": {"name": "test-pdg"}}))


def test_set_overrides_parse_yaml_values(host):
    resolved = config.resolve(host, BASE,
                              ["train.lr=1e-3", "train.nesterov=true", "train.milestones=[0.3, 0.6]"])
    assert resolved["train"]["lr"] == 0.001 and resolved["train"]["nesterov"] is True
    assert resolved["train"]["milestones"] == [0.3, 0.6]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config.resolve(host, BASE, ["train.lr"])


def test_plugin_flag_fills_the_roles_it_implements(host):
    resolved = config.resolve(host, {"eval": BASE["eval"]}, [], plugin="test-pgd")
    assert resolved["attack"]["name"] == "test-pgd" and resolved["train"]["method"] == "erm"


def test_config_file_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_file(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load_file(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load_file(tmp_path / "missing.yaml")


def test_tiny_config_round_trips_through_yaml(host):
    resolved = tiny_config(host)
    again = config.resolve(host, __import__("yaml").safe_load(config.dump(resolved)))
    assert again == resolved


def test_set_can_index_a_list(host):
    user = {**BASE, "eval": {"attacks": [{"name": "test-pgd"}, {"name": "none"}]}}
    resolved = config.resolve(host, user, ["eval.attacks.0.steps=9"])
    assert resolved["eval"]["attacks"][0]["steps"] == 9
    with pytest.raises(ConfigError, match="set the whole list"):
        config.resolve(host, BASE | {"eval": {}}, ["eval.attacks.0.steps=9"])
