"""The one handle users hold: `trackstar_db.connect(path)` (or `Database.create(path)`) returns a
`Database`, the store's handle (store/database.py: tables, manifest, writes) with the verbs a
user calls. Each verb is one call into the stage that does the work, and each command of the
CLI is one verb plus formatting:

    db = trackstar_db.connect("demo-db")
    db.ingest_corpus(files); db.ingest_facts(files)      # sources/
    db.ingest_gradients("train"); db.fit()               # gradients/
    db.retrieve("trackstar")                             # retrieval/runs.py, stored queries
    db.query("The capital of France is", "Paris")        # retrieval/adhoc.py, one prompt
    db.tail_patch(["trackstar"])                         # tailpatch/
    db.evaluate(by="bucket")                             # report/analysis.py, queries/*.sql
    db.sql("SELECT ..."); db.check(); db.info(); db.rebuild_bm25()
    db.attach(ref); db.train(out_dir)                    # verbs/model.py
    db.export_run(run, out); db.import_run(file, method) # verbs/exchange.py
    db.write_report(out_dir); db.build_index(method); db.plan(dim)  # verbs/reporting.py, verbs/scale.py
    db.simfluence_record(); db.simfluence_fit(); db.simulate(file); db.simfluence_evaluate()

Everything returns Arrow tables or plain dicts; progress bars follow trackstar_db/progress.py
(none unless stderr is a terminal or `progress=True`). Library errors name parameters
(errors.ParameterError); the CLI names its flags. The store's own code never needs these
verbs, so it never imports them.
"""

from __future__ import annotations

import json
from dataclasses import replace as replace_fields
from pathlib import Path

import pyarrow as pa

from trackstar_db import defaults
from trackstar_db.devices import resolve_device
from trackstar_db.distributed.objectstore import is_uri, normal_uri, open_remote
from trackstar_db.errors import ParameterError
from trackstar_db.models.cache import ModelCache
from trackstar_db.option_checks import K, check
from trackstar_db.progress import quiet_transformers, wanted
from trackstar_db.selection.ledger import ledger
from trackstar_db.selection.self_influence import self_influence
from trackstar_db.store import database as _store
from trackstar_db.store.check import check as check_database
from trackstar_db.store.checkpoints import DEFAULT, attached
from trackstar_db.store.gradient_table import parse_table_name
from trackstar_db.validate.lds import lds_table
from trackstar_db.validate.options import ValidateOptions
from trackstar_db.validate.qld import QLDOptions, query_loss_difference
from trackstar_db.validate.runner import loss_summary, run_validation
from trackstar_db.validate.scores import score_runs
from trackstar_db.verbs.exchange import ExchangeVerbs
from trackstar_db.verbs.model import ModelVerbs
from trackstar_db.verbs.reporting import ReportVerbs
from trackstar_db.verbs.scale import ScaleVerbs
from trackstar_db.verbs.simfluence import SimfluenceVerbs

ENGINES = ("local", "ray")


def _engine(engine: str, command: str) -> dict:
    """Keyword arguments that run `command` ('fit' or 'retrieve') on `engine` (Ray: trackstar_db/distributed)."""
    if engine not in ENGINES:
        raise ParameterError("engine", f"must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "local":
        return {}
    if command == "fit":
        from trackstar_db.distributed import fit as ray_fit  # heavy: torch

        return {"passes": ray_fit}
    from trackstar_db.distributed.scan import score_table  # heavy: torch

    return {"scorer": score_table}


class Database(ModelVerbs, ExchangeVerbs, ReportVerbs, ScaleVerbs, SimfluenceVerbs, _store.Store):
    """An open trackstar-db directory, with its models kept warm between calls (`models`)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.models = ModelCache()  # the warm models of query, tokens, verify, rerank and serve (models/cache.py)

    # -- building -----------------------------------------------------------------------
    def ingest_corpus(self, files, text_field: str = "text", id_field: str | None = None, skip_bad: bool = False,
                      batch_size: int = defaults.CORPUS_COMMIT_ROWS, *, prompt_field: str | None = None,
                      completion_field: str | None = None, messages_field: str | None = None, chat_template=None,
                      progress: bool | None = None):
        """Add training examples (JSON lines, Parquet, Arrow, or directories of them) to `examples`
        and the BM25 index (sources/corpus.py); prompt_field + completion_field: the loss on the
        completion only; messages_field (+ chat_template): chat records, the loss on the assistant
        turns. Returns its IngestReport (added, already_present, rejected)."""
        from trackstar_db.sources.corpus import CorpusOptions, ingest_corpus  # heavy: tantivy

        options = CorpusOptions(text_field, id_field, skip_bad, batch_size, prompt_field, completion_field,
                                messages_field, chat_template)
        return ingest_corpus(self, files, options, progress)

    def ingest_facts(self, files, skip_bad: bool = False, progress: bool | None = None):
        """Add facts and their queries, rebuild ground_truth (sources/facts.py); returns its FactReport."""
        from trackstar_db.sources.facts import ingest_facts  # heavy: duckdb

        return ingest_facts(self, files, skip_bad=skip_bad, progress=progress)

    def ingest_gradients(self, split: str = "train", *, dim: int | None = None, seed: int | None = None,
                         correction: str | None = None, combine: str | None = None, dtype: str | None = None,
                         engine: str = "local", shard_model: bool = False, progress: bool | None = None,
                         **job) -> dict:
        """Featurize the training examples or the queries into gradient tables (resumable).
        dim, seed, correction, combine: the featurizer settings of a first run (later runs must
        match the manifest); dtype: the vectors' storage dtype (default: the stored one, else
        float32); `job`: the rest of gradients.worker.GradientJob (batch_size, device, shard,
        batch_tokens, model_dtype, pipeline, checkpoint, limit, ...); engine 'ray': Ray actors,
        each resolving `device` itself; shard_model: the model's parameters sharded (FSDP2) over
        the torchrun/Slurm processes (gradients/sharded.py). Returns the totals (rows, tokens, seconds, tables)."""
        from trackstar_db.gradients.worker import GradientJob, ingest_gradients  # heavy: torch

        if engine not in ENGINES:
            raise ParameterError("engine", f"must be one of {', '.join(ENGINES)}, not {engine!r}")
        settings = {"dim": dim, "seed": seed, "correction": correction, "combine": combine}
        stored = (self.manifest.get("featurizer") or {}).get("dtype")
        job = GradientJob(split, dtype=dtype or stored or "float32", **job)
        if shard_model:
            if engine != "local" or job.shard != (0, 1):
                raise ParameterError("shard_model", "takes its shards from the launcher's ranks; drop shard and the "
                                                    "Ray engine")
            from trackstar_db.gradients.worker import ingest_sharded  # heavy: torch

            return ingest_sharded(self, settings, job, progress=wanted(progress))
        if engine == "local":
            return ingest_gradients(self, settings, job, progress=wanted(progress))
        if job.checkpoint:
            raise ParameterError("checkpoint", "the Ray engine featurizes the final checkpoint only; "
                                               "featurize an attached checkpoint with the local engine")
        from trackstar_db.distributed.ingest import ingest_gradients as ray_ingest  # heavy: torch

        return ray_ingest(self, settings, replace_fields(job, device="cpu"), device=job.device, progress=wanted(progress))

    def fit(self, mix: str = "task", kind: str = "block", damping: float = defaults.DAMPING,
            crossing_k: int | None = None, template: str | None = defaults.TEMPLATE, engine: str = "local",
            shrinkage="prior"):
        """Fit R_train and the task-mixed R (+ whitened row norms) from the stored gradients
        (gradients/fit.py; shrinkage: 'prior', 'ledoit-wolf', 'none' or a fixed rho); returns its FitReport
        (preconditioners, notes)."""
        from trackstar_db.gradients.fit import fit  # heavy: torch

        return fit(self, mix, kind, damping, crossing_k, template, **_engine(engine, "fit"), shrinkage=shrinkage)

    # -- using --------------------------------------------------------------------------
    def retrieve(self, method: str, k: int = defaults.K_RETRIEVE, run_id: str | None = None, replace: bool = False,
                 template: str | None = defaults.TEMPLATE, device: str = "cpu", query_text: str = "prompt+target",
                 ann=None, engine: str = "local", rerank: str | None = None, candidates: int = defaults.CANDIDATES) -> tuple[str, pa.Table]:
        """A stored run of `method` over the queries of `template` (None: all): (run id, its rows).
        rerank ('kfac' | 'ekfac'): `method`'s top `candidates` per query re-scored through the
        Kronecker factors (retrieval/rerank.py); the run is named METHOD-KIND by default and the
        returned rows carry the first stage's score and rank too."""
        from trackstar_db.retrieval.runs import RetrieveOptions, retrieve  # heavy: torch

        options = RetrieveOptions(k=k, template=template, device=resolve_device(device), query_text=query_text, ann=ann,
                                  rerank=rerank, candidates=candidates)
        return retrieve(self, method, options, run_id, replace, **_engine(engine, "retrieve"))

    def tail_patch(self, run_ids, k: int = defaults.K_TAIL_PATCH, max_queries: int | None = None,
                   device: str = "cpu") -> pa.Table:
        """Influence of each run's top-k proponents by one optimizer step (tailpatch/runs.py)."""
        from trackstar_db.tailpatch.runs import tail_patch_runs  # heavy: torch

        return tail_patch_runs(self, list(run_ids), k, max_queries, resolve_device(device))

    def check(self) -> pa.Table:
        """Every problem of the database (table, problem, repair); empty when it is whole."""
        return check_database(self)

    def rebuild_bm25(self) -> dict:
        """Make the BM25 index hold exactly the stored examples, under the writer lock:
        {'changed': documents added or removed, 'documents': the index's count}."""
        from trackstar_db.store.bm25 import BM25Index, sync_bm25  # heavy: tantivy

        with self.writer("rebuild-bm25"):
            BM25Index(self.path)  # creates an empty index where the directory was deleted
            changed = sync_bm25(self, full=True)
        return {"changed": changed, "documents": BM25Index(self.path).count()}

    def info(self) -> dict:
        """What the database holds: path, format, model, featurizer settings, each table's rows, and
        each checkpoint TracIn-CP sums over with its learning rate, path and gradient tables."""
        with self.reading():
            names = self.table_names()
            model = self.manifest.get("model")
            points = ({DEFAULT: model} if model else {}) | attached(self)
            tables = {name: [] for name in points}
            for name in names:
                parsed = parse_table_name(name)
                if parsed:
                    tables.setdefault(parsed[2] or DEFAULT, []).append(name)
            return {"path": str(self.path), "format_version": self.manifest["format_version"], "model": model,
                    "featurizer": self.manifest.get("featurizer"), "tables": {name: self.count(name) for name in names},
                    "checkpoints": {name: {"lr": entry.get("optimizer_lr"), "path": entry["path"], "tables": tables[name]}
                                    for name, entry in points.items()}}

    def sql(self, text: str, vectors: bool = False) -> pa.Table:
        """Run one read-only SQL statement over the tables (DuckDB); the result as Arrow."""
        from trackstar_db.evaluation.sql import ReadOnlySQL  # heavy: duckdb

        with self.reading(), ReadOnlySQL(self.views(vectors)) as con:
            return con.run(text)

    def evaluate(self, by: str = "method") -> pa.Table:
        """The method-by-metric table (queries/summary*.sql); by='bucket' or 'correct' splits it."""
        from trackstar_db.report.analysis import evaluation  # heavy: duckdb

        with self.reading():
            return evaluation(self, by)

    def query(self, prompt: str, target: str, k: int = defaults.K_QUERY, method: str | None = None,
              device: str = "cpu", ann=None, verify: bool = False, rerank: str | None = None,
              candidates: int = defaults.CANDIDATES, control_target: str | None = None) -> pa.Table:
        """Which examples made the model say `target` after `prompt`? (kind, rank, example_id,
        score, method, text, and evidence: retrieval/evidence.py). method None: the best rung this
        database can serve. verify: measure each proponent's tail-patch effect now (delta_p, label).
        rerank ('kfac' | 'ekfac'): the method's top `candidates` re-scored from full gradients
        through the Kronecker factors; first_score, first_rank, first_method keep the first stage.
        control_target: why `target` rather than it (loss(target) - loss(control), gradient methods).
        Quiet: no progress bar, transformers' included, unless stderr is a terminal (progress.py)."""
        with quiet_transformers(), self.reading():
            return self.prompt_attributor(device).attribute(prompt, target, method=method, k=k, ann=ann,
                                                            verify=verify, rerank=rerank, candidates=candidates,
                                                            control_target=control_target)

    def token_contributions(self, prompt: str, target: str, example_id: str, method: str | None = None,
                            device: str = "cpu") -> pa.Table:
        """Each token's part of `example_id`'s score for (prompt, target); the parts sum to the
        score (position, token_id, token, start, end, contribution; retrieval/tokens.py)."""
        from trackstar_db.retrieval.tokens import token_contributions  # heavy: torch

        with self.reading():
            return token_contributions(self, prompt, target, example_id, method, device=device)

    def validate(self, options=None, bootstrap: int = 1000, report=None, second_stage=None, **settings) -> pa.Table:
        """Counterfactual validation (validate/): retrain on random subsets the validation lacks
        (options: validate.options.ValidateOptions, or its fields as keywords: models, fraction,
        seed, name, train_command, schedule, ...), score every example for each retrieval run's
        validated queries (validate/scores.py; second_stage: a validate.scores.SecondStage
        re-scoring runs' top candidates), then the LDS of every run with a bootstrap interval
        (run_id, method, validation, n_queries, n_undefined, n_subsets, lds, n_scored, partial,
        lds_low, lds_high)."""
        options = options or ValidateOptions(**settings)
        options = replace_fields(options, device=resolve_device(options.device))
        trained = run_validation(self, options)
        score_runs(self, options.name, device=options.device, second_stage=second_stage, report=report)
        if report is not None:
            report(f"validation {options.name}: trained {len(trained)} model(s) now, "
                   f"{options.models - len(trained)} already stored")
            losses = loss_summary(self, options.name)
            if losses["retrained"] is not None:
                attributed = "not recorded" if losses["attributed"] is None else f"{losses['attributed']:.3f}"
                report(f"mean target loss: retrained models {losses['retrained']:.3f}, attributed model {attributed}")
        table = lds_table(self, options.name, bootstrap)
        if report is not None and table.num_rows == 0:
            report("no retrieval run covers these queries yet: run 'trackstar-db retrieve', then validate again "
                   "(nothing is retrained)")
        return table

    def query_loss_difference(self, run: str, queries: int = 4, top: float = 0.1, seed: int = 0,
                              random_control: bool = True, bootstrap: int = 1000, report=None,
                              **settings) -> pa.Table:
        """The QLD check (validate/qld.py): per query of `run`, the rise of its target loss when
        retrained without the run's top `top` share of examples, and without as many random ones;
        settings: the trainer's (ValidateOptions: schedule, steps, device, template...). The summary
        (mean rises with bootstrap intervals) is the JSON schema metadata b'summary'."""
        table, summary = query_loss_difference(self, QLDOptions(run, queries, top, seed, random_control, bootstrap),
                                               ValidateOptions(**settings), progress=report)
        return table.replace_schema_metadata({"summary": json.dumps(summary)})

    def select(self, task=None, *, top: int | None = None, fraction: float | None = None, drop_opponents: bool = False,
               method: str | None = None, aggregate: str = "mean-vector", ann=None, device: str = "cpu", out=None,
               rerank: str | None = None, candidates: int = defaults.CANDIDATES):
        """Training examples for a task (selection.select.Task): the top N or fraction by mean score
        against its queries, or all but the most harmful; a Selection (rows: Arrow), written to `out`.
        rerank ('kfac' | 'ekfac'): the best `candidates` re-scored through the Kronecker factors."""
        from trackstar_db.selection.select import select  # heavy: torch

        with self.reading():
            return select(self, task, top=top, fraction=fraction, drop_opponents=drop_opponents, method=method,
                          aggregate=aggregate, ann=ann, device=resolve_device(device), out=out, rerank=rerank,
                          candidates=candidates)

    def self_influence(self, variant: str = "corrected", mix: str = "train", k: int | None = None) -> pa.Table:
        """Each training example's g R^-1 g and |g|^2 (stored by fit), highest first; the first k."""
        check("k", K, k)
        with self.reading():
            ranked = self_influence(self, variant, mix)
        return ranked if k is None else ranked.slice(0, k)

    def contribution(self, by: str = "source", n_boot: int = 1000, seed: int = 0) -> pa.Table:
        """The contribution ledger: each run's proponent share, score and tail-patch effect per value
        of one metadata column of the examples, with seeded bootstrap intervals over queries."""
        with self.reading():
            return ledger(self, by, n_boot=n_boot, seed=seed)

    def fit_factors(self, kind: str = "ekfac", damping: float = 0.1, fraction: float = 1.0, seed: int = 0,
                    batch_size: int = 16, device: str = "cpu", progress: bool | None = None,
                    fisher: str = defaults.FISHER):
        """Fit the Kronecker-factored curvature (K-FAC, or EK-FAC with its eigenvalue correction) from
        the training examples (all or a seeded `fraction`), resumable (gradients/factors.py);
        damping: lambda = damping x mean eigenvalue per matrix; fisher: 'sampled' (labels drawn from
        the model, seeded) or 'empirical' (the data's labels). Returns its FactorReport."""
        from trackstar_db.gradients.factors import fit_factors  # heavy: torch

        return fit_factors(self, kind, damping, fraction, seed, batch_size, resolve_device(device), progress=progress,
                           fisher=fisher)

    def factor_scores(self, pairs, example_ids=None, kind: str | None = None, device: str = "cpu"):
        """(example ids, scores [len(pairs), n]): g_q^T (F + lambda)^-1 g_z of (prompt, target)
        queries against `example_ids` (None: every example) through the stored factors
        (retrieval/rerank.score_examples)."""
        from trackstar_db.retrieval.rerank import score_examples  # heavy: torch

        with self.reading():
            return score_examples(self, list(pairs), example_ids, kind, resolve_device(device))

    remote = None  # distributed.objectstore.Remote of a database opened at an object-store URI

    def close(self) -> None:
        """Upload what this handle changed to its object-store home (nothing for a local directory)."""
        if self.remote is not None:
            self.remote.push()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()

    def prompt_attributor(self, device: str = "cpu"):
        """The one-prompt attributor (retrieval.adhoc.PromptAttributor) on `device`; its models are
        this handle's warm ones (`models`)."""
        from trackstar_db.retrieval.adhoc import PromptAttributor  # heavy: torch

        return PromptAttributor(self, device)


def connect(path: str | Path) -> Database:
    """Open an existing trackstar-db database: a directory, or an object-store URI (s3://bucket/db;
    endpoint and credentials from the AWS_* environment). A database at a URI is read through a
    local cache of its small files (manifest, BM25, R; TRACKSTAR_CACHE) with its tables read in
    place; what a handle changes there is uploaded by `db.close()` or at the end of
    `with trackstar_db.connect(uri) as db:` (distributed/objectstore.py)."""
    if is_uri(path):
        return open_remote(normal_uri(path), handle=Database)
    return Database.open(path)
