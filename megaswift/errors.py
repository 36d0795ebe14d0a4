"""Errors a user can fix. The CLI prints them as one line and exits with code 2 (no traceback)."""


class MegaswiftError(Exception):
    """A problem with the user's input (config, layout, checkpoint, data): the message says
    which value is wrong and how to fix it."""

    exit_code = 2
    label = "error"  # the CLI prints "megaswift: <label>: <message>"


class Stopped(MegaswiftError):
    """The run stopped on request (a scheduler's signal), after saving a checkpoint: running the
    same command again resumes. 75 is EX_TEMPFAIL, "try again later": what a requeue acts on."""

    exit_code = 75
    label = "stopped"


class Interrupted(MegaswiftError):
    """Ctrl-C: the run ends at once; the message says where and what the last checkpoint is."""

    exit_code = 130  # 128 + SIGINT, as a shell reports it
    label = "interrupted"


class ConfigError(MegaswiftError):
    """A config key, type or value is invalid."""


class LayoutError(MegaswiftError):
    """The parallel layout does not fit the world size or the model."""


class CheckpointError(MegaswiftError):
    """A checkpoint is missing a tensor, has a wrong shape, or is of an unsupported family."""


class DataError(MegaswiftError):
    """A data file or row is missing or malformed; the message names the file and line (or row)."""
