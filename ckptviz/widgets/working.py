"""Working: what every ckptviz widget does around a verb: say what the kernel is doing, disable its
buttons meanwhile, and turn any error into a message (never a traceback in the notebook)."""

from __future__ import annotations

import html
from contextlib import contextmanager

import ipywidgets as w

from ..errors import CheckpointError

ERROR_STYLE = "color:#b00020;white-space:normal"


def could_not_open(path: str, error: str) -> str:
    """An error while opening ``path``, saying which file failed."""
    return f"Could not open: {error}" if path in error else f"Could not open {path}: {error}"


class Working:
    """Mixin for widgets with a ``message`` HTML line and an ``error`` attribute."""

    message: w.HTML
    error: str | None

    def _busy_buttons(self) -> list[w.Button]:
        """The buttons disabled while a verb runs."""
        return []

    def _done_working(self) -> None:
        """After a verb, whatever happened (default: enable the busy buttons again)."""
        for b in self._busy_buttons():
            b.disabled = False

    def _error_message(self, error: Exception, text: str) -> str | None:
        """What the message line says about ``error`` (None: nothing, the widget shows it otherwise)."""
        return text if isinstance(error, CheckpointError) else f"Unexpected error ({text})"

    @contextmanager
    def _work(self, message: str, opening: str | None = None):
        """Say what the kernel is doing; turn errors into a message instead of a traceback (an error
        while ``opening`` a path says "Could not open <path>")."""
        self._say(f"Working: {message}")
        for b in self._busy_buttons():
            b.disabled = True
        try:
            yield
            self.error = None
            if self.message.value.startswith("Working: "):
                self._say("")
        except Exception as e:  # noqa: BLE001 - the widget must never show a raw traceback
            text = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
            self.error = could_not_open(opening, text) if opening is not None else text
            shown = self._error_message(e, self.error)
            if shown:
                self._say(shown, error=True)
        finally:
            self._done_working()

    def _say(self, text: str, error: bool = False) -> None:
        if error:
            body = html.escape(text).replace("\n", "<br>")
            self.message.value = f"<div class='ckptviz-error' style='{ERROR_STYLE}'>{body}</div>"
        else:
            self.message.value = text
