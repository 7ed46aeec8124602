"""``rep.to_html(path)``: one self-contained page, checked by parsing the HTML that real reports write (counts and
rows against the report's own frame, figures as decodable PNGs, every key escaped, nothing fetched or run),
folded above the threshold, bounded in size. The page opened in Chromium: tests/browser/test_html_report_browser.py."""

from __future__ import annotations

import base64
import html.parser
import io
import re

import matplotlib.image
import pytest
import torch
from safetensors.torch import save_file

import ckptviz as cv
from ckptviz import html_report
from ckptviz.demo import DigitsCNN


class Page(html.parser.HTMLParser):
    """Every start tag with its attributes, and the text of table cells, row by row."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def named(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]


def assert_self_contained(text: str) -> None:
    page = Page(text)
    assert not page.named("script") and not page.named("link") and not page.named("iframe")
    for _, attrs in page.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (name, value)  # no inline handlers
            if name in ("src", "href"):
                assert value.startswith("data:"), value
    assert not re.search(r"https?://", text), re.search(r".{40}https?://.{40}", text)
    csp = [a for a in page.named("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "digits.pt"
    torch.manual_seed(0)
    torch.save({"epoch": 3, "model_state_dict": DigitsCNN(10).state_dict()}, path)
    return path


def test_compare_report_holds_the_counts_rows_rules_and_figures(digits_ckpt, tmp_path):
    rep = cv.compare(DigitsCNN(5), digits_ckpt)
    out = rep.to_html(tmp_path / "report.html", model=DigitsCNN(5))
    assert out == tmp_path / "report.html"
    text = out.read_text()
    assert_self_contained(text)
    page = Page(text)
    counts = {a["data-status"]: a for a in page.named("li") if "data-status" in a}
    assert set(counts) == set(rep.summary)
    assert re.search(r"data-status='match'>match<b>16</b>", text)
    assert re.search(r"data-status='shape_mismatch'>shape_mismatch<b>2</b>", text)
    assert "ckptviz.demo.DigitsCNN" in text and str(digits_ckpt) in text and "epoch=3" in text
    header, *rows = page.rows
    assert header[:2] == ["key", "ckpt_key"] and len(rows) == len(rep.frame) == 18
    key_col, status_col = header.index("key"), header.index("status")
    assert [r[key_col] for r in rows[:2]] == ["head.weight", "head.bias"]  # problems first
    assert [r[status_col] for r in rows[:2]] == ["shape_mismatch"] * 2
    by_key = {r[key_col]: r for r in rows}
    assert by_key["head.weight"][header.index("ckpt_shape")] == "(10, 64)"
    assert by_key["head.weight"][header.index("model_shape")] == "(5, 64)"
    assert {r[key_col] for r in rows} == set(rep.frame["key"])
    images = page.named("img")
    assert len(images) == 1
    png = base64.b64decode(images[0]["src"].split(",", 1)[1])
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert not Page(rep.to_html(tmp_path / "bare.html", plots=False, title="Nightly").read_text()).named("img")
    assert "<h1>Nightly</h1>" in (tmp_path / "bare.html").read_text()


def test_keys_and_paths_are_escaped(tmp_path):
    evil = "x<script>alert(1)</script>.weight"
    path = tmp_path / "<i>odd & name.safetensors"
    save_file({evil: torch.ones(2, 2), "fc.weight": torch.ones(3, 2)}, path)
    rep = cv.compare(torch.nn.Sequential(), path)
    text = rep.to_html(tmp_path / "evil.html").read_text()
    assert_self_contained(text)
    assert "x&lt;script&gt;alert(1)&lt;/script&gt;.weight" in text and "&lt;i&gt;odd &amp; name" in text
    assert "<i>odd" not in text
    assert evil in sum(Page(text).rows, [])  # the cell reads as the key itself


def test_diff_report_most_changed_first_and_nan_flagged(digits_ckpt, tmp_path):
    sd = torch.load(digits_ckpt, weights_only=True)["model_state_dict"]
    moved = {k: v.clone() for k, v in sd.items()}
    moved["head.bias"] += 1.0
    moved["classifier.1.weight"][0, 0] = float("nan")
    moved["extra.weight"] = torch.zeros(2)
    save_file(moved, tmp_path / "moved.safetensors")
    rep = cv.diff(digits_ckpt, tmp_path / "moved.safetensors", progress=False)
    text = rep.to_html(tmp_path / "diff.html").read_text()
    assert_self_contained(text)
    page = Page(text)
    header, *rows = page.rows
    keys = [r[header.index("key")] if r[header.index("key")] != "—" else r[header.index("key_b")] for r in rows]
    assert len(rows) == len(rep.frame)
    assert set(keys[:2]) == {"extra.weight", "classifier.1.weight"}  # only on one side; a NaN appeared
    assert keys[2] == "head.bias"  # then the most changed
    assert "values changed in 2 of 18 compared tensors" in text
    assert len(page.named("img")) == 2


def test_a_big_report_is_folded_by_layer_and_bounded(tmp_path, monkeypatch):
    n = 3000
    a = {f"layers.{i}.attn.weight": torch.zeros(2) for i in range(n)}
    a |= {f"layers.{i}.mlp.weight": torch.zeros(3) for i in range(n)}
    b = dict(a)
    b["layers.7.mlp.weight"] = torch.ones(3)
    b.pop("layers.11.attn.weight")
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    rep = cv.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)
    text = rep.to_html(tmp_path / "big.html", plots=False).read_text()
    assert_self_contained(text)
    page = Page(text)
    groups = page.named("details")
    assert len(groups) == 2 and groups[0]["class"] == "group problem"  # the patterns with problems first
    assert "layers.{0-2999}.attn.weight" in text and "6,000 rows folded into 2 layer patterns" in text
    assert len(page.rows) <= 2 * (html_report.GROUP_ROWS + 1)  # header + GROUP_ROWS rows per pattern
    first_group = text.split("<details", 2)[1]
    assert "layers.11.attn.weight" in first_group and "only_a 1" in first_group
    assert len(text) < 200_000

    monkeypatch.setattr(html_report, "GROUP_LIMIT", 1)
    monkeypatch.setattr(html_report, "ROW_LIMIT", 10)
    small = rep.to_html(tmp_path / "small.html", plots=False).read_text()
    assert len(Page(small).named("details")) == 1
    assert "Written: 1 of 2 patterns and 10 of 6,000 rows; left out: 1 patterns and 5,990 rows" in small


def test_unknown_objects_are_refused_with_what_is_accepted(tmp_path):
    with pytest.raises(TypeError, match="DiffReport, Report"):
        html_report.write_report(object(), tmp_path / "x.html")
