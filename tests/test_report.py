"""The static HTML report and query explorer: content, self-containment, and how it renders in
headless Chromium at 1280 px (skipped cleanly without /usr/bin/chromium)."""

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
from trackstar_db.report.explorer import add_tokens, build_pages, choose_queries, marked_html, shaded_html
from trackstar_db.report.summary import write_report

pytest.importorskip("matplotlib")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="needs /usr/bin/chromium (apt-get install -y chromium)")
WIDTH = 1280

SUMMARY = pa.table({
    "method": ["bm25", "trackstar", "trackstar"], "run_id": ["b", "t-d64", "t-d256"],
    "n_queries": [40, 40, 40], "mrr": [0.61234, 0.3012, 0.35],
    "recall_at_10": [0.875, 0.55, 0.6], "n_tailpatch_queries": [40, 40, 40], "tailpatch_at_1": [0.5, 1.25, 1.5],
    "tailpatch_at_3": [0.4, 1.0, 1.1], "tailpatch_at_5": [0.3, 0.9, None], "tailpatch_at_10": [0.2, 0.7, 0.8]})
BY_BUCKET = pa.table({
    "method": ["bm25"] * 3 + ["trackstar"] * 3, "run_id": ["b"] * 3 + ["t-d64"] * 3,
    "frequency_bucket": [0, 1, 2] * 2, "n_queries": [10, 20, 10] * 2,
    "mrr": [0.1, 0.5, 0.9, 0.05, 0.3, 0.4], "recall_at_10": [0.2, 0.6, 1.0, 0.1, 0.5, 0.7],
    "tailpatch_at_1": [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]})
BY_CORRECT = pa.table({
    "method": ["bm25"] * 2 + ["trackstar"] * 2, "run_id": ["b"] * 2 + ["t-d64"] * 2,
    "model_correct": [False, True] * 2, "mrr": [0.4, 0.7, 0.2, 0.35], "tailpatch_at_1": [0.2, 0.6, 0.9, 1.4]})


def _tables() -> dict:
    queries = pa.table({"query_id": ["q1", "q2", "q3"], "fact_id": ["f1", "f2", "f3"],
                        "prompt": ["The capital of France is", "Mount <Everest> lies in", "Unretrieved"],
                        "target": [" Paris", " Nepal", "x"], "template": ["prompt0"] * 3})
    examples = pa.table({"example_id": [f"e{i}" for i in range(4)], "text": [
        "Paris is the capital and largest city of France.", "Nepal & China share <Everest>.",
        "Berlin is a city.", "The river flows north."]})
    retrievals = pa.table({
        "run_id": ["b"] * 4 + ["t-d64"] * 6, "method": ["bm25"] * 4 + ["trackstar"] * 6,
        "query_id": ["q1", "q1", "q2", "q2"] * 2 + ["q1", "q2"],
        "kind": ["proponent"] * 8 + ["opponent"] * 2,
        "rank": pa.array([1, 2] * 4 + [1, 1], pa.int32()),
        "example_id": ["e0", "e2", "e1", "e3", "e2", "e0", "e3", "e1", "e3", "e2"],
        "score": pa.array([9.0, 1.0, 8.0, 0.5, 0.9, 0.8, 0.7, 0.6, -0.5, -0.4], pa.float32())})
    return {"retrievals": retrievals, "queries": queries, "examples": examples,
            "ground_truth": pa.table({"fact_id": ["f1", "f2"], "example_id": ["e0", "e1"]}),
            "tail_patch": pa.table({"run_id": ["t-d64"], "query_id": ["q1"], "rank": pa.array([2], pa.int32()),
                                    "example_id": ["e0"], "p_before": [0.10], "p_after": [0.125]}),
            "predictions": pa.table({"query_id": ["q1", "q2"], "correct": [True, False], "p_target": [0.6, 0.01]}),
            "facts": pa.table({"fact_id": ["f1", "f2"], "frequency_bucket": [3, 0], "relation": ["capital", "located in"]})}


def _pages() -> list[dict]:
    tables = _tables()
    ids = choose_queries(tables["retrievals"], ["b", "t-d64"], n=5)
    return build_pages(tables, ["b", "t-d64"], ids, k=2)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.cells, self.marks, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = (tag, dict(attrs).get("class", ""))

    def handle_data(self, data):
        if self._in and self._in[0] in ("td", "th"):
            self.cells.append((data, self._in[1]))
        elif self._in and self._in[0] == "mark":
            self.marks.append(data)

    def handle_endtag(self, tag):
        self._in = None


def _parse(path: Path) -> tuple[str, _Collect]:
    page = path.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)
    parser.close()
    return page, parser


def _self_contained(page: str, parser: _Collect) -> None:
    assert not [t for t, a in parser.tags if t in ("script", "link", "img", "iframe")]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    pages = _pages()
    # fake token parts for the first trackstar proponent of q1 ("Berlin is a city."): Berlin +, city -
    add_tokens(pages, lambda p, t, e, m, text: pa.table({
        "start": [None, 0, 7, 12], "end": [None, 6, 9, 16], "contribution": [0.01, 0.5, 0.04, -0.2]}),
        ["trackstar"], top=1)
    return write_report(tmp_path_factory.mktemp("report"), SUMMARY, by_bucket=BY_BUCKET, by_correct=BY_CORRECT,
                        pages=pages)


def test_highlight_spans_and_renderers():
    refs = ["The capital of FRANCE is", " Paris"]
    text = "paris, the Capital of France & <the> city"
    assert highlight.shared_words(text, refs) == {"paris", "capital", "france"}
    spans = highlight.spans(text, refs)
    assert [text[a:b] for a, b in spans] == ["paris", "Capital", "France"]
    html_text = marked_html(text, refs)
    assert html_text.count("<mark>") == 3 and "&lt;the&gt;" in html_text and "&amp;" in html_text
    assert re.sub(r"</?mark>", "", html_text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == text
    styled = highlight.to_terminal(text, refs)
    assert styled != text and click.unstyle(styled) == text
    assert highlight.spans("of the a x", ["of the a x"]) == []  # stopwords and 1-letter words never count


def test_build_pages():
    pages = _pages()
    assert [p["query_id"] for p in pages] == ["q1", "q2"]  # q3 was retrieved by no run
    q1, q2 = pages
    assert (q1["correct"], q1["p_target"], q1["bucket"], q1["relation"]) == (True, 0.6, 3, "capital")
    assert [c["method"] for c in q1["columns"]] == ["bm25", "trackstar"]
    bm25, trackstar = q1["columns"]
    assert [h["example_id"] for h in trackstar["proponent"]] == ["e2", "e0"]
    assert [h["correct"] for h in bm25["proponent"]] == [True, False]
    assert [h["delta_pp"] for h in trackstar["proponent"]] == [None, pytest.approx(2.5)]
    assert [h["example_id"] for h in trackstar["opponent"]] == ["e3"] and bm25["opponent"] == []
    assert q2["correct"] is False and q2["columns"][1]["opponent"][0]["example_id"] == "e2"


def test_shaded_html_keeps_the_text_and_sums():
    text = "Paris & <b>"
    out = shaded_html(text, [(None, None, 0.25), (0, 5, 1.0), (8, 11, -0.5)], ["Paris"])
    visible = re.sub(r"<[^>]+>", "", out.split("<div class=meta>")[0])
    assert visible.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == text
    assert 'title="+1"' in out and 'title="-0.5"' in out and 'class="sh"' in out
    assert "sum to 0.75" in out and "special tokens +0.25" in out


def test_summary_page(report):
    page, parser = _parse(report)
    cells = {c.strip(): cls for c, cls in parser.cells}
    assert {"method", "MRR", "recall@10", "tail-patch@1 (pp)", "tail-patch@10 (pp)"} <= set(cells)
    assert {"bm25 (b)", "trackstar (t-d64)", "trackstar (t-d256)"} <= set(cells)  # methods as rows
    assert "0.612" in cells and "0.61234" not in page  # rounded
    best = {c for c, cls in parser.cells if "best" in cls}
    assert {"0.612", "0.875", "1.50", "1.10", "0.90", "0.80"} <= best and "0.301" not in best
    assert page.count("<svg") == 3  # summary bars, bucket lines, correctness lines
    assert "By fact frequency bucket" in page and "By model correctness" in page and "wrong" in cells
    assert 'href="queries/index.html"' in page
    _self_contained(page, parser)


def test_query_pages(report):
    folder = report.parent / "queries"
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "q-0001.html", "q-0002.html"]
    picker, parser = _parse(folder / "index.html")
    assert 'href="q-0001.html"' in picker and "Mount &lt;Everest&gt; lies in" in picker
    page, parser = _parse(folder / "q-0001.html")
    _self_contained(page, parser)
    assert "The capital of France is" in page and "✓ answers correctly" in page and "frequency bucket 3" in page
    assert "tail-patch +2.50 pp" in page and "✓ fact" in page
    assert "<details><summary>opponents (1)</summary>" in page
    assert {"Paris", "capital", "France"} <= set(parser.marks)  # bm25 column: shared words marked
    assert 'title="+0.5"' in page and "token parts sum to 0.35" in page  # trackstar's shaded proponent
    assert 'href="q-0002.html"' in page and 'href="../index.html"' in page
    q2, _ = _parse(folder / "q-0002.html")
    assert "&lt;Everest&gt;" in q2 and "<Everest>" not in q2 and "✗ answers wrongly" in q2


def _chromium(*args: str, profile: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run(flags + list(args), check=True, capture_output=True, text=True, timeout=timeout)


def layout_width(page: Path, work: Path, width: int = WIDTH) -> tuple[int, int]:
    """(scrollWidth of the document, innerWidth) of `page` laid out in a `width`-px window:
    a copy of the page with a one-line script that writes both into the DOM, read by --dump-dom."""
    probe = page.with_name(f"_probe_{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace(
        "</body>", "<script>document.body.setAttribute('data-probe', document.documentElement.scrollWidth + ',' "
                   "+ window.innerWidth)</script></body>"), encoding="utf-8")
    try:
        dom = _chromium(f"--window-size={width},900", "--dump-dom", probe.as_uri(), profile=work / "profile").stdout
    finally:
        probe.unlink()
    scroll, inner = re.search(r'data-probe="(\d+),(\d+)"', dom).groups()
    return int(scroll), int(inner)


def screenshot(page: Path, png: Path, work: Path, width: int = WIDTH, height: int = 1600) -> Path:
    _chromium(f"--screenshot={png}", f"--window-size={width},{height}", page.as_uri(), profile=work / "profile")
    return png


def _not_blank(png: Path, width: int) -> None:
    from PIL import Image

    image = Image.open(png).convert("L")
    low, high = image.getextrema()
    assert image.size[0] == width and high - low > 100
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


@needs_chromium
def test_renders_at_1280_without_overflow(report, tmp_path):
    for page in (report, report.parent / "queries" / "q-0001.html", report.parent / "queries" / "index.html"):
        scroll, inner = layout_width(page, tmp_path)
        assert inner == WIDTH and scroll <= WIDTH, (page.name, scroll)
    _not_blank(screenshot(report, tmp_path / "summary.png", tmp_path), WIDTH)
    _not_blank(screenshot(report.parent / "queries" / "q-0001.html", tmp_path / "query.png", tmp_path), WIDTH)


@needs_chromium
def test_overflow_check_can_fail(tmp_path):
    wide = tmp_path / "wide.html"
    wide.write_text('<!DOCTYPE html><html><body><table><tr><td style="min-width:2000px">x</td></tr></table></body></html>')
    scroll, inner = layout_width(wide, tmp_path)
    assert inner == WIDTH and scroll > WIDTH


@pytest.fixture(scope="module")
def db_report(tiny_db_template, tmp_path_factory) -> Path:
    """`trackstar-db report` as a user runs it, on the tiny database with three runs, a tail-patch
    sample and the model's predictions."""
    from click.testing import CliRunner

    from trackstar_db import connect
    from trackstar_db.cli import main
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.testbed.model import score_predictions

    root = tmp_path_factory.mktemp("db_report")
    shutil.copytree(tiny_db_template / "model", root / "model")
    shutil.copytree(tiny_db_template / "db", root / "db")
    db = connect(root / "db")
    db.set_model(root / "model")
    for split in ("train", "queries"):
        ingest_gradients(db, FeaturizerConfig(dim=1024, correction="adam-factored"),
                         GradientJob(split, batch_size=16, device="cpu"), progress=False)
    fit(db)
    score_predictions(db)

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    for method in ("trackstar", "grad-dot", "bm25"):
        run("retrieve", db.path, "--method", method, "--k", 10, "--device", "cpu")
    run("tail-patch", db.path, "--run", "trackstar", "--k", 3, "--queries", 6, "--device", "cpu")
    out = run("report", db.path, "--out", root / "report", "--samples", 6)
    assert "index.html" in out
    return root / "report" / "index.html"


@pytest.mark.slow
def test_database_report_end_to_end(db_report):
    page, parser = _parse(db_report)
    _self_contained(page, parser)
    cells = {c.strip() for c, _ in parser.cells}
    # summary, by bucket, by correctness, then the self-influence distribution and the ledger by source
    assert {"trackstar", "grad-dot", "bm25"} <= cells and page.count("<svg") == 5
    assert 'id="self-influence"' in page and 'id="ledger"' in page
    folder = db_report.parent / "queries"
    pages = sorted(folder.glob("q-*.html"))
    assert len(pages) == 6
    shaded = 0
    for path in pages:
        text, parser = _parse(path)
        _self_contained(text, parser)
        assert text.count('<section class="run">') == 3 and "answers" in text
        # every shaded proponent: its token parts sum to its stored score
        for total, score in re.findall(r"token parts sum to (\S+?)(?: \(special tokens \S+\))?</div>"
                                       r"<div class=\"meta\">score (\S+?) ", text):
            assert abs(float(total) - float(score)) <= 2e-3 * max(1.0, abs(float(score))), (path.name, total, score)
            shaded += 1
    assert shaded >= 6 * 2 * 2  # top proponents of both gradient runs on every page
    assert any("tail-patch" in p.read_text() for p in pages)


@pytest.mark.slow
@needs_chromium
def test_database_report_fits_1280(db_report, tmp_path):
    for page in (db_report, db_report.parent / "queries" / "q-0001.html"):
        scroll, inner = layout_width(page, tmp_path)
        assert inner == WIDTH and scroll <= WIDTH, (page.name, scroll)


TRAJECTORY = pa.table({"step": list(range(6)), "actual": [5.0, 4.6, 4.1, 3.9, 3.5, 3.4],
                       "linear": [5.0, 4.5, 4.2, 3.8, 3.6, 3.3], "additive": [5.0, 4.8, 4.5, 4.3, 4.0, 3.9],
                       "constant": [5.0] * 6}).replace_schema_metadata(
    {"run_id": "sim-011", "query_id": "F00003:prompt0", "train_runs": "9"})


@needs_chromium
def test_simfluence_trajectory_section_renders_at_1280(tmp_path):
    """The plot of a probe's recorded vs simulated loss, the MSE of each simulator (lowest marked)."""
    page = write_report(tmp_path / "report", SUMMARY, trajectory=TRAJECTORY)
    text, parser = _parse(page)
    _self_contained(text, parser)
    assert 'id="simfluence"' in text and "F00003:prompt0" in text and "sim-011" in text
    assert text.count("<svg") == 2 and "Simfluence-Linear" in text and "TracIn as simulator" in text
    cells = [c.strip() for c, _ in parser.cells]
    assert cells[cells.index("Simfluence-Linear") + 1] == "0.010"  # mean of (pred - actual)^2 over steps 1..5; 3 places: the column holds 1.398
    assert '<td class="num best">0.010</td>' in text  # the lowest MSE is the best
    scroll, inner = layout_width(page, tmp_path)
    assert inner == WIDTH and scroll <= WIDTH
    _not_blank(screenshot(page, tmp_path / "simfluence.png", tmp_path), WIDTH)
    plain = write_report(tmp_path / "plain", SUMMARY)
    assert 'id="simfluence"' not in plain.read_text()
    with pytest.raises(Exception, match="trajectory table needs a 'actual' column"):
        write_report(tmp_path / "bad", SUMMARY, trajectory=TRAJECTORY.drop_columns(["actual"]))


def test_every_page_has_the_one_shell_stylesheet_and_escaping(tmp_path):
    """The report, its explorer pages and the served stylesheet come from report/page.py: one shell,
    one stylesheet, one escaping (no other module of trackstar_db escapes HTML itself)."""
    from trackstar_db.report.page import STYLESHEET, document, escape

    pages = build_pages(_tables(), ["b", "t-d64"], ["q1", "q2"], k=2)
    index = write_report(tmp_path, SUMMARY, pages=pages, title="a <b> & 'c'",
                         sections=[("x\"y", "Odd <heading>", "<p>part</p>")])
    written = [index] + sorted((tmp_path / "queries").glob("*.html"))
    assert len(written) == 1 + 1 + len(pages)  # the summary, one picker page, a page per query
    shell = document("T", "B")
    prefix, suffix = shell[:shell.index("<title>") + 7], shell[shell.index("</title>"):shell.index("<body>") + 6]
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert text.startswith(prefix) and suffix in text and text.endswith("</body></html>"), path.name
        assert re.findall(r"<style>(.*?)</style>", text, re.DOTALL) == [STYLESHEET], path.name
    text = index.read_text(encoding="utf-8")
    assert "<title>a &lt;b&gt; &amp; &#x27;c&#x27;</title>" in text and "Odd &lt;heading&gt;" in text
    assert 'id="x&quot;y"' in text
    assert escape("<&\"'>") == "&lt;&amp;&quot;&#x27;&gt;"
    package = Path(__file__).resolve().parents[1] / "trackstar_db"
    own = [str(p.relative_to(package)) for p in package.rglob("*.py")
           if p.name != "page.py" and re.search(r"^import html$|html\.escape\(|<!DOCTYPE", p.read_text(encoding="utf-8"), re.M)]
    assert own == []


def test_the_served_page_is_the_same_shell(report, tmp_path):
    """`serve`'s "/" is report/page.py's shell too: the same doctype, charset, title and viewport
    markup as a written report page, its first stylesheet the one STYLESHEET (linked, where the
    report has it inline), then the live page's own layout and script."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from trackstar_db import Database
    from trackstar_db.report.page import STYLESHEET
    from trackstar_db.serve import app

    Database.create(tmp_path / "db")
    client = TestClient(app(tmp_path / "db"))
    served, written = client.get("/").text, report.read_text(encoding="utf-8")

    def shell(text: str) -> tuple:
        """(up to the title, from the title's end to the stylesheet, how it ends)."""
        first_style = min(i for i in (text.find("<style>"), text.find('<link rel="stylesheet"')) if i >= 0)
        return text[:text.index("<title>") + 7], text[text.index("</title>"):first_style], text[-14:]

    assert shell(served) == shell(written) and served.endswith("</body></html>")
    links = re.findall(r'<link rel="stylesheet" href="([^"]+)">', served)
    assert links == ["static/explorer.css", "static/app.css"]  # the one stylesheet first, the page's layout after
    assert client.get("/" + links[0]).text == STYLESHEET == re.findall(r"<style>(.*?)</style>", written, re.S)[0]
    assert served.count("<!DOCTYPE html>") == 1 and served.count("<body>") == 1 and 'id="ask"' in served
    assert "<title>trackstar-db explorer</title>" in served and "<script" not in written
