"""Errors that reach the user as one line, never as a traceback.

Anything derived from :class:`AdvframeError` is caught by the CLI and printed as ``Error: <message>``
with a non-zero exit. A plugin raises :class:`PluginError` for a clean message about its own input
(``raise PluginError("bat: beta must be >= 0")``).
"""


class AdvframeError(Exception):
    """Base class: the message is complete and tells the user what to do."""

    exit_code = 1


class ConfigError(AdvframeError):
    """The configuration is invalid (unknown key, wrong type, impossible value)."""

    exit_code = 2


class DataError(AdvframeError):
    """A data set is missing or malformed."""


class CheckpointError(AdvframeError):
    """A run directory or weights file cannot be read or written."""


class UnknownPluginError(AdvframeError):
    """A name on the command line or in the config matches no installed plugin."""

    exit_code = 2


class PluginLoadError(AdvframeError):
    """A plugin's entry point failed to import or register."""

    def __init__(self, name: str, distribution: str, cause: BaseException):
        self.name, self.distribution, self.cause = name, distribution, cause
        super().__init__(
            f"plugin {name!r} from {distribution} failed to load: {type(cause).__name__}: {cause}"
        )


class PluginError(AdvframeError):
    """Raised by a plugin for a problem the user can fix (bad setting, unsupported model)."""


class PluginCallError(AdvframeError):
    """A plugin's hook broke its contract (returned None, wrong shape, ...)."""


class TrainingDiverged(AdvframeError):
    """The loss became NaN or infinite."""
