"""A ready Featurizer for a model source: model and tokenizer from the one factory
(models/load.open_model), and the second moment its settings ask for (the source's optimizer
state, or the estimate from a sample of training examples).

`load_featurizer(source, config, ...)` is the featurizer every path builds: the gradient worker
and the Ray actor (gradients/setup.py), TracIn-CP in memory, the one-prompt query and token
contributions; `database_featurizer(db, config, checkpoint)` is the same for a checkpoint of a
database, with the database's first examples as the estimate's sample.
"""

from __future__ import annotations

from typing import Callable, Sequence

from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.featurizer import optimizer_state as _optimizer_state
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.featurizer.per_example import Featurizer
from trackstar_db.featurizer.second_moment import build_second_moment
from trackstar_db.featurizer.settings import resolve
from trackstar_db.featurizer.task import DEFAULT as DEFAULT_TASK
from trackstar_db.featurizer.task import Task, task_of
from trackstar_db.featurizer.tokenize import collate, pad_id
from trackstar_db.models.load import open_model
from trackstar_db.models.source import ModelSource
from trackstar_db.store.checkpoints import source

ESTIMATE_SAMPLE = 512  # training examples the 'estimated' correction averages over
ELEMENTWISE_OR_FACTORED = ("adam-exact", "adam-factored", "adafactor")  # corrections read from the optimizer state


def stored_config(db) -> FeaturizerConfig | None:
    entry = db.manifest.get("featurizer")
    return FeaturizerConfig.from_dict(entry["config"]) if entry else None


def recorded_model_dtype(db) -> str:
    """The model dtype the stored vectors were made with (absent = float32), 'auto' before any run."""
    entry = db.manifest.get("featurizer")
    return entry.get("model_dtype", "float32") if entry else "auto"


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
    import duckdb  # heavy: duckdb

    columns = "text, loss_spans" if spans else "text"
    with duckdb.connect() as con:
        con.register("examples", db.dataset("examples"))
        rows = con.sql(f"SELECT {columns} FROM examples ORDER BY example_id LIMIT {int(limit)}").to_arrow_table()
    if spans:
        return list(zip(rows.column("text").to_pylist(), rows.column("loss_spans").to_pylist()))
    return rows.column("text").to_pylist()


def load_featurizer(source: ModelSource, config: FeaturizerConfig, device: str = "cpu", uncorrected: bool = False,
                    sample: Callable[[], Sequence] | None = None, batch_size: int = 16, prepare=None,
                    task: Task | None = None):
    """(Featurizer, tokenizer) of `source` and `task` (featurizer/task.py; default: every token's
    loss) with the second moment config asks for. `sample` gives the training texts (or (text,
    loss spans) pairs) the 'estimated' correction averages the task's loss over (called only
    then). prepare: model -> model, given the model opened on the CPU (gradients/sharded.py)."""
    task = task or DEFAULT_TASK

    model, tokenizer = open_model(source, "cpu" if prepare else device)
    if prepare is not None:
        model = prepare(model)
    state = None
    if config.correction in ELEMENTWISE_OR_FACTORED:
        if source.optimizer_state is None:
            raise ParameterError("correction", f"{config.correction!r} needs the optimizer state; record it with the "
                                               "model ('trackstar-db init DB --model DIR --optimizer-state FILE'), or "
                                               "use correction 'estimated'", others=("correction",))
        state = _optimizer_state.load(source.optimizer_state)
    batches = None
    if config.correction == "estimated":
        rows = [r if isinstance(r, tuple) else (r, None) for r in (sample() if sample is not None else [])]
        if not rows:
            raise TrackstarError("correction 'estimated' needs training examples; ingest the corpus first")
        items = [task.encode_example(tokenizer, text, spans, config.max_length) for text, spans in rows]
        batches = [collate(items[i:i + batch_size], pad_id(tokenizer)) for i in range(0, len(items), batch_size)]
    moment = build_second_moment(config, model, state, batches, device)
    return Featurizer(model, config, moment, device, uncorrected=uncorrected, task=task), tokenizer


def database_featurizer(db, config: FeaturizerConfig, checkpoint: str | None = None, device: str = "cpu",
                        uncorrected: bool = False, model_dtype: str | None = None,
                        estimate_sample: int = ESTIMATE_SAMPLE, batch_size: int = 16, prepare=None):
    """load_featurizer for checkpoint `checkpoint` of db's model (None: the final one) and the
    database's task, in `model_dtype` (None: the dtype the stored vectors were made with)."""
    task = task_of(db.manifest)
    point = source(db, checkpoint).with_dtype(model_dtype or recorded_model_dtype(db))
    return load_featurizer(point, config, device, uncorrected, lambda: sample_texts(db, estimate_sample, task.masked),
                           batch_size, prepare, task)
