"""The static HTML report and the shared-word highlighter it uses."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import click
import pyarrow as pa
import pytest

from trackstar_db.evaluation import highlight
from trackstar_db.evaluation.report import build_samples, write_report

pytest.importorskip("matplotlib")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

SUMMARY = pa.table({
    "method": ["bm25", "trackstar", "trackstar"], "run_id": ["b", "t-d64", "t-d256"],
    "n_queries": [40, 40, 40], "mrr": [0.61234, 0.3012, 0.35],
    "recall_at_10": [0.875, 0.55, 0.6], "tailpatch_at_1": [0.5, 1.25, 1.5],
    "tailpatch_at_3": [0.4, 1.0, 1.1], "tailpatch_at_5": [0.3, 0.9, None], "tailpatch_at_10": [0.2, 0.7, 0.8]})
BY_BUCKET = pa.table({
    "method": ["bm25"] * 3 + ["trackstar"] * 3, "run_id": ["b"] * 3 + ["t-d64"] * 3,
    "frequency_bucket": [0, 1, 2] * 2, "n_queries": [10, 20, 10] * 2,
    "mrr": [0.1, 0.5, 0.9, 0.05, 0.3, 0.4], "recall_at_10": [0.2, 0.6, 1.0, 0.1, 0.5, 0.7],
    "tailpatch_at_10": [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]})


def _samples() -> list[dict]:
    queries = pa.table({"query_id": ["q1", "q2"], "fact_id": ["f1", "f2"],
                        "prompt": ["The capital of France is", "Mount <Everest> lies in"],
                        "target": [" Paris", " Nepal"], "template": ["prompt0"] * 2})
    examples = pa.table({"example_id": [f"e{i}" for i in range(4)], "text": [
        "Paris is the capital and largest city of France.", "Nepal & China share <Everest>.",
        "Berlin is a city.", "The river flows north."]})
    retrievals = pa.table({
        "run_id": ["b"] * 4 + ["t-d64"] * 4, "method": ["bm25"] * 4 + ["trackstar"] * 4,
        "query_id": ["q1", "q1", "q2", "q2"] * 2, "kind": ["proponent"] * 8,
        "rank": pa.array([1, 2] * 4, pa.int32()), "example_id": ["e0", "e2", "e1", "e3", "e2", "e0", "e3", "e1"],
        "score": pa.array([9.0, 1.0, 8.0, 0.5, 0.9, 0.8, 0.7, 0.6], pa.float32())})
    ground_truth = pa.table({"fact_id": ["f1", "f2"], "example_id": ["e0", "e1"]})
    return build_samples(retrievals, queries, examples, ground_truth, ["b", "t-d64"], n=5, k=2)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.cells, self.marks, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag

    def handle_data(self, data):
        if self._in in ("td", "th"):
            self.cells.append(data)
        elif self._in == "mark":
            self.marks.append(data)

    def handle_endtag(self, tag):
        self._in = None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(tmp_path_factory.mktemp("report"), SUMMARY, _samples(), by_bucket=BY_BUCKET)


def test_highlight_spans_and_renderers():
    refs = ["The capital of FRANCE is", " Paris"]
    text = "paris, the Capital of France & <the> city"
    assert highlight.shared_words(text, refs) == {"paris", "capital", "france"}
    spans = highlight.spans(text, refs)
    assert [text[a:b] for a, b in spans] == ["paris", "Capital", "France"]
    html_text = highlight.to_html(text, refs)
    assert html_text.count("<mark>") == 3 and "&lt;the&gt;" in html_text and "&amp;" in html_text
    assert re.sub(r"</?mark>", "", html_text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == text
    styled = highlight.to_terminal(text, refs)
    assert styled != text and click.unstyle(styled) == text
    assert highlight.spans("of the a x", ["of the a x"]) == []  # stopwords and 1-letter words never count


def test_build_samples():
    samples = _samples()
    assert [s["query_id"] for s in sorted(samples, key=lambda s: s["query_id"])] == ["q1", "q2"]
    q1 = next(s for s in samples if s["query_id"] == "q1")
    assert [c["method"] for c in q1["columns"]] == ["bm25", "trackstar"]
    assert [p["example_id"] for p in q1["columns"][1]["proponents"]] == ["e2", "e0"]
    assert [p["correct"] for p in q1["columns"][0]["proponents"]] == [True, False]


def test_report_html(report):
    page = report.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)
    parser.close()
    cells = set(c.strip() for c in parser.cells)
    assert {"method", "mrr", "recall_at_10", "tailpatch_at_10", "frequency_bucket"} <= cells
    assert {"0.6123", "0.875", "0.3012", "t-d256", "40", "0.9"} <= cells
    assert page.count("<svg") == 2  # summary bars, bucket lines
    assert "MRR" in page and "recall@10" in page and "tail-patch" in page
    assert {"Paris", "capital", "France", "Nepal", "Everest"} <= set(parser.marks)
    assert "&lt;Everest&gt;" in page and "<Everest>" not in page
    # self-contained: no scripts, no external resources
    assert not [t for t, a in parser.tags if t in ("script", "link", "img", "iframe")]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_renders_in_headless_chromium(report, tmp_path):
    png = tmp_path / "shot.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(flags + [f"--screenshot={png}", "--window-size=1200,2000", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(png).convert("L")
    low, high = image.getextrema()
    assert image.size == (1200, 2000) and high - low > 100  # not blank
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
    dom = subprocess.run(flags + ["--dump-dom", report.as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert "<table>" in dom and "0.6123" in dom and "<svg" in dom
