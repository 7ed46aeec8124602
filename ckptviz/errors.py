"""The ckptviz error hierarchy: every bad input surfaces as a :class:`CheckpointError` subclass
whose message names the file, what was expected, what was found, and the next step."""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(Exception):
    """Base class of every error ckptviz raises on purpose."""


class CheckpointWarning(UserWarning):
    """Something about a checkpoint a user should know that did not stop ckptviz reading it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist or is not a regular file."""


class UnknownFormatError(CheckpointError):
    """The bytes are not a container ckptviz can read."""


class CorruptCheckpointError(CheckpointError):
    """The container was recognised but is damaged or truncated."""


class NoTensorsError(CheckpointError):
    """The file holds no tensors a model could load."""


class SectionError(CheckpointError, KeyError):
    """The requested section does not exist or is not model weights."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsafeCheckpointError(CheckpointError):
    """The file refers to globals beyond torch's ``weights_only`` allowlist."""

    def __init__(self, path: str, globals_: Iterable[str]):
        self.path = path
        self.globals = sorted(set(globals_))
        listed = "\n".join(f"  - {g}" for g in self.globals)
        super().__init__(
            f"{path}: the file's pickle refers to {len(self.globals)} global(s) outside torch's "
            f"weights_only allowlist:\n{listed}\n"
            "ckptviz did not import or call any of them. If you trust the file's origin, open it with "
            "open_checkpoint(path, trust=True) (ckptviz still builds no object from these classes, "
            "it only reads the tensors and plain data around them)."
        )


class ModelError(CheckpointError, TypeError):
    """The object given as a model is not usable as one."""


class AlignmentError(CheckpointError):
    """User rename rules map several checkpoint keys to one key."""


class LoadError(CheckpointError):
    """Loading into the model failed; the model was restored to its previous values."""


class OptimizerMismatchError(CheckpointError):
    """The saved optimizer state does not fit the optimizer's parameter groups."""


class CheckpointLimitError(CorruptCheckpointError):
    """The file declares more than one of ckptviz's reader limits allows (nesting, element count,
    inflated size...); the message names the module constant, which may be raised for a trusted file."""


class AdaptError(CheckpointError, ValueError):
    """A shape adaptation does not fit the two tensors (or the row has nothing to adapt)."""
