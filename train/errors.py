"""Training's user-facing error: a run that cannot go on for a reason the user can fix."""
from hmar.errors import HmarError


class TrainingError(HmarError):
    """A run folder that exists without --resume, a checkpoint that does not fit, out of memory…"""


class TrainingInterrupted(TrainingError):
    """SIGTERM/SIGINT stopped the run after a checkpoint was written; --resume continues it."""
