-- The method-by-metric table split by fact frequency bucket and by model correctness:
-- the split rows of mrr.sql, recall.sql and tail_patch_metrics.sql side by side.
-- uses: mrr, recall, tail_patch_metrics
--
-- split: 'frequency_bucket' (0 = never stated .. 5 = most frequent) or 'model_correct'
-- (the model's greedy answer equals the target: the predictions table); split_value: the
-- bucket, 'true'/'false', or 'unknown' when not known. Order as in summary.sql.
SELECT m.method, m.run_id, m.split, m.split_value, m.n_queries, m.n_no_ground_truth, m.mrr, r.recall_at_10,
       coalesce(t.n_queries, 0) AS n_tailpatch_queries,
       t.tailpatch_at_1, t.tailpatch_at_3, t.tailpatch_at_5, t.tailpatch_at_10
FROM mrr m
JOIN recall r USING (run_id, split, split_value)
LEFT JOIN tail_patch_metrics t USING (run_id, split, split_value)
LEFT JOIN method_order o ON o.method = m.method
WHERE m.split <> 'all'
ORDER BY m.split, coalesce(o.position, 99), m.method, m.run_id, m.split_value
