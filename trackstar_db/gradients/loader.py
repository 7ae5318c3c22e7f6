"""A ready Featurizer for a database's checkpoint: model, tokenizer and the second moment its
settings ask for (the optimizer state from the manifest, or the estimate from a sample)."""

from __future__ import annotations

from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer import optimizer_state as _optimizer_state
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.featurizer.per_example import Featurizer
from trackstar_db.featurizer.second_moment import build_second_moment
from trackstar_db.featurizer.settings import resolve
from trackstar_db.featurizer.task import task_of
from trackstar_db.featurizer.tokenize import cap_tokenizer, collate, pad_id


def stored_config(db) -> FeaturizerConfig | None:
    entry = db.manifest.get("featurizer")
    return FeaturizerConfig.from_dict(entry["config"]) if entry else None


def optimizer_kind(db) -> str | None:
    """The recorded optimizer's name ('adamw', 'adafactor', ...), or None without a state."""
    model = db.manifest.get("model") or {}
    if not model.get("optimizer_state"):
        return None
    return model.get("optimizer") or _optimizer_state.peek_kind(model["optimizer_state"])


def resolved_config(db, given: dict | None = None) -> FeaturizerConfig:
    """The settings a gradient run on `db` uses: stored ones, then given ones, then defaults."""
    return resolve(stored_config(db), given, optimizer_kind(db))


def sample_texts(db, limit: int, spans: bool = False) -> list:
    """The first `limit` example texts by id (a deterministic sample; DuckDB's top-N keeps
    memory at O(limit) whatever the corpus size); with `spans`, (text, loss spans) pairs."""
    import duckdb

    columns = "text, loss_spans" if spans else "text"
    with duckdb.connect() as con:
        con.register("examples", db.dataset("examples"))
        rows = con.sql(f"SELECT {columns} FROM examples ORDER BY example_id LIMIT {int(limit)}").to_arrow_table()
    if spans:
        return list(zip(rows.column("text").to_pylist(), rows.column("loss_spans").to_pylist()))
    return rows.column("text").to_pylist()


def load_featurizer(db, config: FeaturizerConfig, device: str = "cpu", uncorrected: bool = False,
                    estimate_sample: int = 512, batch_size: int = 16, model_dtype: str = "float32",
                    prepare=None):
    """(Featurizer, tokenizer) for the database's model and task (featurizer/task.py), with the
    second moment config asks for (estimated from the task's loss on a sample).
    The tokenizer's encodings are capped at the model's context (tokenize.cap_tokenizer).
    prepare: model -> model, given the model loaded on the CPU (gradients/sharded.py shards it)."""
    task = task_of(db.manifest)
    model, tokenizer = db.load_model("cpu" if prepare else device, model_dtype)
    if prepare is not None:
        model = prepare(model)
    cap_tokenizer(tokenizer, model.config, config.max_length)
    state = None
    if config.correction in ("adam-exact", "adam-factored", "adafactor"):
        path = db.model_info().get("optimizer_state")
        if not path:
            raise TrackstarError(f"correction {config.correction!r} needs the optimizer state; "
                                 "give --optimizer-state to init, or use --correction estimated")
        state = _optimizer_state.load(path)
    sample = None
    if config.correction == "estimated":
        rows = sample_texts(db, estimate_sample, spans=task.masked)
        if not rows:
            raise TrackstarError("correction 'estimated' needs training examples; ingest the corpus first")
        rows = rows if task.masked else [(text, None) for text in rows]
        items = [task.encode_example(tokenizer, text, spans, config.max_length) for text, spans in rows]
        sample = [collate(items[i:i + batch_size], pad_id(tokenizer)) for i in range(0, len(items), batch_size)]
    moment = build_second_moment(config, model, state, sample, device)
    return Featurizer(model, config, moment, device, uncorrected=uncorrected, task=task), tokenizer
