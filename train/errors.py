"""Training's user-facing errors and notes: a run that cannot go on for a reason the user can fix, and
what the user should know that is no error."""
import signal
import sys

from hmar.errors import HmarError


class TrainingError(HmarError):
    """A run folder that exists without --resume, a checkpoint that does not fit, out of memory…"""


class TrainingInterrupted(TrainingError):
    """SIGTERM/SIGINT stopped the run after a checkpoint was written; --resume continues it. The exit
    code is 128 + the signal's number, as for any other command a signal stops."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        if signal_name is not None:
            self.exit_code = 128 + signal.Signals[signal_name].value


def note(message: str) -> None:
    """One line on stderr, in the form the CLI's notes take."""
    print(f"note: {message}", file=sys.stderr)
