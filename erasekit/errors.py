"""One error hierarchy: every user-facing failure is an ``ErasekitError`` whose message names the problem.

The CLI prints these without a traceback and exits with status 2.
"""


class ErasekitError(Exception):
    """Base class of every error erasekit raises on purpose."""


class ModelNotFoundError(ErasekitError, FileNotFoundError):
    """A model given by hub id, folder or single file could not be found or loaded."""


class UnknownConceptError(ErasekitError, KeyError):
    """A concept name the chosen model/world does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(ErasekitError, ValueError):
    """A bad option value (method config, CLI flag, config file)."""


class AdapterError(ErasekitError, ValueError):
    """Base class of every problem with an adapter file or its fit to a pipeline."""


class AdapterFileError(AdapterError):
    """The file is missing, truncated, corrupt, not safetensors, or its metadata is missing/not JSON."""


class AdapterFormatError(AdapterError):
    """The file declares a format major version this erasekit does not read."""


class AdapterMismatchError(AdapterError):
    """The adapter does not fit the pipeline: missing module, shape mismatch, other architecture."""


class BaseModelMismatchWarning(UserWarning):
    """The adapter was computed on another checkpoint of the same architecture (it may still transfer)."""


class BusyError(ErasekitError):
    """A folder is in use by another erasekit process (an advisory lock is held on it)."""


class CheckpointError(ErasekitError, ValueError):
    """A training checkpoint is damaged (truncated, not safetensors, missing tensors) or cannot be written."""


class TrainingDivergedError(ErasekitError, FloatingPointError):
    """The training loss or a trained tensor became NaN or infinite, or a delta outgrew its base weight."""
