"""ipywidgets views over the core objects: pickers, the report table, panels, CheckpointInspector,
CheckpointDiff, CheckpointSeries."""

from .diff_view import CheckpointDiff
from .inspector import CheckpointInspector
from .series_view import CheckpointSeries

__all__ = ["CheckpointDiff", "CheckpointInspector", "CheckpointSeries"]
