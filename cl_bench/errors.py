"""The one exception type users see: a clear, one-line message and a non-zero exit.

Anything raised as :class:`ClBenchError` is printed by the CLI as ``error: <message>`` without a
traceback; every other exception is a bug and keeps its traceback.
"""


class ClBenchError(Exception):
    """A user-facing error (bad name, bad config, missing data, diverged loss...)."""


class ConfigError(ClBenchError):
    """An unknown key, a wrong type or an out-of-range value in a configuration."""


class DataError(ClBenchError):
    """A dataset root that is missing, incomplete or corrupt."""


class WeightsError(ClBenchError):
    """A weights file that is missing, unreadable or does not match the model."""


class DivergenceError(ClBenchError):
    """A non-finite loss during training."""
