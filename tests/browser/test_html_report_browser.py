"""The HTML report as a colleague opens it: a file:// page in headless Chromium with every other request refused.
It must render its counts, figures and table from the file alone, fold a big report into patterns that open on
a click, and trip no Content-Security-Policy or console error."""

from __future__ import annotations

import torch
from browser_helpers import save_screenshot
from playwright.sync_api import expect
from safetensors.torch import save_file

import ckptviz as cv
from ckptviz.demo import DigitsCNN


def open_offline(browser, path):
    """A page that may load ``path`` and nothing else; returns (page, requests seen, console messages)."""
    context = browser.new_context(viewport={"width": 1300, "height": 900}, offline=True)
    url = path.resolve().as_uri()
    requests, console = [], []

    def route(r):
        (r.continue_ if r.request.url == url else r.abort)()

    context.route("**/*", route)
    page = context.new_page()
    page.on("request", lambda req: requests.append(req.url))
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    page.goto(url)
    return page, requests, console


def test_compare_report_renders_offline(browser, tmp_path):
    torch.manual_seed(0)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in DigitsCNN(10).state_dict().items()}},
               tmp_path / "run.pt")
    path = cv.compare(DigitsCNN(5), tmp_path / "run.pt").to_html(tmp_path / "report.html")
    page, requests, console = open_offline(browser, path)
    try:
        expect(page.locator("h1")).to_contain_text("run.pt")
        expect(page.locator("li[data-status='match']")).to_contain_text("16")
        expect(page.locator("#rules")).to_contain_text("module")
        rows = page.locator("table.rows tbody tr")
        expect(rows).to_have_count(18)
        expect(rows.first).to_contain_text("shape_mismatch")
        image = page.locator("figure img")
        expect(image).to_have_count(1)
        assert image.evaluate("img => img.complete && img.naturalWidth") > 100  # the inline PNG decoded
        colour = rows.first.evaluate("tr => getComputedStyle(tr).backgroundColor")
        assert colour not in ("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)"), colour  # inline CSS applied
        save_screenshot(page, "html-report-compare")
        assert requests == [path.resolve().as_uri()], requests
        assert not console, console
    finally:
        page.context.close()


def test_big_diff_report_folds_and_opens_on_click(browser, tmp_path):
    a = {f"blocks.{i}.{name}": torch.full((4,), float(i)) for i in range(1500) for name in ("w", "b")}
    b = dict(a)
    b["blocks.42.w"] = a["blocks.42.w"] + 1
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    path = cv.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False).to_html(
        tmp_path / "diff.html")
    page, requests, console = open_offline(browser, path)
    try:
        groups = page.locator("details.group")
        expect(groups).to_have_count(2)
        first = groups.first
        expect(first.locator("summary")).to_contain_text("blocks.{0-1499}.w")
        expect(first.locator("table.rows")).not_to_be_visible()  # folded until clicked
        first.locator("summary").click()
        expect(first.locator("table.rows tbody tr").first).to_contain_text("blocks.42.w")  # the changed one first
        expect(page.locator("figure img")).to_have_count(2)
        save_screenshot(page, "html-report-diff-folded")
        assert requests == [path.resolve().as_uri()], requests
        assert not console, console
    finally:
        page.context.close()


def test_series_report_renders_offline(browser, tmp_path):
    from series_runs import save_run

    save_run(tmp_path, 4, blow_up_from=3, nan_at=4, samples=64, steps_per_epoch=1)
    path = cv.diff_series(tmp_path).to_html(tmp_path / "run.html")
    page, requests, console = open_offline(browser, path)
    try:
        expect(page.locator("h1")).to_contain_text("ckptviz series")
        expect(page.locator("li[data-status='frozen']")).to_contain_text("2")
        expect(page.locator("li[data-status='nonfinite']")).to_contain_text("1")
        expect(page.locator("#rules")).to_have_count(0)  # a series aligns no keys of its own
        rows = page.locator("table.rows tbody tr")
        expect(rows).to_have_count(4)  # 2 frozen, the head exploding, the NaN
        expect(page.locator("table.rows")).to_contain_text("epoch=4.ckpt")
        images = page.locator("figure img")
        expect(images).to_have_count(2)  # heatmap and norms
        assert min(images.evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth)")) > 100
        save_screenshot(page, "html-report-series")
        assert requests == [path.resolve().as_uri()], requests
        assert not console, console
    finally:
        page.context.close()
