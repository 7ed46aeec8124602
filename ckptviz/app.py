"""``ckptviz app``: the inspector, the diff view and the series view as a page of their own, served by Voilà.

A small notebook is written to a temporary folder and served with Voilà (the optional extra ``app``): the
page shows the widgets only, never code, and runs in a kernel started in the working directory of the
command, so relative paths and ``package.module:Class`` model names mean what they mean there."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import CheckpointError

HOST = "127.0.0.1"


class AppError(CheckpointError):
    """The app cannot start (Voilà missing, a port in use)."""


def app_notebook(path: str | os.PathLike | None, cwd: str | os.PathLike) -> dict:
    """The notebook the app serves: an inspector (opening ``path`` when given), a diff view and a series view
    (a folder ``path`` typed in as its run), in tabs."""
    cwd = os.path.abspath(cwd)
    target = None if path is None else os.path.abspath(os.path.join(cwd, path))
    code = f"""\
import os, sys
os.chdir({cwd!r})
sys.path.insert(0, {cwd!r})
import ipywidgets as w
import ckptviz as cv

path = {target!r}
inspector = cv.CheckpointInspector(path=path if path and not os.path.isdir(path) else None,
                                   start_dir=path if path and os.path.isdir(path) else {cwd!r})
diff = cv.CheckpointDiff(start_dir=path if path and os.path.isdir(path) else {cwd!r})
series = cv.CheckpointSeries()
series.path.value = path if path and os.path.isdir(path) else ""
tabs = w.Tab([inspector, diff, series])
tabs.set_title(0, "Inspect and load")
tabs.set_title(1, "Compare two checkpoints")
tabs.set_title(2, "A training run")
tabs.add_class("ckptviz-app")
display(w.HTML("<h2 style='margin:4px 0'>ckptviz</h2>"), tabs)
"""
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "ckptviz-app", "metadata": {},
                   "outputs": [], "source": code}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def command(notebook: Path, port: int, *, open_browser: bool) -> list[str]:
    """The Voilà command line that serves ``notebook`` on 127.0.0.1:``port``."""
    cmd = [sys.executable, "-m", "voila", str(notebook), f"--port={port}", f"--Voila.ip={HOST}",
           "--show_tracebacks=True", "--theme=light"]
    return cmd + ([] if open_browser else ["--no-browser"])


def serve(path: str | os.PathLike | None = None, *, port: int = 8866, open_browser: bool = True) -> int:
    """Serve the app until interrupted; returns Voilà's exit code."""
    if importlib.util.find_spec("voila") is None:
        raise AppError("ckptviz app needs Voilà, which is not installed: pip install 'ckptviz[app]' (or voila>=0.5)")
    if path is not None and not os.path.exists(path):
        raise AppError(f"{path}: no such file or folder to open in the app")
    folder = Path(tempfile.mkdtemp(prefix="ckptviz-app-"))
    try:
        nb = folder / "ckptviz.ipynb"
        nb.write_text(json.dumps(app_notebook(path, os.getcwd()), indent=1))
        print(f"ckptviz app: serving on http://{HOST}:{port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            return subprocess.call(command(nb, port, open_browser=open_browser))
        except KeyboardInterrupt:
            return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
