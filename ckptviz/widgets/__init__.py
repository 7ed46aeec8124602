"""ipywidgets views over the core objects: pickers, the report table, panels, CheckpointInspector,
CheckpointDiff."""

from .diff_view import CheckpointDiff
from .inspector import CheckpointInspector

__all__ = ["CheckpointDiff", "CheckpointInspector"]
