"""The typed errors of an experiment. Each carries one line that says what is wrong and what to
do; the library raises them and only the command-line entry points turn them into `error: ...`
and an exit code (comigs_jax.cli)."""
from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ExperimentError(Exception):
    """A run that cannot go on (bad config, workdir, data, base, checkpoint or numbers)."""


class ConfigError(ExperimentError, ValueError):
    """A configuration value that is not allowed."""


class WorkdirError(ExperimentError):
    """The workdir cannot be used: not a directory, not writable, full, or another config's run."""


class DataError(ExperimentError):
    """The users' data cannot be built (missing source, too few tokens, undecodable files)."""


class BaseModelError(ExperimentError):
    """The frozen base cannot be loaded."""


class NumericalFault(ExperimentError):
    """A NaN or inf in a training metric, the state or a test loss; stopped before aggregation."""


class Stopped(Exception):
    """The run stopped cleanly on a signal, after writing a checkpoint of the finished round.

    Not an error: every process of the run agreed to stop. `signum` is the signal (None when it
    came to another process), `round` the last checkpointed round of `rounds`."""

    def __init__(self, message: str, signum: int | None, round_index: int, rounds: int, checkpoint_dir: str):
        super().__init__(message)
        self.signum, self.round, self.rounds, self.checkpoint_dir = signum, round_index, rounds, checkpoint_dir

    @property
    def exit_code(self) -> int:
        import signal
        return 128 + int(self.signum or signal.SIGTERM)
