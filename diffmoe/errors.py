"""User-facing errors.

Every problem caused by input a person typed or a file they pointed at (a config value, a path, a
checkpoint) is raised as :class:`DiffMoEError` with a one-line message that names the problem and
the fix; so is a training run that had to stop (:class:`TrainingError`). The CLI prints such
messages as a single ``error:`` line instead of a traceback.
"""


class DiffMoEError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


class ConfigError(DiffMoEError):
    """An invalid config file, key or value."""


class CheckpointError(DiffMoEError):
    """A checkpoint that is missing, corrupt, or does not fit the requested model."""


class DataError(DiffMoEError):
    """A dataset that cannot be found or read."""


class TrainingError(DiffMoEError):
    """Training stopped: a non-finite loss, a rank that died or hung, or a termination signal. The
    message names the step and the checkpoint to resume from."""


class CapacityWarning(UserWarning):
    """Sampling settings that work but are probably not what was meant (a DiffMoE token pool of
    one image, a threshold under which no expert or every expert takes every token); the
    pipeline reports them with ``warnings.warn``, the CLI as log warnings."""
