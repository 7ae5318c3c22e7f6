"""Data selection and self-influence, tried for real on the testbed.

One small fact world (WorldSpec below) with `--planted` contradictions (testbed/contradictions.py:
a sentence states a fact with the wrong object); the testbed model is trained on all of it,
featurized (train and query gradients), and R fitted (`trackstar-db fit`, which stores the
self-influence norms).

Self-influence: recall of the planted sentences among the top 5% by g R^-1 g, by |g|^2 and by
chance (0.05).

Data selection: the task is the facts of one relation (`--relation`), or of one frequency
bucket (`--bucket`, which then replaces the relation). Its facts are split in two
halves by fact id: the prompt0 queries of the first half are the task given to the selectors;
the second half is held out (never seen by a selector). Each selector keeps `--fraction` of the
training examples: trackstar (mean query vector, Database.select), bm25 (mean BM25 score over
the task's prompt+target texts) and a seeded random subset. A fresh model is trained on each
subset from the same initialisation (seed), the same tokenizer and the same number of steps, and
scored on the task: greedy accuracy and mean target loss on the given half and on the held-out
half (all three prompt templates), and accuracy on the other facts' prompt0 queries.

    python benchmarks/bench_select.py [--people 60] [--steps 400] [--fraction 0.2] [--rerank ekfac]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def score(model, tokenizer, queries: list[dict]) -> dict:
    """Greedy accuracy and mean target loss of `model` on queries (prompt, target)."""
    from trackstar_db.testbed.train import ProbeLosses, fact_accuracy

    prompts, targets = [q["prompt"] for q in queries], [q["target"] for q in queries]
    correct = fact_accuracy(model, tokenizer, prompts, targets)
    losses = ProbeLosses(tokenizer, prompts, targets)(model)
    return {"n": len(queries), "accuracy": sum(correct) / len(correct), "loss": sum(losses) / len(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_select"))
    parser.add_argument("--people", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--planted", type=int, default=36)
    parser.add_argument("--relation", default="place of birth")
    parser.add_argument("--bucket", type=int, default=None, help="task: the facts of this frequency bucket instead")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of every retraining")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--templates", choices=["prompt0", "all"], default="prompt0",
                        help="which query templates of the given facts form the task")
    parser.add_argument("--rerank", choices=["kfac", "ekfac"], default=None,
                        help="also select with trackstar's scan re-scored through the Kronecker factors (fit-factors "
                             "is run first), every example a candidate: the selector 'trackstar+KIND'")
    parser.add_argument("--reuse", action="store_true", help="reuse the world, model and R an earlier run left in --workdir")
    args = parser.parse_args()

    import torch

    from trackstar_db.api import Database
    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.selection.select import Task
    from trackstar_db.selection.self_influence import recall_at
    from trackstar_db.sources.corpus import ingest_corpus
    from trackstar_db.sources.facts import ingest_facts
    from trackstar_db.testbed.contradictions import plant_contradictions
    from trackstar_db.testbed.model import train_testbed
    from trackstar_db.testbed.train import TrainConfig, train_recorded
    from trackstar_db.testbed.world import WorldSpec, generate_world

    torch.set_num_threads(1)
    started = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    base = TrainConfig(seed=args.seed)
    done = args.workdir / "planted.json"
    if args.reuse and done.exists():  # the world, model, gradients and R of an earlier run with the same options
        db, planted = Database(args.workdir / "db"), set(json.loads(done.read_text()))
        n_examples = db.count("examples")
        step(f"reusing {args.workdir}: {n_examples:,} examples ({len(planted)} planted contradictions)")
    else:
        shutil.rmtree(args.workdir, ignore_errors=True)
        spec = WorldSpec(args.people, max(8, args.people // 4), 8, max(6, args.people // 6), 6, 10)
        world = generate_world(args.workdir / "world", seed=args.seed, spec=spec)
        planted = set(plant_contradictions(world, args.planted, seed=args.seed))
        db = Database.create(args.workdir / "db")
        ingest_corpus(db, [world.sentences_path], progress=False)
        ingest_facts(db, [world.facts_path], progress=False)
        n_examples = db.count("examples")
        step(f"world: {n_examples:,} examples ({len(planted)} planted contradictions), {db.count('facts')} facts; "
             f"training the testbed model on all of it")
        train_testbed(db, args.workdir / "model", {"seed": args.seed}, progress=False)
        for split in ("train", "queries"):
            ingest_gradients(db, {"dim": args.dim}, GradientJob(split, batch_size=32), progress=False)
        fit(db)
        done.write_text(json.dumps(sorted(planted)))
        step("featurized and fitted")

    # -- self-influence ------------------------------------------------------------------
    ranked = db.self_influence()
    by_norm = ranked.sort_by([("grad_sq_norm", "descending")])
    recall = {"g R^-1 g": recall_at(ranked, planted), "|g|^2": recall_at(by_norm, planted), "chance": 0.05}
    top = max(1, round(0.05 * ranked.num_rows))
    step(f"self-influence: recall of the {len(planted)} planted contradictions in the top 5% ({top} of "
         f"{ranked.num_rows}): " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))
    # distractors (sentences stating no fact: one-off random pairs) are outliers too; among the
    # sentences that state a fact (or were planted into one), the planted ones should lead
    import pyarrow as pa

    stated = set(db.table("ground_truth", columns=["example_id"]).column("example_id").to_pylist()) | planted
    facts_only = ranked.filter(pa.array([e in stated for e in ranked.column("example_id").to_pylist()]))
    recall["g R^-1 g among fact sentences"] = recall_at(facts_only, planted)
    recall["|g|^2 among fact sentences"] = recall_at(facts_only.sort_by([("grad_sq_norm", "descending")]), planted)
    ranks = [i for i, e in enumerate(ranked.column("example_id").to_pylist()) if e in planted]
    step(f"  among the {facts_only.num_rows} sentences stating a fact: g R^-1 g "
         f"{recall['g R^-1 g among fact sentences']:.3f}, |g|^2 {recall['|g|^2 among fact sentences']:.3f}; "
         f"median rank of a planted sentence {sorted(ranks)[len(ranks) // 2] + 1} of {ranked.num_rows}")

    # -- data selection ------------------------------------------------------------------
    facts = db.sql("SELECT fact_id, relation, frequency_bucket FROM facts ORDER BY fact_id").to_pylist()
    in_task = (lambda f: f["frequency_bucket"] == args.bucket) if args.bucket is not None else \
        (lambda f: f["relation"] == args.relation)
    task_facts = [f["fact_id"] for f in facts if in_task(f)]
    task_name = f"bucket {args.bucket}" if args.bucket is not None else repr(args.relation)
    given, held_out = set(task_facts[0::2]), set(task_facts[1::2])
    queries = db.sql("SELECT query_id, fact_id, template, prompt, target FROM queries ORDER BY query_id").to_pylist()
    task = Task(query_ids=tuple(q["query_id"] for q in queries if q["fact_id"] in given
                                and (args.templates == "all" or q["template"] == "prompt0")), template=None)
    evaluation = {
        "task given (prompt0)": [q for q in queries if q["fact_id"] in given and q["template"] == "prompt0"],
        "task given (all templates)": [q for q in queries if q["fact_id"] in given],
        "task held out (prompt0)": [q for q in queries if q["fact_id"] in held_out and q["template"] == "prompt0"],
        "task held out (all templates)": [q for q in queries if q["fact_id"] in held_out],
        "other facts (prompt0)": [q for q in queries if q["fact_id"] not in given | held_out
                                      and q["template"] == "prompt0"],
    }
    n_keep = round(args.fraction * n_examples)
    ids = db.table("examples", columns=["example_id"]).column("example_id").to_pylist()
    text_of = dict(zip(ids, db.table("examples", columns=["text"]).column("text").to_pylist()))
    subsets = {"random": random.Random(args.seed).sample(ids, n_keep)}
    for method in ("trackstar", "bm25"):
        chosen = db.select(task, fraction=args.fraction, method=method)
        subsets[method] = chosen.rows.column("example_id").to_pylist()
    if args.rerank:  # the second stage over every example: the accurate tier's own selection
        if (db.manifest.get("factors") or {}).get("kind") != "ekfac":  # EK-FAC factors serve both kinds
            db.fit_factors("ekfac", progress=False)
        chosen = db.select(task, fraction=args.fraction, method="trackstar", rerank=args.rerank, candidates=n_examples)
        subsets[f"trackstar+{args.rerank}"] = chosen.rows.column("example_id").to_pylist()
        step(f"selected with trackstar + {args.rerank} over all {n_examples:,} examples")
    facts_of = {}
    for row in db.sql("SELECT example_id, fact_id FROM ground_truth").to_pylist():
        facts_of.setdefault(row["example_id"], set()).add(row["fact_id"])

    def coverage(subset) -> dict:
        """Given and held-out facts with at least one stating sentence in the subset, and those sentences."""
        hit = set().union(*(facts_of.get(i, set()) for i in subset))
        return {"given_facts_covered": len(hit & given), "held_out_facts_covered": len(hit & held_out),
                "given_fact_sentences": sum(1 for i in subset if facts_of.get(i, set()) & given)}
    n_relation = sum(1 for i in facts_of if facts_of[i] & (given | held_out))
    step(f"task: {task_name} ({args.templates}), {len(given)} facts given ({len(task.query_ids)} queries), {len(held_out)} held out; "
         f"{n_relation} examples state a fact of it; each selector keeps {n_keep} of {n_examples}")

    from trackstar_db.models.load import open_model
    from trackstar_db.store.checkpoints import source

    model, tokenizer = open_model(source(db).with_dtype("float32"))
    results = {"full data (reference)": {"n_examples": n_examples, **{k: score(model, tokenizer, v)
                                                                       for k, v in evaluation.items()}}}
    config = TrainConfig(seed=args.seed, max_steps=args.steps, epochs=10**6, warmup=min(50, args.steps // 10))
    for name, subset in subsets.items():
        texts = [text_of[i] for i in subset]
        model = train_recorded(texts, config, tokenizer, order_seed=args.seed, on_step=lambda *a: None)
        on_task = sum(1 for i in subset if facts_of.get(i, set()) & (given | held_out))
        results[name] = {"n_examples": len(subset), "task_examples": on_task, **coverage(subset),
                         **{k: score(model, tokenizer, v) for k, v in evaluation.items()}}
        step(f"retrained on {name}: {len(subset)} examples, {on_task} of them state a fact of the task; "
             + ", ".join(f"{k} {v}" for k, v in coverage(subset).items()))

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine load: {load}\nretraining: {args.steps} steps, batch {base.batch_size}, seed {args.seed}, "
          f"{base.n_layer} layers x {base.d_model}; selection {args.fraction:.0%} ({n_keep} examples)")
    header = f"{'subset':<22} {'task ex.':>8}"
    for key in evaluation:
        header += f" | {key[:30]:>30}"
    print(header)
    for name, row in results.items():
        line = f"{name:<22} {row.get('task_examples', n_relation):>8}"
        for key in evaluation:
            line += f" | {'acc %.3f  loss %.3f' % (row[key]['accuracy'], row[key]['loss']):>30}"
        print(line)
    for key in ("task given (prompt0)", "task held out (all templates)"):
        verdict = "beats" if results["trackstar"][key]["accuracy"] > results["random"][key]["accuracy"] else \
            "does NOT beat"
        print(f"{key}: trackstar {verdict} random (accuracy {results['trackstar'][key]['accuracy']:.3f} vs "
              f"{results['random'][key]['accuracy']:.3f}; loss {results['trackstar'][key]['loss']:.3f} vs "
              f"{results['random'][key]['loss']:.3f})")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"recall_at_5pct": recall, "selection": results, "load": load,
                                        "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
