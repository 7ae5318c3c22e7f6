"""Bad options and bad inputs (issue 27, items 4-7): each is refused with one line that names the
option, or the file, line and field, and leaves the database byte for byte as it was.

Every case runs the command line as a user types it (click's runner, in-process, so the fast
suite stays fast; --engine ray without Ray runs as a subprocess with a stand-in that cannot be
imported). The database's bytes are compared before and after (all files but the writer lock,
whose holder record a refused writer may rewrite).
"""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from databases import run_cli

from trackstar_db import connect
from trackstar_db.errors import TrackstarError

PAYLOAD = '"><script>alert(1)</script><img src=x onerror=alert(2)><a href="javascript:alert(3)">j</a>'


def _cli(*argv, ok=True):
    return run_cli(*argv, ok=ok)


def _bytes(db_path: Path) -> dict:
    return {str(p.relative_to(db_path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(db_path.rglob("*")) if p.is_file() and p.name != ".writer.lock"}


def _refused(db_path: Path, argv: list, fragment: str) -> str:
    """Run argv; it must fail with one error line holding `fragment` and change nothing in DB."""
    before = _bytes(db_path)
    result = _cli(*argv, ok=False)
    assert result.exit_code != 0, f"accepted: {argv}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert _bytes(db_path) == before, f"{argv} changed the database"
    return errors[0]


@pytest.fixture(scope="module")
def db(tiny_db_template, tmp_path_factory):
    """A copy of the tiny database with a bm25 run and its viewer export (shared: every case is refused)."""
    from databases import copy_db

    root = tmp_path_factory.mktemp("inputs")
    handle = copy_db(tiny_db_template, root)
    _cli("retrieve", handle.path, "--method", "bm25", "--k", "3")
    _cli("export", handle.path, "--run", "bm25", "--out", root / "bm25.jsonl")
    return handle


def _lines(db) -> list[dict]:
    return [json.loads(line) for line in (db.path.parent / "bm25.jsonl").read_text().splitlines()]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


BAD_OPTIONS = [
    (["retrieve", "DB", "--method", "bm25", "--k", "1000000000"], "--k"),
    (["retrieve", "DB", "--method", "bm25", "--k", "0"], "--k"),
    (["query", "DB", "--prompt", "a", "--target", "b", "--method", "bm25", "--k", "-1"], "--k"),
    (["train", "DB", "--out", "OUT", "--epochs", "0"], "--epochs"),
    (["train", "DB", "--out", "OUT", "--epochs", "-2"], "--epochs"),
    (["train", "DB", "--out", "OUT", "--checkpoints", "-1"], "--checkpoints"),
    (["ingest", "corpus", "DB", "SENTENCES", "--batch-size", "0"], "--batch-size"),
    (["ingest", "corpus", "DB", "SENTENCES", "--batch-size", "-5"], "--batch-size"),
    (["tail-patch", "DB", "--run", "bm25", "--queries", "0"], "--queries"),
    (["tail-patch", "DB", "--run", "bm25", "--queries", "-1"], "--queries"),
    (["tail-patch", "DB", "--run", "bm25", "--k", "0"], "--k"),
    (["ingest", "gradients", "DB", "--batch-size", "0"], "--batch-size"),
    (["ingest", "gradients", "DB", "--commit-rows", "0"], "--commit-rows"),
    (["ingest", "gradients", "DB", "--limit", "-1"], "--limit"),
    (["fit", "DB", "--crossing-k", "0"], "--crossing-k"),
    (["fit", "DB", "--damping", "-1"], "--damping"),
    (["index", "DB", "--method", "trackstar", "--partitions", "0"], "--partitions"),
    (["retrieve", "DB", "--method", "bm25", "--ann", "--nprobes", "0"], "--nprobes"),
    (["simfluence", "record", "DB", "--runs", "0"], "--runs"),
    (["simfluence", "record", "DB", "--subset", "0"], "--subset"),
    (["report", "DB", "--out", "OUT", "--samples", "0"], "--samples"),
    (["select", "DB", "--top", "0", "--out", "OUT"], "--top"),
    (["select", "DB", "--fraction", "1.5", "--out", "OUT"], "--fraction"),
    (["validate", "DB", "--models", "0"], "--models"),
    (["validate", "DB", "--epochs", "0"], "--epochs"),
    (["ingest", "gradients", "DB", "--dim", "-1024"], "--dim"),
    # names that reach the store: the staging prefix, path separators, '..'
    (["retrieve", "DB", "--method", "bm25", "--run", "~staging~bm25"], "reserved"),
    (["retrieve", "DB", "--method", "bm25", "--run", "../x"], "plain name"),
    (["retrieve", "DB", "--method", "bm25", "--run", ".."], "plain name"),
    (["import", "DB", "EXPORTED", "--method", "m", "--run", "~staging~bm25"], "reserved"),
    (["import", "DB", "EXPORTED", "--method", "a/b"], "plain name"),
    # outputs inside the database
    (["sql", "DB", "SELECT 1 AS x", "--out", "DB/manifest.json"], "inside the database"),
    (["sql", "DB", "SELECT 1 AS x", "--format", "csv", "--out", "DB/journal.json"], "inside the database"),
    (["sql", "DB", "SELECT 1 AS x", "--out", "DB/bm25/meta.json"], "inside the database"),
    (["export", "DB", "--run", "bm25", "--out", "DB/manifest.json"], "inside the database"),
    (["export", "DB", "--run", "bm25", "--out", "DB/tables/examples.lance/_versions/9.manifest"], "inside the database"),
    (["export", "DB", "--run", "bm25", "--out", "DB/preconditioners/r.safetensors"], "inside the database"),
    (["report", "DB", "--out", "DB/report"], "inside the database"),
    (["train", "DB", "--out", "DB/model"], "inside the database"),
    (["train", "DB", "--out", "MODEL"], "already holds a model"),
    (["init", "DB", "--checkpoint", "../../.."], "checkpoint '../../..'"),
]


@pytest.mark.parametrize("argv,fragment", BAD_OPTIONS, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_changes_nothing(db, tiny_db_template, argv, fragment):
    files = {"DB": str(db.path), "OUT": str(db.path.parent / "out"), "MODEL": db.manifest["model"]["path"],
             "SENTENCES": str(tiny_db_template / "world" / "trex_sentences.jsonl"),
             "EXPORTED": str(db.path.parent / "bm25.jsonl")}
    argv = [files.get(a, a.replace("DB/", files["DB"] + "/")) for a in argv]
    _refused(db.path, argv, fragment)


def test_engine_ray_without_ray_names_the_extra_at_once(db, tmp_path):
    shim = tmp_path / "noray" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "noray"), os.getcwd(),
                                                      os.environ.get("PYTHONPATH", "")]))
    before = _bytes(db.path)
    for argv in (["fit", str(db.path), "--engine", "ray"],
                 ["retrieve", str(db.path), "--method", "grad-dot", "--engine", "ray"]):
        done = subprocess.run([sys.executable, "-m", "trackstar_db.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=60)
        assert done.returncode == 2 and "pip install 'trackstar-db[ray]'" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert _bytes(db.path) == before


def test_api_shares_the_option_checks():
    from trackstar_db.retrieval.runs import RetrieveOptions
    from trackstar_db.sources.corpus import CorpusOptions
    from trackstar_db.testbed.train import TrainConfig
    from trackstar_db.option_checks import K_MAX, name

    # the library names the parameter; the CLI names its flag (test_bad_option_is_one_line_and_changes_nothing)
    with pytest.raises(TrackstarError, match=r"^k must be <= 100,000, not 100001$"):
        RetrieveOptions(k=K_MAX + 1)
    with pytest.raises(TrackstarError, match=r"^batch_size must be >= 1, not 0$"):
        CorpusOptions(batch_size=0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    for bad in ("~staging~x", "a/b", "a\\b", "..", "", "x\n"):
        with pytest.raises(TrackstarError):
            name("--run", bad)
    assert name("--run", "bm25-published <v2>") == "bm25-published <v2>"


def test_staged_key_is_refused_by_the_store_itself(db):
    before = _bytes(db.path)
    rows = pa.table({"run_id": ["~staging~bm25"], "method": ["bm25"], "query_id": ["q"], "kind": ["proponent"],
                     "rank": [1], "example_id": ["e"], "score": [1.0]})
    with pytest.raises(TrackstarError, match="reserved"):
        db.replace_run("~staging~bm25", "bm25", {}, rows)
    assert _bytes(db.path) == before


# -- import (item 5) ---------------------------------------------------------------------------
def _edited(db, tmp_path, line: int, edit) -> Path:
    records = _lines(db)
    edit(records[line])
    return _write(tmp_path / "edited.jsonl", records)


@pytest.mark.parametrize("what,edit,fragment", [
    ("nan score", lambda r: r["proponent_scores"].__setitem__(0, math.nan), "proponent_scores[0] is nan"),
    ("inf score", lambda r: r["proponent_scores"].__setitem__(1, math.inf), "proponent_scores[1] is inf"),
    ("text", lambda r: r["proponents"].__setitem__(0, "another text"), "text 'another text' differs"),
    ("prompt", lambda r: r.__setitem__("inputs_plaintext", "another prompt"), "prompt 'another prompt' differs"),
    ("target", lambda r: r.__setitem__("targets_plaintext", "elsewhere"), "target 'elsewhere' differs"),
    ("relation", lambda r: r.__setitem__("relation", "other relation"), "relation 'other relation' differs"),
])
def test_import_refuses_non_finite_scores_and_conflicts(db, tmp_path, what, edit, fragment):
    path = _edited(db, tmp_path, 2, edit)
    line = _refused(db.path, ["import", db.path, path, "--method", "pub", "--run", "pub"], fragment)
    assert f"{path}:3:" in line


def test_import_of_the_same_content_still_loads(db, tmp_path):
    copy = tmp_path / "db"
    import shutil

    shutil.copytree(db.path, copy)
    _cli("import", copy, db.path.parent / "bm25.jsonl", "--method", "bm25-again", "--run", "again")
    again = connect(copy).sql("SELECT count(*) AS n FROM retrievals WHERE run_id = 'again'").column("n")[0].as_py()
    assert again == connect(copy).sql("SELECT count(*) AS n FROM retrievals WHERE run_id = 'bm25'").column("n")[0].as_py()


# -- input files (item 6) ----------------------------------------------------------------------
def test_malformed_input_files_name_file_line_and_field(db, tiny_db_template, tmp_path):
    fact = json.loads((tiny_db_template / "world" / "trex_facts.jsonl").read_text().splitlines()[0])
    cases = {
        "nested.jsonl": ('{"text": "ok", "meta": {"a": ' + "[" * 50_000 + "]" * 50_000 + "}}\n",
                         "nested.jsonl:1: field 'meta': JSON nested too deeply"),
        "huge.jsonl": ('{"text": "hello", "id": ' + "9" * 5000 + "}\n",
                       "huge.jsonl:1: field 'id': an integer of 5,000 digits"),
        "typed.jsonl": ('{"text": "fine"}\n{"text": 17}\n', "typed.jsonl:2: field 'text' must be a string"),
        "corrupt.parquet": ("PAR1 this is not parquet PAR1", "corrupt.parquet: not a readable parquet file"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        _refused(db.path, ["ingest", "corpus", db.path, path], fragment)
    for value, fragment in ((-3, "must be a count >= 0"), ("3", "must be an integer")):
        path = _write(tmp_path / "facts.jsonl", [dict(fact, fact_id="FNEW", c4_frequency=value)])
        _refused(db.path, ["ingest", "facts", db.path, path], f"facts.jsonl:1: field 'c4_frequency' {fragment}")


def test_corrupt_parquet_and_wrong_types_in_parquet(db, tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": ["a text", "another"], "id": [1.5, 2.5]}), path)
    _refused(db.path, ["ingest", "corpus", db.path, path], "ints.parquet:1: field 'id' must be a string")
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"text": ["x"] * 100}), whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[:-20])
    _refused(db.path, ["ingest", "corpus", db.path, cut], "cut.parquet: not a readable parquet file")


@pytest.mark.parametrize("damage,fragment", [
    ("config array", "config.json: must hold a JSON object"),
    ("no tokenizer", "no tokenizer"),
    ("pickled weights", "pytorch_model.bin: pickled PyTorch weights are not read; only safetensors"),
])
def test_model_directory_is_validated_at_init(tiny_db_template, tmp_path, damage, fragment):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_db_template / "model", model)
    if damage == "config array":
        (model / "config.json").write_text("[1, 2]\n")
    elif damage == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink(missing_ok=True)
    else:
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
        (model / "model.safetensors").unlink()
    result = _cli("init", tmp_path / "db", "--model", model, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert fragment in result.output.strip().splitlines()[-1], result.output
    assert not (tmp_path / "db").exists()  # refused before anything is made


def test_pickled_weights_of_a_recorded_model_are_refused_at_load(tiny_db):
    import torch
    from safetensors.torch import load_file

    model = Path(tiny_db.manifest["model"]["path"])
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    from trackstar_db.models.load import open_model
    from trackstar_db.store.checkpoints import source

    with pytest.raises(TrackstarError, match="only safetensors weights"):
        open_model(source(tiny_db))


# -- the report (item 7) and HTML payloads (item 8) --------------------------------------------
class _Scan:
    """Every script element, on* attribute and javascript: URL of an HTML page."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        found = self.found = []

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                if tag == "script":
                    found.append(f"<script> element")
                for key, value in attrs:
                    if key.startswith("on"):
                        found.append(f"{key}= attribute")
                    if value and value.strip().lower().startswith("javascript:"):
                        found.append(f"{key}={value!r}")

        Parser().feed(text)


def test_report_of_imported_runs_and_html_payloads_renders_without_script(db, tmp_path):
    import shutil

    copy = tmp_path / "db"
    shutil.copytree(db.path, copy)
    fact = {"fact_id": f"F{PAYLOAD}", "entity0": f"subject {PAYLOAD}", "relation": f"relation {PAYLOAD}",
            "entity1": f"object {PAYLOAD}", "c4_frequency": None, "prompt0": f"prompt {PAYLOAD}"}
    _cli("ingest", "facts", copy, _write(tmp_path / "facts.jsonl", [fact]))
    records = [{"example_id": f"{fact['fact_id']}:prompt0", "inputs_plaintext": fact["prompt0"],
                "targets_plaintext": fact["entity1"], "fact_id": fact["fact_id"], "relation": fact["relation"],
                "query_set": "prompt0", "proponents": [f"text {PAYLOAD}", "plain text"],
                "proponent_ids": [f"E{PAYLOAD}", "E-plain"], "proponent_scores": [2.0, 1.0],
                "proponent_correct": [True, False]},
               {"example_id": f"Q-nulls {PAYLOAD}", "inputs_plaintext": f"another {PAYLOAD}",  # no fact, no flags
                "targets_plaintext": f"t {PAYLOAD}", "proponents": ["third"], "proponent_ids": ["E3"],
                "proponent_scores": [0.5]}]
    run = 'run"><img src=x onerror=alert(9)>'
    _cli("import", copy, _write(tmp_path / "payload.jsonl", records), "--method", "m<b onmouseover=alert(8)>",
         "--run", run)
    out = tmp_path / "report"
    _cli("report", copy, "--out", out, "--samples", "1000")
    pages = sorted(out.rglob("*.html"))
    texts = {p: p.read_text(encoding="utf-8") for p in pages}
    # every imported query has its page, the run's column is there, and the payloads are shown as text
    shown = [t for t in texts.values() if "prompt &lt;script&gt;" in t or "another &quot;&gt;&lt;script" in t]
    assert len(shown) >= 2
    assert any("run&quot;&gt;&lt;img" in t for t in texts.values())
    for page, text in texts.items():
        assert _Scan(text).found == [], f"{page.name}: {_Scan(text).found}"
    _cli("report", copy, "--out", tmp_path / "compare", "--compare", run, "bm25")
    assert len(list((tmp_path / "compare" / "queries").glob("q-*.html"))) >= 2


# -- issue 34, item 2: the input errors that escaped as raw messages ---------------------------
def _sentences(tiny_db_template, n=3, suffix="x") -> list[dict]:
    lines = (tiny_db_template / "world" / "trex_sentences.jsonl").read_text().splitlines()[:n]
    return [dict(json.loads(line), sentence_id=json.loads(line)["sentence_id"] + suffix) for line in lines]


def _facts(tiny_db_template, n=3) -> list[dict]:
    return [json.loads(line) for line in (tiny_db_template / "world" / "trex_facts.jsonl").read_text().splitlines()[:n]]


def test_an_index_past_int32_is_named_not_an_overflow(db, tiny_db_template, tmp_path):
    records = _sentences(tiny_db_template)
    records[1]["sent_idx_in_abst"] = 2**70
    path = _write(tmp_path / "big.jsonl", records)
    _refused(db.path, ["ingest", "corpus", db.path, path], "big.jsonl:2: field 'sent_idx_in_abst' must be an integer in")
    records[1]["sent_idx_in_abst"] = -1
    _refused(db.path, ["ingest", "corpus", db.path, _write(path, records)], "big.jsonl:2: field 'sent_idx_in_abst'")


def test_text_fields_mixing_numbers_and_strings_follow_one_rule(db, tiny_db_template, tmp_path):
    """The rule (records.optional_text): an integer is read as its decimal text on every line; any
    other non-string is refused naming file, line and field."""
    import shutil

    copy = tmp_path / "db"
    shutil.copytree(db.path, copy)
    records = _sentences(tiny_db_template, suffix="-mixed")
    records[0]["abstract_uri"] = 5
    _cli("ingest", "corpus", copy, _write(tmp_path / "mixed.jsonl", records))
    stored = connect(copy).sql("SELECT example_id, abstract_uri FROM examples WHERE example_id LIKE '%-mixed' "
                               "ORDER BY example_id").to_pylist()
    assert [r["abstract_uri"] for r in stored] == ["5"] + [r["abstract_uri"] for r in records[1:]]
    facts = [dict(f, fact_id=f["fact_id"] + "-mixed") for f in _facts(tiny_db_template)]
    facts[1]["kilt_id"] = 7
    _cli("ingest", "facts", copy, _write(tmp_path / "facts.jsonl", facts))
    kilt = connect(copy).sql("SELECT kilt_id FROM facts WHERE fact_id LIKE '%-mixed' ORDER BY fact_id").column(0)
    assert kilt.to_pylist() == [facts[0]["kilt_id"], "7", facts[2]["kilt_id"]]
    for field, value, path in (("abstract_uri", 1.5, "uri.jsonl"), ("abstract_uri", ["a"], "uri.jsonl")):
        bad = _sentences(tiny_db_template, suffix="-bad")
        bad[2][field] = value
        _refused(db.path, ["ingest", "corpus", db.path, _write(tmp_path / path, bad)],
                 f"{path}:3: field '{field}' must be a string")
    bad = [dict(f, fact_id=f["fact_id"] + "-bad") for f in _facts(tiny_db_template)]
    bad[1]["kilt_id"] = {"id": 1}
    _refused(db.path, ["ingest", "facts", db.path, _write(tmp_path / "kilt.jsonl", bad)],
             "kilt.jsonl:2: field 'kilt_id' must be a string")


@pytest.mark.parametrize("field,value", [("prompt0", "A different prompt for"), ("relation", "another relation"),
                                         ("kilt_id", "another-kilt"), ("entity1_alias", ["elsewhere"])])
def test_a_fact_repeating_a_stored_one_with_other_content_is_refused(db, tiny_db_template, tmp_path, field, value):
    facts = _facts(tiny_db_template, 2)
    _cli("ingest", "facts", db.path, _write(tmp_path / "same.jsonl", facts))  # an exact repeat: accepted
    facts[1][field] = value
    line = _refused(db.path, ["ingest", "facts", db.path, _write(tmp_path / "other.jsonl", facts)],
                    f"other.jsonl:2: fact id {facts[1]['fact_id']!r} conflicts with the stored fact")
    assert repr(value) in line


@pytest.mark.parametrize("command", ["corpus", "facts", "import"])
def test_an_empty_input_file_is_refused(db, tmp_path, command):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    argv = (["import", db.path, empty, "--method", "m", "--run", "empty"] if command == "import"
            else ["ingest", command, db.path, empty])
    _refused(db.path, argv, "empty.jsonl: no re")
    assert "empty" not in db.ids("runs", "run_id")


def test_import_into_a_database_without_facts_leaves_check_clean(db, tiny_db_template, tmp_path):
    """The file's facts are known by id only (its marks are their ground truth): no damage for
    check, before and after the facts themselves are ingested; a fact really lost still is."""
    from trackstar_db import Database
    from trackstar_db.sources.corpus import ingest_corpus

    corpus_only = Database.create(tmp_path / "corpus_only")
    ingest_corpus(corpus_only, [tiny_db_template / "world" / "trex_sentences.jsonl"], progress=False)
    exported = db.path.parent / "bm25.jsonl"
    _cli("import", corpus_only.path, exported, "--method", "pub", "--run", "pub")
    assert "no problems found" in _cli("check", corpus_only.path).output
    again = connect(corpus_only.path)
    marked = again.count("ground_truth_imported")
    assert marked > 0 and again.count("ground_truth") >= marked  # eval scores the run with the file's marks
    _cli("ingest", "facts", corpus_only.path, tiny_db_template / "world" / "trex_facts.jsonl")
    assert "no problems found" in _cli("check", corpus_only.path).output
    # a fact named by no import and not stored is still damage
    with_facts = tmp_path / "with_facts"
    import shutil

    shutil.copytree(db.path, with_facts)
    handle = connect(with_facts)
    facts = handle.table("facts")
    with handle.writer("damage"):  # committed: check judges the committed versions
        handle.replace("facts", facts.slice(1))
    checked = _cli("check", with_facts, ok=False)
    assert f"name a fact_id not in facts (first: {facts.column('fact_id')[0].as_py()!r})" in checked.output


def test_plan_past_int64_bytes_names_the_option():
    result = _cli("plan", "--rows", "1000000000000000", "--dim", "65536", ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: --rows 1,000,000,000,000,000 comes to"), result.output
    assert "at most 35,171,491,903,808" in errors[0]  # (2^63 - 1) // (2 x (65,536 x 2 + 48)) rows
    assert (2**63 - 1) // (2 * (65536 * 2 + 48)) == 35_171_491_903_808
    _cli("plan", "--rows", "35171491903808", "--dim", "65536")  # the largest it names is planned


@pytest.fixture(scope="module")
def with_r(tiny_db_template, tmp_path_factory):
    from databases import with_gradients

    return with_gradients(tiny_db_template, tmp_path_factory.mktemp("bounds"))


@pytest.mark.slow  # a database with gradients
def test_fit_refuses_damping_and_crossing_k_the_next_command_could_not_use(with_r):
    from trackstar_db.gradients.fit import damping_bound

    dim = with_r.gradient_table("train").dim
    _refused(with_r.path, ["fit", with_r.path, "--crossing-k", "1000000000"],
             f"--crossing-k must be below {dim:,}")
    _refused(with_r.path, ["fit", with_r.path, "--crossing-k", str(dim)], f"--crossing-k must be below {dim:,}")
    line = _refused(with_r.path, ["fit", with_r.path, "--damping", "1e308"], "--damping must be at most")
    bounds = [damping_bound(with_r.gradient_table("train", corrected=c).load_preconditioner("train"))
              for c in (True, False)]
    assert f"{min(bounds):.3g}" in line or f"{max(bounds):.3g}" in line
    # the bound is the math's: largest eigenvalue / (mean eigenvalue x float32 epsilon)
    import torch

    pre = with_r.gradient_table("train").load_preconditioner("train")
    values = torch.cat(pre.eigvals).clamp(min=0)
    assert damping_bound(pre) == pytest.approx(float(values.max()) / (float(values.mean()) * 2**-23))
    # inside the bounds, the next command works: a damping of 1e5 and the last component
    _cli("fit", with_r.path, "--damping", "1e5", "--crossing-k", str(dim - 1))
    result = _cli("retrieve", with_r.path, "--method", "trackstar", "--k", "2", "--device", "cpu", "--run", "bounded")
    assert "run bounded" in result.output
