"""ckptviz: look inside PyTorch checkpoints and load them into live models, safely and lazily."""

from .adapt import preview as preview_adaptation
from .align import Rule
from .checkpoint import Checkpoint, open_checkpoint
from .compare import STATUSES, Report, compare
from .diff import DiffReport, diff, diff_tensors
from .errors import (
    AdaptError,
    AlignmentError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    LoadError,
    ModelError,
    NoTensorsError,
    OptimizerMismatchError,
    SectionError,
    UnknownFormatError,
    UnsafeCheckpointError,
)
from .load import LoadResult, load_partial
from .models import build_model, find_models, model_from_config, parse_kwargs, torchvision_models
from .optim_load import load_optimizer
from .snippet import torch_code
from .stats import Histogram, StatsCache, histogram, stats_frame, summarize, tensor_stats

__version__ = "0.1.0"


def __getattr__(name: str):
    # The widgets import ipywidgets; load them only when asked for, so the core stays headless.
    if name in ("CheckpointInspector", "CheckpointDiff"):
        from . import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'ckptviz' has no attribute {name!r}")


__all__ = [
    "STATUSES", "AdaptError", "AlignmentError", "Checkpoint", "CheckpointDiff", "CheckpointInspector",
    "CheckpointError",
    "CheckpointLimitError", "CheckpointWarning", "CheckpointNotFoundError", "CorruptCheckpointError", "LoadError",
    "LoadResult", "ModelError",
    "NoTensorsError", "OptimizerMismatchError", "Report", "Rule", "SectionError", "UnknownFormatError",
    "UnsafeCheckpointError", "compare", "load_optimizer", "load_partial", "open_checkpoint", "build_model",
    "find_models", "model_from_config", "parse_kwargs", "torchvision_models", "torch_code", "DiffReport", "diff",
    "diff_tensors", "preview_adaptation",
    "Histogram", "StatsCache", "histogram", "stats_frame", "summarize", "tensor_stats",
]
