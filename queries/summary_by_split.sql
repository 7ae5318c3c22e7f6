-- The method-by-metric table split by fact frequency bucket and by model correctness:
-- the split rows of run_metrics.sql (mrr.sql, recall.sql and tail_patch_metrics.sql side by side).
-- uses: run_metrics
--
-- split: 'frequency_bucket' (0 = never stated .. 5 = most frequent) or 'model_correct'
-- (the model's greedy answer equals the target: the predictions table); split_value: the
-- bucket, 'true'/'false', or 'unknown' when not known. Order as in summary.sql.
SELECT method, run_id, split, split_value, n_queries, n_no_ground_truth, mrr, recall_at_10,
       n_tailpatch_queries, tailpatch_at_1, tailpatch_at_3, tailpatch_at_5, tailpatch_at_10
FROM run_metrics
WHERE split <> 'all'
ORDER BY split, position, method, run_id, split_value
