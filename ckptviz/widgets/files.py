"""FilePicker: browse the kernel's folders for checkpoint-like files, paste a path, or upload one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import ipywidgets as w

from ..checkpoint import human_size
from ..readers import sniff
from ..readers.layout import summarize_folder

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors", ".pkl", ".pth.tar")
MAX_SNIFFED = 300  # files sniffed by content per folder; beyond that, names decide
UP = "..  (parent folder)"


def is_checkpoint_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(CHECKPOINT_SUFFIXES) or lower.endswith("index.json")


def list_folder(folder: Path) -> list[tuple[str, Path, str]]:
    """(label, path, kind) for sub-folders and checkpoint-like files of ``folder``, folders first.

    A file counts as checkpoint-like by its name or, for the first few hundred others, by its bytes.
    A folder that is one checkpoint (hub shards, DCP, DeepSpeed) is one entry of kind "checkpoint",
    labelled with its layout, file count and total size; so is ``folder`` itself when it is one.
    """
    dirs, files = [], []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name.lower())
    except OSError:
        return []
    here = summarize_folder(str(folder))
    if here is not None:
        dirs.append((f"./  [this folder is one checkpoint: {here}]", Path(folder), "checkpoint"))
    sniffed = 0
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if e.is_dir():
                summary = summarize_folder(e.path) if sniffed < MAX_SNIFFED else None
                sniffed += 1
                if summary is not None:
                    dirs.append((f"{e.name}/  [{summary}]", Path(e.path), "checkpoint"))
                else:
                    dirs.append((f"{e.name}/", Path(e.path), "dir"))
                continue
            if not e.is_file():
                continue
            size = e.stat().st_size
        except OSError:
            continue
        kind = "unknown"
        if size and sniffed < MAX_SNIFFED:
            sniffed += 1
            try:
                kind = sniff(e.path)
            except OSError:
                pass
        if kind in ("unknown", "pickle") and not is_checkpoint_name(e.name):
            continue
        fmt = "" if kind == "unknown" else f"  [{kind}]"
        files.append((f"{e.name}  ({human_size(size)}){fmt}", Path(e.path), "file"))
    return dirs + files


class FilePicker(w.VBox):
    """Pick a checkpoint: a folder browser, a path box, and an upload control.

    ``selected`` is the chosen path (or None); callbacks registered with ``register_callback`` get
    the picker each time a file is chosen.
    """

    def __init__(self, start_dir: str | os.PathLike | None = None, path: str | None = None):
        self.folder = Path(start_dir or os.getcwd()).resolve()
        self.selected: str | None = None
        self._callbacks: list[Callable[[FilePicker], None]] = []
        self.folder_label = w.HTML(layout=w.Layout(margin="0"))
        self.listing = w.Select(options=[], rows=8, layout=w.Layout(width="100%"))
        self.listing.add_class("ckptviz-file-list")
        self.path = w.Text(placeholder="or paste a path: /data/run1/last.ckpt", value=path or "",
                           layout=w.Layout(flex="1"))
        self.path.add_class("ckptviz-path")
        self.open_button = w.Button(description="Open", button_style="primary", icon="folder-open",
                                    layout=w.Layout(width="90px"))
        self.open_button.add_class("ckptviz-open")
        self.upload = w.FileUpload(accept=",".join(CHECKPOINT_SUFFIXES), multiple=False,
                                   description="Upload", layout=w.Layout(width="110px"))
        self.upload.add_class("ckptviz-upload")
        self.open_button.on_click(lambda _: self._choose(self.path.value.strip()))
        # The box syncs as it is typed in, and Enter opens (the Text widget's "submit" message): so Open,
        # clicked right after typing, opens the typed path once. Opening on the box's change event instead
        # would open twice (the click's blur sends the value after the click itself).
        self.path.continuous_update = True
        self.path.on_msg(self._on_path_msg)
        self.listing.observe(self._on_listing, names="value")
        self.upload.observe(self._on_upload, names="value")
        super().__init__([
            self.folder_label, self.listing,
            w.HBox([self.path, self.open_button, self.upload], layout=w.Layout(width="100%")),
        ])
        self.add_class("ckptviz-file-picker")
        self.refresh()

    def register_callback(self, callback: Callable[[FilePicker], None]) -> None:
        self._callbacks.append(callback)

    def refresh(self) -> None:
        """Re-read the current folder."""
        self.folder_label.value = f"<small>folder <code>{self.folder}</code></small>"
        entries = list_folder(self.folder)
        self._entries = {label: (p, kind) for label, p, kind in entries}
        self._entries[UP] = (self.folder.parent, "dir")
        with self.listing.hold_trait_notifications():
            self.listing.options = [UP] + [label for label, _, _ in entries]
            self.listing.value = None

    def navigate(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).resolve()
        self.refresh()

    def _on_listing(self, change) -> None:
        label = change["new"]
        if label is None or label not in self._entries:
            return
        target, kind = self._entries[label]
        if kind == "dir":
            self.navigate(target)
        else:
            self._choose(str(target))

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0]
        folder = Path(tempfile.mkdtemp(prefix="ckptviz-upload-"))
        target = folder / Path(item["name"]).name
        target.write_bytes(bytes(item["content"]))
        self._choose(str(target))

    def _on_path_msg(self, _widget, content, _buffers) -> None:
        if content.get("event") == "submit":
            self._choose(self.path.value.strip())

    def _choose(self, path: str) -> None:
        if not path:
            return
        self.selected = os.path.expanduser(path)
        self.path.value = self.selected
        for cb in self._callbacks:
            cb(self)
