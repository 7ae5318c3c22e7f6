"""lm-embedding: MRR and recall@10 (prompt0 queries with ground truth, top 100) per layer.

    python benchmarks/lm_embedding_layers.py DB      # a database with a trained model (e.g. the demo's)

Writes one run per layer (lm-input/middle/final and lm-0..n by index) into DB's retrievals.
"""
import sys, time, torch
torch.set_num_threads(1)
from trackstar_db import connect
from trackstar_db.retrieval import lm_embedding
from trackstar_db.retrieval.runs import _queries, _query_texts
db = connect(sys.argv[1])
rows = _queries(db, "prompt0")
qids, texts = rows.column("query_id").to_pylist(), _query_texts(rows, "prompt+target")
from trackstar_db.models.load import open_model
from trackstar_db.store.checkpoints import source
model, _ = open_model(source(db))
n = model.config.num_hidden_layers
for layer in ["input", "middle", "final"] + list(range(0, n + 1)):
    t = time.time()
    result = lm_embedding.top_k(db, texts, 100, layer=layer)
    db.replace_run(f"lm-{layer}", "lm-embedding", {"layer": str(layer)}, result.to_arrow(qids, f"lm-{layer}", "lm-embedding"))
    print(layer, "index", lm_embedding.layer_index(n, layer), f"{time.time()-t:.1f}s", flush=True)
from trackstar_db.evaluation.sql import format_table
print(format_table(db.sql("""
WITH truth AS (SELECT DISTINCT fact_id, example_id FROM ground_truth),
q AS (SELECT query_id, fact_id FROM queries WHERE template = 'prompt0' AND fact_id IN (SELECT fact_id FROM truth)),
first AS (SELECT r.run_id, q.query_id, min(r.rank) FILTER (WHERE t.example_id IS NOT NULL) AS fr
          FROM retrievals r JOIN q USING (query_id) LEFT JOIN truth t ON t.fact_id = q.fact_id AND t.example_id = r.example_id
          WHERE r.kind = 'proponent' AND r.run_id LIKE 'lm-%' GROUP BY ALL)
SELECT run_id, count(*) AS n, round(avg(coalesce(1.0/fr, 0)), 3) AS mrr, round(avg(coalesce(fr <= 10, false)::INT), 3) AS recall10
FROM first GROUP BY run_id ORDER BY run_id""")))
