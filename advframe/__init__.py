"""advframe: adversarial machine learning as plugins.

The public API a plugin uses::

    import advframe

    @advframe.hookimpl
    def training_step(model, batch, optimizer, perturb, ctx): ...

Shared machinery lives in submodules: :mod:`advframe.attacks` (PGD and friends),
:mod:`advframe.data`, :mod:`advframe.models`, :mod:`advframe.cost`, :mod:`advframe.testing`.
"""

from advframe.errors import AdvframeError, PluginError
from advframe.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["AdvframeError", "PluginError", "RunContext", "__version__", "hookimpl"]


def __getattr__(name):
    # RunContext pulls in torch; keep `import advframe` (and `advframe --help`) light
    if name == "RunContext":
        from advframe.context import RunContext

        return RunContext
    raise AttributeError(f"module 'advframe' has no attribute {name!r}")
