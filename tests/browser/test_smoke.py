"""Smoke test of the browser-test chain: JupyterLab in Chromium renders an ipywidgets Button and an itables
ITable, clicks on both reach the kernel, and a new cell run from the browser reports the kernel's state."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from browser_helpers import open_notebook, run_all_cells, run_new_cell, save_screenshot
from playwright.sync_api import expect

LAB_NOTEBOOKS_DIR = Path(__file__).parent / "smoke_notebooks"
SELECTED_ROW = 2  # the "fc" row


def test_button_and_table_clicks_reach_the_kernel(jupyter_lab, page, page_log):
    t0 = time.monotonic()
    open_notebook(page, jupyter_lab, "smoke.ipynb")
    run_all_cells(page, "smoke.ipynb")

    button = page.locator(".ckptviz-smoke-button")
    expect(button).to_be_visible()
    expect(button).to_have_text("Click me")
    button.click()

    rows = page.locator("table.dataTable tbody tr")
    expect(rows).to_have_count(4)
    row = rows.nth(SELECTED_ROW)
    expect(row).to_contain_text("fc")
    row.locator("td").first.click()
    expect(row).to_have_class(re.compile(r"\bselected\b"))

    expected = f"clicks=1 selected=[{SELECTED_ROW}]"
    out = run_new_cell(
        page, 'print(f"clicks={clicks} selected={selected}")', "smoke.ipynb", until=lambda s: s.strip() == expected
    )
    assert out.strip() == expected

    # The kernel is this interpreter (the fixture's kernelspec), so the widget code under test is importable.
    assert run_new_cell(page, "import sys; print(sys.executable)", "smoke.ipynb").strip() == sys.executable

    shot = save_screenshot(page, "smoke-notebook")
    assert shot.stat().st_size > 0
    assert not page_log.errors, page_log.format()
    assert time.monotonic() - t0 < 120
