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


class RecordWriteError(ClBenchError):
    """The run record could not be written (a full disk, a read-only or vanished directory)."""


class RunLockedError(ClBenchError):
    """Another live process is writing the same run (same ``--out`` and ``--run-id``)."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal: SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption) or SIGHUP.

    A :class:`KeyboardInterrupt`, so a notebook's Ctrl-C and ``except KeyboardInterrupt`` behave
    as usual; ``exit_code`` is the shell's 128 + signal number (130, 143, 129)."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(signal_name)
        self.signal_name, self.exit_code = signal_name, exit_code

    @property
    def reason(self) -> str:
        how = " (Ctrl-C)" if self.signal_name == "SIGINT" else ""
        return f"interrupted by {self.signal_name}{how}"


class FederationError(ClBenchError):
    """A federation config or strategy that cannot be federated as asked (docs/federation.md)."""
