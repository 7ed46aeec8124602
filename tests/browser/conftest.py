"""Fixtures for real-browser tests of notebook widgets: one headless Chromium per run (``browser``), throwaway
JupyterLab servers over temp copies of notebook folders (``lab_factory``, ``jupyter_lab``), and a fresh
loopback-only page per test (``page``, ``page_log``). On failure the report gets a screenshot path, the page's
console and the server log tail. Notebook driving helpers live in ``browser_helpers``."""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # sibling modules importable under --import-mode=importlib too
    sys.path.insert(0, str(Path(__file__).parent))

from browser_helpers import PageLog, block_external_requests, collect_page_log, save_screenshot  # noqa: E402
from lab_server import JupyterLab  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}
DEFAULT_TIMEOUT_MS = 30_000  # page actions (click, goto, locator waits)
EXPECT_TIMEOUT_MS = 20_000  # `expect(...)` assertions; Playwright's 5 s default is too tight on 2 busy cores

_PAGE_LOG = pytest.StashKey[PageLog]()
_RUNNING_LABS: list[JupyterLab] = []


@pytest.fixture(scope="session")
def browser() -> Iterator:
    """The one Playwright Chromium of this process (only one ``sync_playwright()`` may be alive at a time)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: browser tests need Debian's chromium (`apt-get install -y chromium`). "
            "Do not run `playwright install` (no network).",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def lab_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., JupyterLab]]:
    """``lab_factory(src_dir, fresh=False) -> JupyterLab``: a server over a temp copy of ``src_dir``.

    Servers are shared per source folder for the whole session unless ``fresh=True``; all stop at the end."""
    shared: dict[Path, JupyterLab] = {}
    started: list[JupyterLab] = []

    def factory(src_dir: str | Path, fresh: bool = False) -> JupyterLab:
        src = Path(src_dir).resolve()
        if not src.is_dir():
            raise FileNotFoundError(f"lab_factory: notebook folder {src} does not exist")
        if not fresh and src in shared:
            return shared[src]
        lab = JupyterLab(src, tmp_path_factory.mktemp(f"lab-{src.name}"))
        atexit.register(lab.stop)  # also on an interrupted run; stop() is idempotent
        lab.start()
        started.append(lab)
        _RUNNING_LABS.append(lab)
        if not fresh:
            shared[src] = lab
        return lab

    yield factory
    for lab in started:
        lab.stop()
        _RUNNING_LABS.remove(lab)


@pytest.fixture(scope="module")
def jupyter_lab(request: pytest.FixtureRequest, lab_factory: Callable[..., JupyterLab]) -> JupyterLab:
    """The server for this test module's ``LAB_NOTEBOOKS_DIR`` (a module-level Path)."""
    src = getattr(request.module, "LAB_NOTEBOOKS_DIR", None)
    if src is None:
        pytest.fail(
            f"{request.module.__name__} uses `jupyter_lab` but defines no LAB_NOTEBOOKS_DIR; "
            "set it to the notebook folder to serve, or call `lab_factory(folder)`.",
            pytrace=False,
        )
    return lab_factory(src)


@pytest.fixture
def page(browser, request: pytest.FixtureRequest) -> Iterator:
    """A fresh browser context and page: non-loopback requests aborted, console recorded (see ``page_log``)."""
    log = PageLog()
    request.node.stash[_PAGE_LOG] = log
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    block_external_requests(context, log)
    pg = context.new_page()
    collect_page_log(pg, log)
    yield pg
    context.close()


@pytest.fixture
def page_log(page, request: pytest.FixtureRequest) -> PageLog:
    """The console messages, page errors and blocked requests of this test's ``page``."""
    return request.node.stash[_PAGE_LOG]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and report.when in ("setup", "call"):
        _add_failure_context(item, report)
    return report


def _add_failure_context(item: pytest.Item, report: pytest.TestReport) -> None:
    funcargs = getattr(item, "funcargs", {})
    pg = funcargs.get("page")
    if pg is not None and not pg.is_closed():
        try:
            shot = save_screenshot(pg, f"FAILED-{item.nodeid.split('::', 1)[-1]}")
            report.sections.append(("browser screenshot", str(shot)))
        except Exception as exc:  # a failure report must not fail
            report.sections.append(("browser screenshot", f"could not take one: {exc}"))
    log = item.stash.get(_PAGE_LOG, None)
    if log is not None:
        report.sections.append(("browser page log", log.format()))
    labs = [v for v in funcargs.values() if isinstance(v, JupyterLab)] or list(_RUNNING_LABS)
    for lab in labs:
        report.sections.append((f"jupyter server log tail ({lab.log_path})", lab.log_tail()))
