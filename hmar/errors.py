"""User-facing errors. Each carries a one-line message that names the problem; the CLI prints it
without a traceback. Anything else escaping the engine is a bug."""


class HmarError(Exception):
    """Base class: a problem the user can fix (bad input, missing model, bad checkpoint…)."""

    #: exit code the CLI uses: 2 for usage errors, 1 for runtime failures
    exit_code = 1


class ConfigError(HmarError):
    """A config.json or preset that does not describe a valid model."""

    exit_code = 2


class ScheduleError(HmarError):
    """A mask schedule or step count that does not fit the model's scales."""

    exit_code = 2


class CheckpointError(HmarError):
    """A weight file that is missing, unreadable or does not fit the model."""


class InputError(HmarError):
    """A bad user input (image, mask, class, box…)."""

    exit_code = 2


class DeviceError(HmarError):
    """A requested device that this machine does not have."""
