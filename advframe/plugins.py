"""Plugin discovery and calls: one named plugin answers each role.

Plugins are found through the entry-point group ``advframe`` (the entry-point name is the name used on
the command line) and loaded one at a time, so a plugin that fails to import is reported and every
other plugin keeps working. Environment variables, as in llm, datasette and tox:

* ``ADVFRAME_LOAD_PLUGINS=a,b`` loads only these entry points (empty: none);
* ``ADVFRAME_DISABLE_PLUGINS=a,b`` skips these;
* ``ADVFRAME_STRICT_PLUGINS=1`` turns a load failure into an error;
* ``ADVFRAME_TRACE_PLUGINS=1`` prints every hook call with its plugin to stderr.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from advframe import hookspecs
from advframe.errors import PluginCallError, PluginError, PluginLoadError, UnknownPluginError

ENTRY_POINT_GROUP = "advframe"

# The built-in defaults are plugins like any other, registered under these names.
BUILTIN_PLUGINS = {
    "none": "advframe.builtins.identity",
    "erm": "advframe.builtins.erm",
    "noadapt": "advframe.builtins.noadapt",
    "accuracy": "advframe.builtins.accuracy",
}

ROLE_HOOKS = {
    "attack": "generate_perturbation",
    "training": "training_step",
    "meta": "adapt_task",
    "evaluator": "evaluate",
}


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded; the others still work."""


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def roles(self) -> list[str]:
        return [role for role, hook in ROLE_HOOKS.items() if hook in self.hooks]

    def as_dict(self) -> dict[str, Any]:
        info = {
            "name": self.name,
            "version": self.version,
            "distribution": self.distribution,
            "module": self.module,
            "hooks": self.hooks,
            "roles": self.roles,
            "builtin": self.builtin,
        }
        if self.error:
            info["error"] = self.error
        return info


def _env_names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


class PluginHost:
    """The plugin manager with one method per way the core calls hooks."""

    def __init__(self, strict: bool | None = None):
        self.pm = pluggy.PluginManager("advframe")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.strict = os.environ.get("ADVFRAME_STRICT_PLUGINS", "") not in ("", "0") if strict is None else strict
        self._subset_callers: dict[tuple[str, str], Any] = {}
        if os.environ.get("ADVFRAME_TRACE_PLUGINS", "") not in ("", "0"):
            self.pm.add_hookcall_monitoring(self._trace_before, self._trace_after)

    # -- registration -------------------------------------------------------------------------

    def register(self, plugin, name: str, *, distribution: str = "(registered)", version: str = "0",
                 builtin: bool = False) -> PluginInfo:
        """Register a module or object under ``name`` (tests register plugins this way)."""
        if name in self.infos and not self.infos[name].error:
            raise PluginError(f"a plugin named {name!r} is already registered ({self.infos[name].distribution})")
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            self.pm.unregister(name=name)
            raise
        info = PluginInfo(
            name=name,
            distribution=distribution,
            version=version,
            module=getattr(plugin, "__name__", type(plugin).__name__),
            builtin=builtin,
            hooks=sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or []),
        )
        self.infos[name] = info
        self._subset_callers.clear()
        return info

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._subset_callers.clear()

    def load_builtins(self) -> None:
        from advframe import __version__

        for name, module_name in BUILTIN_PLUGINS.items():
            module = importlib.import_module(module_name)
            self.register(module, name, distribution="advframe", version=__version__, builtin=True)

    def load_entrypoints(self) -> None:
        allow = _env_names("ADVFRAME_LOAD_PLUGINS")
        block = _env_names("ADVFRAME_DISABLE_PLUGINS") or set()
        claims: dict[str, list[importlib.metadata.EntryPoint]] = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (allow is not None and ep.name not in allow) or ep.name in block:
                continue
            same = [other for other in claims.get(ep.name, []) if _dist_name(other) == _dist_name(ep)]
            if not same:  # one distribution seen twice on sys.path is not a conflict
                claims.setdefault(ep.name, []).append(ep)
        for name, eps in sorted(claims.items()):
            owners = " and ".join(_dist_name(ep) for ep in eps)
            if name in self.infos:  # the built-in keeps its name; the intruder is not loaded
                error = PluginLoadError(name, owners, PluginError(
                    f"the name {name!r} is claimed by both {owners} and advframe (built-in); rename the plugin"))
                if self.strict:
                    raise error
                warnings.warn(str(error), PluginLoadWarning, stacklevel=2)
            elif len(eps) > 1:
                self._fail(name, owners, PluginError(f"the name {name!r} is claimed by both {owners}; uninstall one"))
            else:
                self._load_one(eps[0])

    def _load_one(self, ep: importlib.metadata.EntryPoint) -> None:
        dist, version = _dist_name(ep), (ep.dist.version if ep.dist else "?")
        try:
            plugin = ep.load()
            self.register(plugin, ep.name, distribution=dist, version=version)
        except Exception as exc:  # a broken plugin must not take down the others
            self._fail(ep.name, f"{dist} {version}", exc)

    def _fail(self, name: str, distribution: str, cause: BaseException) -> None:
        error = PluginLoadError(name, distribution, cause)
        if self.strict:
            raise error
        warnings.warn(str(error), PluginLoadWarning, stacklevel=2)
        if name not in self.infos:
            self.infos[name] = PluginInfo(name, distribution, "?", "?", error=str(error))
        else:
            self.infos[name].error = str(error)

    # -- lookup -------------------------------------------------------------------------------

    def available(self, role: str | None = None) -> list[str]:
        names = [n for n, info in self.infos.items() if not info.error]
        if role:
            names = [n for n in names if role in self.infos[n].roles]
        return sorted(names)

    def require(self, name: str, role: str | None = None) -> PluginInfo:
        """The plugin ``name`` (able to play ``role``), or an error that lists what is installed."""
        info = self.infos.get(name)
        if info is not None and info.error:
            raise UnknownPluginError(info.error)
        candidates = self.available(role)
        if info is None or (role and role not in info.roles):
            what = f"{role} plugin" if role else "plugin"
            close = difflib.get_close_matches(name, candidates, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownPluginError(
                f"no {what} named {name!r} is installed.{hint} Installed: {', '.join(candidates) or 'none'}"
                f" (see `advframe plugins`)"
            )
        return info

    def implements(self, name: str, hook: str) -> bool:
        info = self.infos.get(name)
        return bool(info and not info.error and hook in info.hooks)

    # -- calls ----------------------------------------------------------------------------------

    def call(self, hook: str, name: str, **kwargs):
        """Call ``hook`` on plugin ``name`` only (plus wrappers); a None answer is a contract error."""
        self.require(name)
        if hook not in self.infos[name].hooks:
            raise PluginCallError(f"plugin {name!r} does not implement {hook}")
        caller = self._subset_callers.get((hook, name))
        if caller is None:
            others = {
                impl.plugin
                for impl in getattr(self.pm.hook, hook).get_hookimpls()
                if impl.plugin_name != name and not (impl.wrapper or impl.hookwrapper)
            }
            caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
            self._subset_callers[(hook, name)] = caller
        try:
            result = caller(**kwargs)
        except (PluginError, KeyboardInterrupt):
            raise
        except Exception as exc:
            if getattr(exc, "exit_code", None) is not None:  # an advframe error raised deeper down
                raise
            raise PluginCallError(f"plugin {name!r} failed in {hook}: {type(exc).__name__}: {exc}") from exc
        if isinstance(result, list) and not caller.spec.opts.get("firstresult"):
            result = result[0] if result else None  # one plugin answered a collect-all hook
        if result is None and hook != "setup":
            raise PluginCallError(f"plugin {name!r} returned None from {hook}; it must return a value")
        return result

    def default_config(self, name: str) -> dict[str, Any]:
        if not self.implements(name, "default_config"):
            return {}
        config = self.call("default_config", name)
        if not isinstance(config, dict):
            raise PluginCallError(f"plugin {name!r}: default_config must return a dict, got {type(config).__name__}")
        return config

    # -- tracing --------------------------------------------------------------------------------

    def _trace_before(self, hook_name, hook_impls, kwargs):
        self._trace_start = time.perf_counter()
        names = ", ".join(impl.plugin_name for impl in hook_impls)
        print(f"[advframe] {hook_name} -> {names}", file=sys.stderr)

    def _trace_after(self, outcome, hook_name, hook_impls, kwargs):
        elapsed = time.perf_counter() - self._trace_start
        print(f"[advframe] {hook_name} done in {elapsed:.3f}s", file=sys.stderr)


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "(unknown distribution)"


def make_plugin_host(*, entrypoints: bool = True, builtins: bool = True, strict: bool | None = None) -> PluginHost:
    """A fresh host: built-ins first, then installed entry points (tests pass ``entrypoints=False``)."""
    host = PluginHost(strict=strict)
    if builtins:
        host.load_builtins()
    if entrypoints:
        host.load_entrypoints()
    return host
