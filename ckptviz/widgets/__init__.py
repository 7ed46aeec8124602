"""ipywidgets views over the core objects: pickers, the report table, panels, CheckpointInspector."""

from .inspector import CheckpointInspector

__all__ = ["CheckpointInspector"]
