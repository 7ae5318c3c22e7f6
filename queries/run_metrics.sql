-- run_metrics: one row per (retrieval run, split, split_value) with the rows of mrr.sql,
-- recall.sql and tail_patch_metrics.sql side by side, and the method's display position;
-- summary.sql and summary_by_split.sql select from it (each metric is defined in its own file only).
-- uses: mrr, recall, tail_patch_metrics
--
--   n_queries          fact queries with >= 1 ground-truth example (the MRR/recall denominator)
--   n_no_ground_truth  fact queries whose fact has no ground-truth example (counted apart)
--   list_length        longest proponent list of the run
--   tailpatch_at_k     percentage points; NULL when not measured
--   position           the method's place in method_order (the one method list,
--                      trackstar_db/ladder.py: baselines, the ablation ladder, TracIn-CP); 99 when not listed
SELECT m.method, m.run_id, m.split, m.split_value, m.n_queries, m.n_no_ground_truth, m.list_length, m.mrr,
       r.recall_at_10, coalesce(t.n_queries, 0) AS n_tailpatch_queries,
       t.tailpatch_at_1, t.tailpatch_at_3, t.tailpatch_at_5, t.tailpatch_at_10,
       coalesce(o.position, 99) AS position
FROM mrr m
JOIN recall r USING (run_id, split, split_value)
LEFT JOIN tail_patch_metrics t USING (run_id, split, split_value)
LEFT JOIN method_order o ON o.method = m.method
