"""Errors a user can fix. The CLI prints them as one line and exits with code 2 (no traceback)."""


class MegaswiftError(Exception):
    """A problem with the user's input (config, layout, checkpoint, data): the message says
    which value is wrong and how to fix it."""


class ConfigError(MegaswiftError):
    """A config key, type or value is invalid."""


class LayoutError(MegaswiftError):
    """The parallel layout does not fit the world size or the model."""


class CheckpointError(MegaswiftError):
    """A checkpoint is missing a tensor, has a wrong shape, or is of an unsupported family."""


class DataError(MegaswiftError):
    """A data file or row is missing or malformed; the message names the file and line (or row)."""
