"""Configuration: core defaults, then each selected plugin's defaults, then the user's file and ``--set``.

Every value the user gives is checked against the default it replaces before any work starts: an
unknown key is rejected with the closest known key as a suggestion, a value of the wrong type is
rejected, and so are impossible values (``eps < 0``, ``epochs = 0``). Attacks read their parameters
from ``plugins.<attack>`` (the attack's defaults); the ``attack`` section and each ``eval.attacks``
entry override them for that use, and evaluation attacks inherit ``eps`` and ``norm`` from ``attack``
so training and evaluation share one threat model unless told otherwise.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from advframe.errors import ConfigError

CORE_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "data": {
        "name": "mnist",
        "root": None,
        "train_size": None,
        "test_size": None,
        "validation_size": 0,
        "augment": "none",
        "train_classes": None,
        "test_classes": None,
        "test_alphabets": None,
        "rotations": [0],
        "image_size": None,
        "target_ratio": 1,
        "max_length": 64,
        "vocab_size": 20000,
    },
    "model": {"name": "small-cnn", "args": {}},
    "train": {
        "method": "erm",
        "epochs": 5,
        "batch_size": 128,
        "optimizer": "adam",
        "lr": 1.0e-3,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5.0e-4,
        "schedule": "cosine",
        "milestones": [0.5, 0.75],
        "warmup_epochs": 0.0,
        "grad_clip": 0.0,
        "checkpoint_every": 25,
        "monitor_examples": 256,
    },
    "attack": {"name": "pgd", "norm": "linf", "eps": 0.2},
    "eval": {
        "protocol": "quick",
        "attacks": [],
        "cascade": True,
        "batch_size": 500,
        "max_examples": None,
        "evaluators": [],
    },
    "meta": {
        "learner": "noadapt",
        "episodic_training": False,
        "ways": 5,
        "train_shots": 1,
        "test_shots": 1,
        "queries": 15,
        "tasks_per_batch": 4,
        "tasks_per_epoch": 400,
        "test_tasks": 200,
        "attack_support": False,
    },
    "plugins": {},
}

# Keys whose default is None, and the type they take when set.
NULLABLE = {
    "data.root": str,
    "data.train_size": int,
    "data.test_size": int,
    "data.train_classes": list,
    "data.test_classes": list,
    "data.test_alphabets": list,
    "data.image_size": int,
    "eval.max_examples": int,
}

# Mappings passed through to a constructor, not checked key by key here.
FREE_FORM = {"model.args"}

CHOICES = {
    "device": ("cpu", "cuda", "auto"),
    "attack.norm": ("linf", "l2", "l1"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.schedule": ("constant", "cosine", "step", "onecycle"),
    "data.augment": ("none", "flip", "crop", "crop-flip"),
    "eval.protocol": ("quick", "standard", "custom"),
}

# The evaluation protocols: ``eval.protocol`` names one, and it fills ``eval.attacks``. The headline
# ``robust_accuracy`` is the per-example worst case over the entries. Both open with the PGD-20 row
# every paper reports; ``standard`` then runs AutoAttack's standard version (Croce & Hein 2020:
# APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square with 5,000 queries and p_init 0.8);
# ``quick`` keeps its two gradient components (FAB-T and Square are there to catch gradient masking,
# which the ``gradient-masking`` evaluator checks for), measured to stay within 0.5 point of
# ``standard`` (benchmarks/evaluation.py, table in the apgd plugin's README).
PGD_ROW = {"name": "pgd", "loss": "ce", "steps": 20, "stop_on_success": True}
PROTOCOLS: dict[str, list[dict[str, Any]]] = {
    "quick": [
        PGD_ROW,
        {"name": "apgd", "loss": "ce", "steps": 100},
        {"name": "apgd", "loss": "dlr-targeted", "steps": 100, "target_classes": 9},
    ],
    "standard": [
        PGD_ROW,
        {"name": "apgd", "loss": "ce", "steps": 100},
        {"name": "apgd", "loss": "dlr-targeted", "steps": 100, "target_classes": 9},
        {"name": "fab", "steps": 100, "target_classes": 9},
        {"name": "square", "budget": 5000, "p_init": 0.8},
    ],
}

# Constraints by key name, wherever the key appears (a plugin's ``eps`` too).
LOWER_BOUNDS = {
    "eps": (0, False),
    "alpha": (0, False),
    "steps": (0, False),
    "restarts": (1, False),
    "epochs": (1, False),
    "batch_size": (1, False),
    "lr": (0, True),
    "beta": (0, False),
    "momentum": (0, False),
    "weight_decay": (0, False),
    "checkpoint_every": (0, False),
    "monitor_examples": (0, False),
    "validation_size": (0, False),
    "image_size": (4, False),
    "target_ratio": (1, False),
    "max_length": (1, False),
    "vocab_size": (3, False),
    "ways": (1, False),
    "train_shots": (1, False),
    "test_shots": (1, False),
    "queries": (1, False),
    "tasks_per_batch": (1, False),
    "tasks_per_epoch": (1, False),
    "test_tasks": (1, False),
    "train_size": (1, False),
    "test_size": (1, False),
    "max_examples": (1, False),
    "grad_clip": (0, False),
    "warmup_epochs": (0, False),
}


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.lr=0.1), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` (a number indexes a list: ``eval.attacks.0.steps``)."""
    parts = key.split(".")
    node: Any = config
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"cannot set {key}: {'.'.join(parts[:depth])} has no entry {part}")
            node = node[int(part)]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"cannot set {key}: {where} is not a section")
        if isinstance(child, dict) and not child and parts[depth + 1].isdigit():
            raise ConfigError(f"cannot set {key}: {where} is not in your config; set the whole list, "
                              f"e.g. --set '{where}=[{{name: pgd, steps: 50}}]'")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"cannot set {key}: no entry {last}")
        node[int(last)] = value
    else:
        node[last] = value


def get_dotted(config: dict, key: str, default: Any = None) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _check_type(path: str, default: Any, value: Any, nullable: type | None = None) -> Any:
    if value is None:
        if default is None or nullable is not None:
            return None
        raise ConfigError(f"{path} must be {_type_name(default)}, got null")
    expected = type(default) if default is not None else nullable
    if expected is None:  # a plugin key defaulting to None takes any value
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if expected is float and isinstance(value, str):
        try:  # YAML reads 1e-3 as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, expected):
        shown = "a mapping" if isinstance(value, dict) else repr(value)
        raise ConfigError(f"{path} must be {_type_name(expected())}, got {shown}")
    return value


def merge_checked(defaults: dict, override: dict, path: str = "", extra_keys: tuple = ()) -> dict:
    """``defaults`` updated by ``override``, rejecting unknown keys and wrong types."""
    if not isinstance(override, dict):
        raise ConfigError(f"{path or 'the config'} must be a mapping, got {override!r}")
    merged = copy.deepcopy(defaults)
    for key, value in override.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in defaults and key not in extra_keys:
            known = sorted([*defaults, *extra_keys])
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]}?" if close else ""
            listing = f" (known keys: {', '.join(known)})" if not close and len(known) <= 12 else ""
            raise ConfigError(f"unknown config key {where}{hint}{listing}")
        default = defaults.get(key)
        if isinstance(default, dict) and where not in FREE_FORM and default:
            merged[key] = merge_checked(default, value, where)
        else:
            merged[key] = _check_type(where, default, value, NULLABLE.get(where))
    return merged


def check_values(config: Any, path: str = "") -> None:
    """Reject impossible values anywhere in the resolved config."""
    if isinstance(config, dict):
        for key, value in config.items():
            check_values(value, f"{path}.{key}" if path else str(key))
        return
    if isinstance(config, list):
        for index, value in enumerate(config):
            check_values(value, f"{path}[{index}]")
        return
    name = path.rsplit(".", 1)[-1]
    if name in LOWER_BOUNDS and isinstance(config, (int, float)) and not isinstance(config, bool):
        bound, strict = LOWER_BOUNDS[name]
        if config < bound or (strict and config == bound):
            relation = ">" if strict else ">="
            raise ConfigError(f"{path} must be {relation} {bound}, got {config}")
    choices = CHOICES.get(path) or (CHOICES["attack.norm"] if name == "norm" else None)
    if choices and config not in choices:
        close = difflib.get_close_matches(str(config), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path} must be one of {', '.join(choices)}, got {config!r}{hint}")


ATTACK_CORE_KEYS = ("name", "norm", "eps")


def selected_plugins(config: dict) -> dict[str, str | list[str]]:
    """The plugin named for each role of a (merged) config."""
    return {
        "training": config["train"]["method"],
        "attack": config["attack"]["name"],
        "meta": config["meta"]["learner"],
        "eval_attacks": [entry.get("name") for entry in config["eval"]["attacks"]],
        "evaluators": list(config["eval"]["evaluators"]),
    }


def resolve(host, user: dict[str, Any] | None = None, overrides: list[str] = (), plugin: str | None = None) -> dict:
    """The full, validated configuration of a run.

    :param host: the :class:`advframe.plugins.PluginHost` that knows the installed plugins.
    :param user: the user's config file, already read.
    :param overrides: ``KEY=VALUE`` strings from ``--set``.
    :param plugin: the ``--plugin`` name: it fills every role whose hook it implements.
    """
    user = copy.deepcopy(user or {})
    if plugin:
        for key, value in plugin_roles(host, plugin).items():
            set_dotted(user, key, value)
    for item in overrides:
        set_dotted(user, *parse_override(item))

    for entry in (user.get("eval") or {}).get("attacks") or []:
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"each entry of eval.attacks needs a name (e.g. {{name: pgd, steps: 20}}), got {entry!r}")
    attack_user = user.get("attack") or {}
    if not isinstance(attack_user, dict):
        raise ConfigError(f"attack must be a mapping, got {attack_user!r}")
    attack_extra = {k: v for k, v in attack_user.items() if k not in ATTACK_CORE_KEYS}
    user_core = {**user, "attack": {k: v for k, v in attack_user.items() if k in ATTACK_CORE_KEYS}}
    user_plugins = user_core.pop("plugins", None) or {}
    if not isinstance(user_plugins, dict):
        raise ConfigError(f"plugins must be a mapping of plugin name to settings, got {user_plugins!r}")
    config = merge_checked(CORE_DEFAULTS, user_core)
    recommended = method_defaults(host, config)
    if recommended:  # the method's own core settings go under the user's
        attack = recommended.pop("attack", {})
        recommended["attack"] = {k: v for k, v in attack.items() if k in ATTACK_CORE_KEYS}
        attack_extra = {**{k: v for k, v in attack.items() if k not in ATTACK_CORE_KEYS}, **attack_extra}
        config = merge_checked(merge_checked(CORE_DEFAULTS, recommended), user_core)
    entries, saved = protocol_attacks(host, user, recommended, config["eval"])
    config["eval"]["attacks"] = copy.deepcopy(entries)

    roles = selected_plugins(config)
    needed = {roles["training"]: "training", roles["attack"]: "attack", roles["meta"]: "meta"}
    for name in roles["eval_attacks"]:
        needed.setdefault(name, "attack")
    for name in roles["evaluators"]:
        needed.setdefault(name, "evaluator")
    for name, role in needed.items():
        host.require(name, role)

    plugins: dict[str, dict] = {}
    for name in [*needed, *user_plugins]:
        if name in plugins:
            continue
        if name not in needed:
            host.require(name)
        section = user_plugins.get(name) or {}
        plugins[name] = merge_checked(host.default_config(name), section, f"plugins.{name}")
    config["plugins"] = plugins

    config["attack"] = _attack_params(config["attack"], attack_extra, plugins, "attack")
    config["eval"]["attacks"] = _eval_attacks(config["eval"]["attacks"], config["attack"], plugins)
    if saved is not None and ([e.get("name") for e in saved] != [e["name"] for e in config["eval"]["attacks"]]
                              or _eval_attacks(saved, config["attack"], plugins) != config["eval"]["attacks"]):
        protocol = config["eval"]["protocol"]
        raise ConfigError(f"eval.attacks differs from the attacks of eval.protocol={protocol}; to evaluate with "
                          f"your own list set eval.protocol=custom")
    check_values(config)
    return config


def _eval_attacks(entries: list, attack: dict, plugins: dict) -> list[dict]:
    """Each ``eval.attacks`` entry with its plugin's defaults, the run's threat model and a label."""
    inherited = {"norm": attack["norm"], "eps": attack["eps"]}
    resolved, labels = [], []
    for i, entry in enumerate(entries):
        label = entry.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise ConfigError(f"eval.attacks[{i}].label must be a non-empty string, got {label!r}")
        entry = {k: v for k, v in entry.items() if k != "label"}
        params = _attack_params({**inherited, **{k: v for k, v in entry.items() if k in ATTACK_CORE_KEYS}},
                                {k: v for k, v in entry.items() if k not in ATTACK_CORE_KEYS}, plugins,
                                f"eval.attacks[{i}]")
        resolved.append(params)
        labels.append(label)
    return label_attacks(resolved, labels)


def label_attacks(entries: list[dict], given: list[str | None]) -> list[dict]:
    """Give every entry a distinct ``label`` (``attack_label``, or the user's), before any work starts.

    Two entries with the same settings are a mistake and rejected; two that differ in a setting the
    label does not show (``restarts``, ``rho``, ...) get that setting appended to both labels.
    """
    labels = [label or attack_label(params) for label, params in zip(given, entries)]
    for i, j in ((i, j) for j in range(len(entries)) for i in range(j)):
        if entries[i] == entries[j]:
            raise ConfigError(f"eval.attacks[{j}] repeats eval.attacks[{i}] ({labels[i]}); remove one of them")
    for label in dict.fromkeys(labels):
        group = [i for i, other in enumerate(labels) if other == label]
        if len(group) < 2:
            continue
        clashing = [i for i in group if given[i]]
        if clashing:
            raise ConfigError(f"eval.attacks[{clashing[-1]}].label {label!r} is used twice; give each entry its own")
        keys = sorted({key for i in group for key in entries[i]} - {"name"})
        differing = [key for key in keys if len({repr(entries[i].get(key)) for i in group}) > 1]
        for i in group:
            labels[i] = "-".join([label, *(f"{key}{entries[i].get(key)}" for key in differing)])
    return [{"label": label, **params} for label, params in zip(labels, entries)]


def attack_label(params: dict[str, Any]) -> str:
    """What distinguishes an attack, e.g. ``apgd-dlr-linf-0.2-100``: name, loss, norm, eps and steps
    (or query budget, ``square-linf-0.2-5000q``); the entry's own ``label`` when it has one."""
    if params.get("label"):
        return params["label"]
    parts = [params["name"]]
    if isinstance(params.get("loss"), str):
        parts.append(params["loss"])
    if "norm" in params and "eps" in params:
        parts += [params["norm"], f"{params['eps']:g}"]
    if isinstance(params.get("steps"), int) and not isinstance(params.get("steps"), bool):
        parts.append(str(params["steps"]))
    elif isinstance(params.get("budget"), int):
        parts.append(f"{params['budget']}q")
    return "-".join(parts)


def _given_attacks(section: Any) -> list | None:
    if not isinstance(section, dict) or not isinstance(section.get("eval"), dict):
        return None
    return section["eval"].get("attacks")


def protocol_attacks(host, user: dict, recommended: dict, merged_eval: dict) -> tuple[list, list | None]:
    """The ``eval.attacks`` entries a run evaluates with, from ``eval.protocol`` or the given list,
    and a given list that must resolve to the same entries (or None).

    A list given without a protocol makes the protocol ``custom`` (``merged_eval`` is updated). A list
    given next to ``quick`` or ``standard`` (a saved run's config holds both) must be that protocol's.
    """
    protocol_set = isinstance(user.get("eval"), dict) and "protocol" in user["eval"]
    given = _given_attacks(user)
    if given is None and not protocol_set:  # the method's recommended list, unless the user names a protocol
        given = _given_attacks(recommended)
    protocol = merged_eval["protocol"]
    if given is not None and not isinstance(given, list):
        raise ConfigError(f"eval.attacks must be a list of attacks, got {given!r}")
    if protocol not in PROTOCOLS and protocol != "custom":
        return [], None  # check_values names the choices
    if given is not None and (protocol == "custom" or not protocol_set):
        merged_eval["protocol"] = "custom"
        return given, None
    if protocol == "custom":
        raise ConfigError("eval.protocol=custom runs the attacks in eval.attacks, which is not set; give them "
                          "(e.g. --set 'eval.attacks=[{name: pgd, steps: 20}]'), or eval.attacks=[] for clean accuracy only")
    for entry in PROTOCOLS[protocol]:
        if entry["name"] not in host.available("attack"):
            raise ConfigError(f"eval.protocol={protocol} needs the attack plugin {entry['name']!r}, which is not "
                              f"installed: pip install advframe-{'apgd' if entry['name'] == 'fab' else entry['name']}, "
                              f"or set eval.protocol=custom with your own eval.attacks")
    return PROTOCOLS[protocol], given


RUN_DEFAULT_SECTIONS = ("data", "model", "train", "attack", "eval", "meta")


def method_defaults(host, config: dict) -> dict:
    """The core settings the selected training method and meta-learner recommend (``run_defaults``)."""
    merged: dict = {}
    for name in dict.fromkeys([config["train"]["method"], config["meta"]["learner"]]):
        host.require(name)
        if not host.implements(name, "run_defaults"):
            continue
        recommended = host.call("run_defaults", name)
        if not isinstance(recommended, dict) or set(recommended) - set(RUN_DEFAULT_SECTIONS):
            from advframe.errors import PluginCallError

            raise PluginCallError(f"plugin {name!r}: run_defaults must return a dict of the sections "
                                  f"{', '.join(RUN_DEFAULT_SECTIONS)}")
        for section, values in recommended.items():
            merged.setdefault(section, {}).update(values)
    return merged


def _attack_params(core: dict, extra: dict, plugins: dict, path: str) -> dict:
    name = core["name"]
    base = {k: v for k, v in plugins[name].items() if k not in ATTACK_CORE_KEYS}
    core_checked = merge_checked({"name": "", "norm": "linf", "eps": 0.0}, core, path)
    return {**core_checked, **merge_checked(base, extra, path, extra_keys=())}


def plugin_roles(host, name: str) -> dict[str, Any]:
    """The config keys that ``--plugin name`` sets: every role whose hook the plugin implements."""
    info = host.require(name)
    keys: dict[str, Any] = {}
    if "training" in info.roles:
        keys["train.method"] = name
    if "attack" in info.roles:
        keys["attack.name"] = name
    if "meta" in info.roles:
        keys["meta.learner"] = name
    if not keys and "evaluator" in info.roles:
        keys["eval.evaluators"] = [name]
    if not keys:
        raise ConfigError(f"plugin {name!r} implements no role a run can select (hooks: {', '.join(info.hooks)})")
    return keys


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
