"""Simfluence held-out evaluation at several ridge values, on one split of a database's recorded runs.

    python benchmarks/simfluence_ridge_sweep.py DB 0.01 0.1 1 10 100 1000

(the last quarter of the runs held out, as `trackstar-db simfluence eval DB --ridge R` does.)
"""
import sys, time
from trackstar_db import connect
from trackstar_db.simfluence.data import load_runs
from trackstar_db.simfluence.evaluate import evaluate_runs, split_runs
from trackstar_db.evaluation.sql import format_table
db = connect(sys.argv[1])
runs = load_runs(db)
train, held = split_runs([r.run_id for r in runs.runs], 0.25)
print("train", len(train), "held", len(held), "probes", len(runs.query_ids), "steps", len(runs.runs[0].batches))
for ridge in [float(x) for x in sys.argv[2:]]:
    t = time.time()
    table = evaluate_runs(runs, train, held, ridge)
    print(f"ridge {ridge} ({time.time()-t:.1f}s)")
    print(format_table(table, "table"), flush=True)
