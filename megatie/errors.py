"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, a corrupt checkpoint) raises a
``MegatieError``; launchers print its message on one line and exit with status 2, never a
traceback. Programming errors stay ordinary exceptions.
"""


class MegatieError(Exception):
    """An error caused by user input; its message says what to change."""


class ConfigError(MegatieError, ValueError):
    """An invalid flag, config value or tie vector."""


class NothingLeftToTrain(ConfigError):
    """A resumed run whose checkpoint already reached --max-steps."""

    def __init__(self, step: int, max_steps: int):
        super().__init__(f"the checkpoint is at step {step} and --max-steps is {max_steps}: nothing left to train "
                         "(raise --max-steps and add --allow-changed max_steps)")


class DataError(MegatieError):
    """A missing, empty, unreadable or inconsistent corpus or data directory."""


class CheckpointError(MegatieError):
    """A checkpoint that is missing, corrupt or does not match the run."""


class DivergedError(MegatieError):
    """Training produced a non-finite loss or weights; the run stops before saving them."""
