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


class MissingDataError(DataError):
    """A dataset that is not on disk. ``variant`` and ``root`` let the CLI print where the data
    comes from and the user's own command with ``scenario.root`` set (:func:`cl_bench.cli.data_hint`)."""

    def __init__(self, message: str, *, variant: str, root: str) -> None:
        super().__init__(message)
        self.variant, self.root = variant, root


class WeightsError(ClBenchError):
    """A weights file that is missing, unreadable or does not match the model."""


class DivergenceError(ClBenchError):
    """A non-finite loss during training."""
