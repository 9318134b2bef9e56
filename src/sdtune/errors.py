"""Errors meant for people: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A failure the user can fix. The message says what, where (file/key) and what to do."""

    exit_code = 2


class ConfigError(UserError):
    """The configuration (file, key or value) is wrong."""


class DataError(UserError):
    """The training or validation data is unusable."""


class ModelError(UserError):
    """The base model cannot be found, read or used."""


class RunDirError(UserError):
    """The run directory is in a state that would lose work."""
