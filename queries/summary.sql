-- The method-by-metric table: one row per retrieval run, the 'all' rows of run_metrics.sql
-- (mrr.sql, recall.sql and tail_patch_metrics.sql side by side; columns explained there),
-- in the order of the method list, and the run's LDS (lds.sql) under the validation with the
-- most retrained models (NULL when the database holds no validation); lds_partial: that LDS
-- summed a stored top-k, not every example (lds.sql: partial; 'trackstar-db validate' scores them all).
-- uses: run_metrics, lds
WITH chosen AS (
    SELECT validation FROM lds GROUP BY validation ORDER BY max(n_subsets) DESC, validation LIMIT 1
)
SELECT r.method, r.run_id, r.n_queries, r.n_no_ground_truth, r.list_length, r.mrr, r.recall_at_10,
       r.n_tailpatch_queries, r.tailpatch_at_1, r.tailpatch_at_3, r.tailpatch_at_5, r.tailpatch_at_10, l.lds,
       l.partial AS lds_partial
FROM run_metrics r
LEFT JOIN (SELECT run_id, lds, partial FROM lds WHERE validation = (SELECT validation FROM chosen)) l USING (run_id)
WHERE r.split = 'all'
ORDER BY r.position, r.method, r.run_id
