-- The method-by-metric table: one row per retrieval run, the 'all' rows of run_metrics.sql
-- (mrr.sql, recall.sql and tail_patch_metrics.sql side by side; columns explained there),
-- in the order of the method list.
-- uses: run_metrics
SELECT method, run_id, n_queries, n_no_ground_truth, list_length, mrr, recall_at_10, n_tailpatch_queries,
       tailpatch_at_1, tailpatch_at_3, tailpatch_at_5, tailpatch_at_10
FROM run_metrics
WHERE split = 'all'
ORDER BY position, method, run_id
