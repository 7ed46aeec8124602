"""Drive a JupyterLab notebook from Playwright: open it and wait for a really ready kernel, run all cells,
append and run a cell and read its text output, screenshots, console capture and a loopback-only network.

Every wait polls the notebook *model* through ``window.jupyterapp`` (needs ``--LabApp.expose_app_in_browser``)
and fails with a description of what the notebook looked like, never a bare timeout."""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab_server import REPO_ROOT, JupyterLab
from playwright.sync_api import BrowserContext, Page, Route

ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
KERNEL_START_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 120.0
CELL_TIMEOUT_S = 60.0
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Small library evaluated in the page on each call: find the notebook panel (by path, else the current
# widget), describe its kernel and cells, insert cells and run commands without awaiting them.
_JS_LIB = r"""
const app = window.jupyterapp;
const findPanel = (path) => {
  if (!app || !app.shell) return null;
  if (path) {
    for (const w of app.shell.widgets('main')) {
      if (w.context && w.context.path === path && w.content && w.sessionContext) return w;
    }
    return null;
  }
  const w = app.shell.currentWidget;
  return w && w.content && w.sessionContext && w.context ? w : null;
};
const outputText = (outputs) => outputs.map((o) => {
  if (o.output_type === 'stream') return Array.isArray(o.text) ? o.text.join('') : o.text;
  if (o.output_type === 'error') return o.ename + ': ' + o.evalue + '\n' + (o.traceback || []).join('\n');
  const plain = o.data && o.data['text/plain'];
  if (plain === undefined) return '';
  return (Array.isArray(plain) ? plain.join('') : plain) + '\n';
}).join('');
const cellInfo = (cell, index) => {
  const m = cell.model;
  const outputs = m.type === 'code' ? m.outputs.toJSON() : [];
  return {
    index, type: m.type,
    count: m.type === 'code' ? m.executionCount : null,
    blank: m.sharedModel.getSource().trim() === '',
    source: m.sharedModel.getSource().slice(0, 200),
    error: outputs.some((o) => o.output_type === 'error'),
    text: outputText(outputs),
  };
};
const state = (path) => {
  const panel = findPanel(path);
  const bar = document.querySelector('#jp-main-statusbar');
  const dialog = document.querySelector('.jp-Dialog');
  const base = {
    app: !!app,
    statusbar: bar ? bar.innerText.replace(/\s+/g, ' ').trim() : null,
    dialog: dialog ? dialog.innerText.replace(/\s+/g, ' ').trim() : null,
  };
  if (!panel) return { ...base, panel: false };
  const ctx = panel.sessionContext;
  const kernel = ctx.session ? ctx.session.kernel : null;
  return {
    ...base, panel: true, path: panel.context.path, current: app.shell.currentWidget === panel,
    kernel: kernel ? { name: kernel.name, connection: kernel.connectionStatus, status: kernel.status } : null,
    cells: panel.content.widgets.map(cellInfo),
  };
};
const activate = (path) => {
  const panel = findPanel(path);
  if (!panel) throw new Error('no notebook panel for ' + (path || 'the current widget'));
  app.shell.activateById(panel.id);
  return panel;
};
const H = {
  state,
  activate: (path) => { activate(path); return true; },
  runAll: (path) => { activate(path); void app.commands.execute('notebook:run-all-cells'); return true; },
  append: ([path, source]) => {
    const nb = activate(path).content;
    const index = nb.model.cells.length;
    nb.model.sharedModel.insertCell(index, { cell_type: 'code', source });
    return index;
  },
  runCell: ([path, index]) => {
    const nb = activate(path).content;
    nb.activeCellIndex = index;
    nb.deselectAll();
    void app.commands.execute('notebook:run-cell');
    return true;
  },
};
"""


def _js(page: Page, name: str, arg: object = None) -> object:
    return page.evaluate(f"(arg) => {{ {_JS_LIB}\nreturn H[{name!r}](arg); }}", arg)


def notebook_state(page: Page, nb_path: str | None = None) -> dict:
    """What the page shows: ``{app, statusbar, panel, path, current, kernel: {name, connection, status},
    cells: [{index, type, count, blank, source, error, text}]}`` (``panel`` False when the notebook is not open)."""
    return _js(page, "state", nb_path)


def _describe(st: dict) -> str:
    if not st.get("app"):
        return "window.jupyterapp is missing (page not loaded, or the server lacks --LabApp.expose_app_in_browser)"
    if not st.get("panel"):
        return f"no notebook panel open; status bar: {st.get('statusbar')!r}; dialog: {st.get('dialog')!r}"
    lines = [f"notebook {st['path']!r}, kernel {st['kernel']}, status bar {st['statusbar']!r}"]
    if st.get("dialog"):
        lines.append(f"an open dialog says: {st['dialog']!r}")
    for c in st["cells"]:
        text = _ANSI.sub("", c["text"]).strip().replace("\n", " | ")[:300]
        lines.append(f"  [{c['index']}] {c['type']} count={c['count']} {c['source'][:60]!r} -> {text!r}")
    return "\n".join(lines)


def _wait(page: Page, nb_path: str | None, done: Callable[[dict], bool], timeout: float, what: str) -> dict:
    """Poll ``notebook_state`` until ``done(state)``; ``done`` may raise to fail fast. Times out with a description."""
    deadline = time.monotonic() + timeout
    while True:
        st = notebook_state(page, nb_path)
        if done(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {what}.\n{_describe(st)}")
        page.wait_for_timeout(200)


def _kernel_idle(st: dict) -> bool:
    k = st.get("kernel")
    return bool(k) and k["connection"] == "connected" and k["status"] == "idle"


def _max_count(st: dict) -> int:
    return max((c["count"] or 0 for c in st.get("cells", [])), default=0)


def _raise_on_dead(st: dict) -> None:
    k = st.get("kernel")
    if k and k["status"] in ("dead", "autorestarting", "restarting"):
        raise AssertionError(f"The kernel is {k['status']}.\n{_describe(st)}")


# -- public helpers ---------------------------------------------------------------------------------------------
def wait_for_kernel_ready(page: Page, nb_path: str | None = None, timeout: float = KERNEL_START_TIMEOUT_S) -> dict:
    """Wait until the notebook's kernel *exists*, is connected and idle, and the status bar says Idle.

    The toolbar's execution indicator reads "idle" before any kernel exists (Run All then does nothing),
    so this checks ``sessionContext.session.kernel`` itself."""

    def ready(st: dict) -> bool:
        _raise_on_dead(st)
        if "Select Kernel" in (st.get("dialog") or ""):  # notebook without kernelspec metadata: take the default
            page.locator(".jp-Dialog .jp-mod-accept").click()
            return False
        return _kernel_idle(st) and "Idle" in (st.get("statusbar") or "")

    return _wait(page, nb_path, ready, timeout, "the kernel to be started, connected and idle")


def wait_for_kernel_idle(page: Page, nb_path: str | None = None, timeout: float = RUN_TIMEOUT_S) -> dict:
    def idle(st: dict) -> bool:
        _raise_on_dead(st)
        return _kernel_idle(st)

    return _wait(page, nb_path, idle, timeout, "the kernel to be idle")


def open_notebook(
    page: Page, lab: JupyterLab, nb_path: str, *, fresh_kernel: bool = True, timeout: float = KERNEL_START_TIMEOUT_S
) -> dict:
    """Open ``nb_path`` (relative to ``lab.root``) in JupyterLab and wait for a ready kernel.

    ``fresh_kernel`` first shuts down any session the server still holds for that notebook (an earlier test's
    kernel state would otherwise leak in). The kernel is started over REST before the page loads (in parallel
    with the front end). Returns the notebook state."""
    if fresh_kernel:
        lab.delete_sessions(nb_path)
    lab.start_session(nb_path)
    page.goto(lab.notebook_url(nb_path), wait_until="domcontentloaded", timeout=timeout * 1000)
    _wait(page, nb_path, lambda s: bool(s.get("panel")), timeout, f"JupyterLab to open {nb_path!r}")
    _js(page, "activate", nb_path)
    return wait_for_kernel_ready(page, nb_path, timeout)


def run_all_cells(page: Page, nb_path: str | None = None, timeout: float = RUN_TIMEOUT_S) -> dict:
    """Run all cells (``notebook:run-all-cells``, dispatched with ``void``, never awaited) and wait until every
    non-blank code cell has a new execution count and the kernel is idle. Fails fast, with the traceback,
    if a cell raises. Returns the notebook state."""
    baseline = _max_count(wait_for_kernel_ready(page, nb_path, timeout))
    _js(page, "runAll", nb_path)

    def finished(st: dict) -> bool:
        _raise_on_dead(st)
        fresh = [c for c in st["cells"] if c["type"] == "code" and not c["blank"]]
        for c in fresh:
            if c["error"] and (c["count"] or 0) > baseline:
                raise AssertionError(f"Cell {c['index']} raised:\n{_ANSI.sub('', c['text'])}\n{_describe(st)}")
        return all((c["count"] or 0) > baseline for c in fresh) and _kernel_idle(st)

    return _wait(page, nb_path, finished, timeout, "all cells to run")


def run_cell(page: Page, index: int, nb_path: str | None = None, timeout: float = CELL_TIMEOUT_S) -> str:
    """(Re)run the code cell at ``index`` and return its text output (streams, text/plain results, errors)."""
    baseline = _max_count(wait_for_kernel_idle(page, nb_path, timeout))
    _js(page, "runCell", [nb_path, index])

    def finished(st: dict) -> bool:
        _raise_on_dead(st)
        return (st["cells"][index]["count"] or 0) > baseline and _kernel_idle(st)

    st = _wait(page, nb_path, finished, timeout, f"cell {index} to run")
    return _ANSI.sub("", st["cells"][index]["text"])


def run_new_cell(
    page: Page,
    source: str,
    nb_path: str | None = None,
    *,
    until: Callable[[str], bool] | None = None,
    timeout: float = CELL_TIMEOUT_S,
    allow_error: bool = False,
) -> str:
    """Append a code cell with ``source``, run it and return its text output.

    With ``until``, rerun the same cell until ``until(output)`` holds (for state that reaches the kernel
    asynchronously, like widget messages); the last output is returned either way, so assert on it.
    A Python exception in the cell fails the test unless ``allow_error``."""
    index = _js(page, "append", [nb_path, source])
    deadline = time.monotonic() + timeout
    while True:
        out = run_cell(page, index, nb_path, timeout=max(deadline - time.monotonic(), 5.0))
        if not allow_error and notebook_state(page, nb_path)["cells"][index]["error"]:
            raise AssertionError(f"The new cell raised:\n{out}\n--- source ---\n{source}")
        if until is None or until(out) or time.monotonic() > deadline:
            return out
        page.wait_for_timeout(300)


def save_screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Save ``test-artifacts/<name>.png`` at the repo root (git-ignored) and return its path."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "screenshot"
    path = ARTIFACTS_DIR / f"{safe}.png"
    page.screenshot(path=str(path), full_page=full_page, timeout=30_000)
    return path


@dataclass
class PageLog:
    """What a page said: console messages (``"type: text"``), uncaught page errors, and blocked requests."""

    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions (blocked-request noise excluded)."""
        return [m for m in self.console if m.startswith("error:") and "ERR_FAILED" not in m] + self.page_errors

    def format(self) -> str:
        parts = [f"console ({len(self.console)}):", *self.console[-60:], f"page errors ({len(self.page_errors)}):"]
        parts += self.page_errors[-20:] + [f"blocked requests ({len(self.blocked)}):", *self.blocked[-20:]]
        return "\n".join(parts)


def collect_page_log(page: Page, log: PageLog | None = None) -> PageLog:
    """Record the page's console messages and uncaught errors into a PageLog (attach before navigating)."""
    log = log if log is not None else PageLog()
    page.on("console", lambda msg: log.console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: log.page_errors.append(str(exc)))
    return log


def block_external_requests(target: BrowserContext | Page, log: PageLog | None = None) -> None:
    """Abort every request whose host is not loopback (CDN fonts, news feeds...); record them in ``log``."""

    def handle(route: Route) -> None:
        url = route.request.url
        host = urllib.parse.urlsplit(url).hostname or ""
        if url.startswith(("http:", "https:")) and host not in LOOPBACK_HOSTS:
            if log is not None:
                log.blocked.append(url)
            route.abort()
        else:
            route.continue_()

    target.route("**/*", handle)
