"""The command line as a user types it, end to end on the tiny world, and its error messages."""

import json

import pytest
from click.testing import CliRunner

import trackstar_db
from trackstar_db.cli import main
from trackstar_db.testbed.world import generate_world


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """init -> ingest corpus/facts -> train -> ingest gradients -> fit -> retrieve -> tail-patch."""
    root = tmp_path_factory.mktemp("cli")
    world = generate_world(root / "world", seed=1, size="tiny")
    db = root / "db"
    run("init", db)
    n = len(world.sentences_path.read_text().splitlines())
    assert f"added {n} examples" in run("ingest", "corpus", db, world.sentences_path).output
    assert f"added 0 examples ({n} already present" in run("ingest", "corpus", db, world.sentences_path).output
    run("ingest", "facts", db, world.facts_path)
    out = run("train", db, "--out", root / "model", "--epochs", 4).output
    assert "frequency_bucket" in out and "accuracy" in out
    run("ingest", "gradients", db, "--split", "train", "--dim", 1024, "--batch-size", 32)
    run("ingest", "gradients", db, "--split", "queries", "--batch-size", 32)
    assert "mixed" in run("fit", db).output
    run("retrieve", db, "--method", "all", "--k", 20)
    run("tail-patch", db, "--run", "trackstar", "--run", "bm25", "--k", 3, "--queries", 5)
    return root


def test_eval_table_covers_every_method(built):
    rows = [json.loads(line) for line in run("eval", built / "db", "--format", "json").stdout.splitlines()]
    methods = {r["method"] for r in rows}
    assert {"bm25", "grad-dot", "grad-cos", "trak", "opt-cos", "r-train", "trackstar"} <= methods
    by = {r["method"]: r for r in rows}
    assert 0 < by["bm25"]["mrr"] <= 1 and by["trackstar"]["n_tailpatch_queries"] == 5
    assert by["trackstar"]["tailpatch_at_3"] is not None and by["grad-dot"]["tailpatch_at_3"] is None
    bucketed = run("eval", built / "db", "--by", "bucket", "--format", "csv").stdout
    assert bucketed.splitlines()[0].startswith("method,run_id,frequency_bucket")
    # bm25's MRR recomputed here from the stored rows (an independent reference, not the same SQL)
    db = trackstar_db.connect(built / "db")
    truth = {}
    for r in db.table("ground_truth").to_pylist():
        truth.setdefault(r["fact_id"], set()).add(r["example_id"])
    fact_of = {r["query_id"]: r["fact_id"] for r in db.table("queries").to_pylist()}
    ranked = {}
    for r in db.sql("SELECT query_id, rank, example_id FROM retrievals WHERE run_id = 'bm25' "
                    "AND kind = 'proponent' ORDER BY query_id, rank").to_pylist():
        ranked.setdefault(r["query_id"], []).append(r["example_id"])
    reciprocal = [next((1 / (i + 1) for i, e in enumerate(ids) if e in truth[fact_of[q]]), 0.0)
                  for q, ids in ranked.items() if truth.get(fact_of[q])]
    assert by["bm25"]["mrr"] == pytest.approx(sum(reciprocal) / len(reciprocal))
    assert by["bm25"]["n_queries"] == len(reciprocal)


@pytest.mark.parametrize("method", ["trackstar", "grad-dot", "trak"])
def test_one_prompt_query_equals_the_stored_run_for_that_query(built, method):
    """`query` featurizes the prompt on the fly; the stored run scored the stored query gradient:
    both must rank the same examples with the same scores."""
    db = trackstar_db.connect(built / "db")
    fact = db.sql("SELECT query_id, prompt, target FROM queries WHERE template = 'prompt0' ORDER BY query_id LIMIT 1")
    query_id, prompt, target = (fact.column(c)[0].as_py() for c in ("query_id", "prompt", "target"))
    stored = db.sql(f"SELECT kind, rank, example_id, score FROM retrievals WHERE run_id = '{method}' "
                    f"AND query_id = '{query_id}' ORDER BY kind DESC, rank")
    api = db.query(prompt, target, k=5, method=method)
    assert api.column_names[:6] == ["kind", "rank", "example_id", "score", "method", "text"]
    assert "label" in api.column_names  # then the evidence columns (retrieval/evidence.py)
    top = [r for r in stored.to_pylist() if r["rank"] <= 5]
    assert api.column("score").to_pylist() == pytest.approx([r["score"] for r in top], rel=1e-4, abs=1e-5)
    # duplicate texts tie exactly in storage; float noise may order them either way on the fly
    by_id = {(r["kind"], r["example_id"]): r["score"] for r in stored.to_pylist()}
    for row in api.to_pylist():
        assert by_id.get((row["kind"], row["example_id"])) == pytest.approx(row["score"], rel=1e-4, abs=1e-5), row
    assert all(t for t in api.column("text").to_pylist()) and set(api.column("method").to_pylist()) == {method}
    cli = [json.loads(l) for l in run("query", built / "db", "--prompt", prompt, "--target", target, "--k", 5,
                                      "--method", method, "--format", "json").stdout.splitlines()]
    assert [r["example_id"] for r in cli] == api.column("example_id").to_pylist()


def _listed(text: str) -> list[tuple[int, str]]:
    """(rank, example id) of each hit line of `query`'s text output."""
    return [(int(line.split()[0]), line.split()[2]) for line in text.splitlines() if line[:4].strip().isdigit()]


def test_query_default_method_and_bm25_text(built):
    """The default method is the best rung the database serves (trackstar here, R fitted) and answers
    exactly as `--method trackstar`; bm25's text output lists the library's hits, in rank order,
    each sharing a word with the prompt or target."""
    db = trackstar_db.connect(built / "db")
    fact = db.sql("SELECT q.prompt, q.target FROM queries q WHERE q.template = 'prompt0' ORDER BY query_id LIMIT 1")
    prompt, target = fact.column("prompt")[0].as_py(), fact.column("target")[0].as_py()
    default = run("query", built / "db", "--prompt", prompt, "--target", target, "--k", 4).output
    named = run("query", built / "db", "--prompt", prompt, "--target", target, "--k", 4, "--method", "trackstar").output
    assert "(method: trackstar)" in default and default == named and len(_listed(default)) == 8  # 4 + 4 opponents
    text = run("query", built / "db", "--prompt", prompt, "--target", target, "--method", "bm25", "--k", 5).output
    hits = db.query(prompt, target, k=5, method="bm25").to_pylist()
    assert text.splitlines()[0] == f"proponents of {target!r} after {prompt!r} (method: bm25):"
    assert _listed(text) == [(h["rank"], h["example_id"]) for h in hits] and len(hits) == 5
    assert "opponents" not in text  # BM25 ranks matches only
    words = {w.lower().strip(".,") for w in (prompt + " " + target).split()}
    assert all(words & {w.lower().strip(".,") for w in h["text"].split()} for h in hits)


def test_sql_command_formats_and_refusals(built, tmp_path):
    out = run("sql", built / "db", "SELECT count(*) AS n FROM examples", "--format", "csv").stdout
    n = len((built / "world" / "trex_sentences.jsonl").read_text().splitlines())
    assert out.splitlines() == ["n", str(n)]
    assert "vector" not in run("sql", built / "db", "SELECT * FROM grads_train_corrected LIMIT 1").output
    run("sql", built / "db", "SELECT * FROM retrievals", "--format", "parquet", "--out", tmp_path / "r.parquet")
    assert (tmp_path / "r.parquet").stat().st_size > 0
    for statement, message in [("DELETE FROM examples", "read-only"), ("SELEC 1", "syntax error"),
                               ("SELECT * FROM nope", "nope"),
                               (f"COPY examples TO '{tmp_path}/x.csv'", "read-only")]:
        result = run("sql", built / "db", statement, ok=False)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()


def test_export_import_round_trip_gives_identical_metrics(built, tmp_path):
    path = tmp_path / "trackstar.jsonl"
    run("export", built / "db", "--run", "trackstar", "--out", path)
    record = json.loads(path.read_text().splitlines()[0])
    assert {"inputs_plaintext", "proponents", "proponent_ids", "opponent_scores", "proponent_correct"} <= set(record)
    run("import", built / "db", path, "--method", "trackstar", "--run", "trackstar-reimported")
    rows = {r["run_id"]: r for r in map(json.loads, run("eval", built / "db", "--format", "json").stdout.splitlines())}
    for key in ("mrr", "recall_at_10", "n_queries"):
        assert rows["trackstar-reimported"][key] == pytest.approx(rows["trackstar"][key])
    db = trackstar_db.connect(built / "db")
    a = db.sql("SELECT query_id, kind, rank, example_id, score FROM retrievals WHERE run_id = 'trackstar' ORDER BY ALL")
    b = db.sql("SELECT query_id, kind, rank, example_id, score FROM retrievals "
               "WHERE run_id = 'trackstar-reimported' ORDER BY ALL")
    assert a.equals(b)


def test_info_and_bm25_query_text_option(built):
    info = run("info", built / "db").output
    assert "grads_train_uncorrected" in info and "adam-factored" in info and "model:" in info
    run("retrieve", built / "db", "--method", "bm25", "--run", "bm25-prompt", "--query-text", "prompt", "--k", 5)
    db = trackstar_db.connect(built / "db")
    params = json.loads(db.sql("SELECT parameters FROM runs WHERE run_id = 'bm25-prompt'").column(0)[0].as_py())
    assert params["query_text"] == "prompt" and params["k"] == 5
    again = run("retrieve", built / "db", "--method", "bm25", "--run", "bm25-prompt", ok=False)
    assert "exists" in again.output and again.exit_code == 1


def test_report_writes_a_page(built, tmp_path):
    """The report's summary table prints eval's figures; every link it holds opens a written page."""
    import re

    out = run("report", built / "db", "--out", tmp_path / "report", "--samples", 3).output
    page = (tmp_path / "report" / "index.html").read_text()
    assert str(tmp_path / "report" / "index.html") in out
    summary = page[page.index('<h2 id="summary">'):]
    summary = summary[:summary.index("</table>")]
    cells = {re.sub("<[^>]+>", "", row.split("</td>")[0]): re.findall(r'<td class="num[^"]*">([^<]*)</td>', row)
             for row in summary.split("<tr>")[2:]}
    evaluated = [json.loads(line) for line in run("eval", built / "db", "--format", "json").stdout.splitlines()]
    for row in evaluated:
        label = next(l for l in (f"{row['method']} ({row['run_id']})", row["method"]) if l in cells)
        assert cells[label][1:3] == [f"{row['mrr']:.3f}", f"{row['recall_at_10']:.3f}"], (label, cells[label])
    assert len(cells) == len(evaluated)
    assert page.count("<svg") >= 2  # the summary plot and the frequency-bucket plot
    for html_page in [tmp_path / "report" / "index.html", *sorted((tmp_path / "report" / "queries").glob("*.html"))]:
        for href in re.findall(r'href="([^"#:]+)"', html_page.read_text()):
            assert (html_page.parent / href).exists(), (html_page, href)
    assert len(list((tmp_path / "report" / "queries").glob("*.html"))) == 3 + 1  # the sampled pages and their index


@pytest.mark.parametrize("args, message", [
    (("info", "{missing}"), "no such database"),
    (("eval", "{empty}"), None),
    (("query", "{empty}", "--prompt", "a", "--target", "b"), "no examples"),
    (("retrieve", "{empty}", "--method", "trackstar"), "no queries"),
    (("ingest", "gradients", "{empty}"), "no model recorded"),
    (("tail-patch", "{empty}", "--run", "x"), "no run 'x'"),
    (("retrieve", "{empty}", "--method", "nonsense"), "unknown method"),
    (("sql", "{empty}", "SELECT * FROM nope"), "tables:"),
])
def test_errors_are_one_clear_line(tmp_path, args, message):
    run("init", tmp_path / "empty")
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    result = run(*args, ok=message is None)
    if message:
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_model_directory_is_reported(built, tmp_path):
    import shutil

    shutil.copytree(built / "db", tmp_path / "db")
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    manifest["model"]["path"] = str(tmp_path / "gone")
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(manifest))
    result = run("query", tmp_path / "db", "--prompt", "x was born in", "--target", "y", ok=False)
    assert "model directory recorded in the manifest is missing" in result.output


def test_refusals_keep_what_was_stored(built, tmp_path):
    import shutil

    db = tmp_path / "db"
    shutil.copytree(built / "db", db)
    before = trackstar_db.connect(db).sql("SELECT count(*) AS n FROM retrievals WHERE run_id = 'trackstar'")
    # a template holding a quote is a value, not SQL
    assert "no queries with template" in run("fit", db, "--template", "it's", ok=False).output
    # retraining would orphan the stored gradients
    assert "orphan" in run("train", db, "--out", tmp_path / "other-model", ok=False).output
    assert not (tmp_path / "other-model").exists()
    # R_train only: the mixed R is removed, so trackstar cannot silently use a stale one
    run("fit", db, "--mix", "train")
    failed = run("retrieve", db, "--method", "trackstar", "--replace", ok=False)
    assert "no 'mixed' preconditioner" in failed.output
    after = trackstar_db.connect(db).sql("SELECT count(*) AS n FROM retrievals WHERE run_id = 'trackstar'")
    assert after.equals(before) and before.column("n")[0].as_py() > 0  # the failed --replace lost nothing
