"""The documentation keeps up with the hooks: every hook is in CONTRIBUTING.md's table with its
arguments, and has a test named test_hook_<name> (as datasette does)."""

import inspect
import re
from pathlib import Path

import pytest

from advframe import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name, value in vars(hookspecs).items()
         if inspect.isfunction(value) and hasattr(value, "advframe_spec")]


def test_the_hooks_are_the_documented_set():
    assert set(HOOKS) == {"generate_perturbation", "training_step", "adapt_task", "evaluate", "default_config",
                          "run_defaults", "setup"}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_contract_table_with_its_arguments(hook):
    text = (ROOT / "CONTRIBUTING.md").read_text()
    arguments = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"`{hook}({arguments})`" in text
    assert getattr(hookspecs, hook).__doc__.strip()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        names |= set(re.findall(r"^def (test_hook_\w+)", path.read_text(), re.MULTILINE))
    assert f"test_hook_{hook}" in names
