"""The CheckpointDiff user journey in a real browser: JupyterLab in Chromium runs the comparing-checkpoints notebook
(which trains a small CNN, fine-tunes a copy and saves both), then the test reads the widget's table (most changed
first, status badges, 18 keys), sees the bar chart of relative change per layer, presses Compare again, filters to
the unchanged keys, searches for one key, selects it and sees its overlaid histograms beside the histogram of the
difference, and finally picks another file for side b in its file list and compares again.

Screenshots go to ``test-artifacts/`` (``diff.png`` is the whole widget with a row selected)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from browser_helpers import open_notebook, run_all_cells, run_new_cell, save_screenshot
from playwright.sync_api import Locator, Page, expect
from test_inspector import choose_in_file_list, screenshot_whole

LAB_NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NB = "04_comparing_checkpoints.ipynb"
RUN_ALL_TIMEOUT_S = 420.0  # the notebook trains and fine-tunes its CNN first: seconds on a laptop, more on 2 cores
ACTION_TIMEOUT_MS = 60_000  # a click reaches the kernel, which compares or renders a figure and sends it back
PAGE_LENGTH = 15
KEYS = 18
UNCHANGED = 8  # the frozen backbone's weights and biases
DATA_TABLE = ".ckptviz-diff-table table.ckptviz-paged-table"
TABLE_ROWS = ".ckptviz-diff-table table.ckptviz-paged-table tbody tr[data-id]"
PNG_SRC = re.compile(r"^data:image/png;base64,")


def kernel_print(page: Page, expr: str, label: str) -> str:
    """Print ``label <expr>`` from a new cell of the notebook and return the value's text."""
    out = run_new_cell(page, f"print({label!r}, {expr})", NB)
    match = re.search(rf"^{re.escape(label)} (.*)$", out, re.MULTILINE)
    assert match, f"no {label!r} line in the cell output: {out!r}"
    return match.group(1).strip()


def filter_button(widget: Locator, name: str) -> Locator:
    return widget.locator(".ckptviz-diff-filter button").filter(has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))


def test_diff_user_journey(jupyter_lab, page, page_log):
    started = time.monotonic()
    open_notebook(page, jupyter_lab, NB)
    run_all_cells(page, NB, timeout=RUN_ALL_TIMEOUT_S)
    for name in ("base.pt", "finetuned.pt"):
        assert (jupyter_lab.root / name).is_file(), f"the notebook did not write {name}"
    print(f"\n[diff journey] notebook opened and run in {time.monotonic() - started:.1f} s", flush=True)
    most_changed = kernel_print(page, "diff_widget.report.by_change()['key'].iloc[0]", "top_key")

    # 1. the notebook passed two paths: the widget compared at once
    widget = page.locator(".ckptviz-diff-widget").first
    expect(widget).to_be_visible()
    widget.scroll_into_view_if_needed()
    expect(widget.locator(DATA_TABLE)).to_be_visible()
    rows = widget.locator(TABLE_ROWS)
    expect(rows).to_have_count(PAGE_LENGTH, timeout=ACTION_TIMEOUT_MS)
    expect(widget.locator(".ckptviz-diff-table .ckptviz-paged-info")).to_contain_text(f"of {KEYS} rows")
    counts = widget.locator(".ckptviz-diff-counts")
    expect(counts).to_contain_text(f"both {KEYS}")
    expect(counts).to_contain_text(f"values changed in {KEYS - UNCHANGED} of {KEYS} compared tensors")
    first = rows.first.locator("td")
    expect(first.nth(0)).to_have_text(most_changed)  # sorted by change, most changed first
    expect(first.nth(1)).to_have_text(f"module.{most_changed}")  # b's key, paired through the module. rule
    expect(first.nth(2).locator(".ckptviz-status"), "the status cell shows no HTML badge").to_have_text("both")
    expect(widget.locator(".ckptviz-diff-search input"), "the table's search box").to_have_count(1)
    bars = widget.locator(".ckptviz-diff-bars img")
    expect(bars).to_have_attribute("src", PNG_SRC, timeout=ACTION_TIMEOUT_MS)
    assert bars.evaluate("(img) => img.decode().then(() => img.naturalWidth)") > 300
    save_screenshot(page, "diff-table", full_page=False)

    # 2. Compare again from the button
    message = widget.locator(".ckptviz-diff-message")
    widget.locator(".ckptviz-diff-compare").click()
    expect(message).to_contain_text(f"{KEYS} keys compared", timeout=ACTION_TIMEOUT_MS)
    expect(rows).to_have_count(PAGE_LENGTH, timeout=ACTION_TIMEOUT_MS)

    # 3. filter: the frozen backbone's weights did not change at all
    filter_button(widget, "unchanged").click()
    expect(rows).to_have_count(UNCHANGED, timeout=ACTION_TIMEOUT_MS)
    expect(rows.locator("td:nth-child(4)")).to_have_text(["0"] * UNCHANGED)  # rel_l2
    expect(rows.first.locator("td").first).to_have_text(re.compile(r"^features\."))
    filter_button(widget, "all").click()
    expect(rows).to_have_count(PAGE_LENGTH, timeout=ACTION_TIMEOUT_MS)

    # 4. search one key, select it: its histograms (a and b overlaid, and b - a) and its numbers appear
    widget.locator(".ckptviz-diff-search input").fill("classifier.1.weight")
    expect(rows).to_have_count(1, timeout=ACTION_TIMEOUT_MS)
    rows.first.locator("td").first.click()
    expect(rows.first).to_have_class(re.compile(r"\bselected\b"))
    overlay = widget.locator(".ckptviz-diff-histogram img")
    expect(overlay).to_have_attribute("src", PNG_SRC, timeout=ACTION_TIMEOUT_MS)
    row_panel = widget.locator(".ckptviz-diff-row")
    expect(row_panel).to_contain_text("classifier.1.weight ↔ module.classifier.1.weight")
    expect(row_panel).to_contain_text("(64, 512) float32")
    numbers = widget.locator(".ckptviz-diff-numbers")
    expect(numbers).to_contain_text("rel_l2")
    expect(numbers.locator("table.ckptviz-diff-stats th").filter(has_text="b − a")).to_have_count(1)
    assert overlay.evaluate("(img) => img.decode().then(() => img.naturalWidth)") > 500
    selected = kernel_print(page, "[diff_widget.report.frame.loc[i, 'key'] for i in diff_widget.table.selected]",
                            "selected")
    assert selected == "['classifier.1.weight']", selected
    shot = screenshot_whole(page, widget, "diff")
    assert shot.stat().st_size > 20_000
    save_screenshot(page, "diff-selected", full_page=False)

    # 5. side b: pick base.pt itself in b's file list and compare: nothing changed
    widget.locator(".ckptviz-diff-search input").fill("")
    choose_in_file_list(widget.locator(".ckptviz-diff-side-b"), "base.pt")
    expect(message).to_contain_text("press Compare", timeout=ACTION_TIMEOUT_MS)
    expect(widget.locator(".ckptviz-diff-side-b .ckptviz-diff-source")).to_contain_text("base.pt")
    widget.locator(".ckptviz-diff-compare").click()
    expect(counts).to_contain_text(f"values changed in 0 of {KEYS} compared tensors", timeout=ACTION_TIMEOUT_MS)
    expect(rows).to_have_count(PAGE_LENGTH, timeout=ACTION_TIMEOUT_MS)
    report = kernel_print(page, "diff_widget.report", "report")
    assert "values changed in 0" in report and "base.pt' [model] vs" in report, report

    assert not page_log.errors, page_log.format()
    print(f"\n[diff journey] done in {time.monotonic() - started:.1f} s", flush=True)
