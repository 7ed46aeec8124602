"""ckptviz: look inside PyTorch checkpoints and load them into live models, safely and lazily."""

from .align import Rule
from .checkpoint import Checkpoint, open_checkpoint
from .compare import STATUSES, Report, compare
from .errors import (
    AlignmentError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LoadError,
    ModelError,
    NoTensorsError,
    OptimizerMismatchError,
    SectionError,
    UnknownFormatError,
    UnsafeCheckpointError,
)
from .load import LoadResult, load_optimizer, load_partial

__version__ = "0.1.0"

__all__ = [
    "STATUSES", "AlignmentError", "Checkpoint", "CheckpointError", "CheckpointNotFoundError",
    "CorruptCheckpointError", "LoadError", "LoadResult", "ModelError", "NoTensorsError",
    "OptimizerMismatchError", "Report", "Rule", "SectionError", "UnknownFormatError",
    "UnsafeCheckpointError", "compare", "load_optimizer", "load_partial", "open_checkpoint",
]
