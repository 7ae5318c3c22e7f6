-- The method-by-metric table: one row per retrieval run.
-- uses: attribution_per_query, tail_patch_per_query
--
--   n_queries          fact queries with >= 1 ground-truth example (the MRR/recall denominator)
--   n_no_ground_truth  fact queries whose fact has no ground-truth example (counted apart)
--   list_length        longest proponent list of the run
--   mrr, recall_at_10  as in mrr.sql and recall.sql
--   tailpatch_at_k     as in tail_patch.sql (percentage points); NULL when not measured
-- Rows follow the paper's order: baselines, then the ablation ladder, then other methods.
WITH attribution AS (
    SELECT run_id, method,
           count(*) FILTER (WHERE has_ground_truth) AS n_queries,
           count(*) FILTER (WHERE NOT has_ground_truth) AS n_no_ground_truth,
           max(list_length) AS list_length,
           avg(reciprocal_rank) FILTER (WHERE has_ground_truth) AS mrr,
           avg(CAST(coalesce(first_correct_rank <= 10, false) AS DOUBLE)) FILTER (WHERE has_ground_truth)
               AS recall_at_10
    FROM attribution_per_query
    GROUP BY run_id, method
),
patch AS (
    SELECT run_id, count(*) AS n_tailpatch_queries,
           avg(tailpatch_at_1) AS tailpatch_at_1, avg(tailpatch_at_3) AS tailpatch_at_3,
           avg(tailpatch_at_5) AS tailpatch_at_5, avg(tailpatch_at_10) AS tailpatch_at_10
    FROM tail_patch_per_query
    GROUP BY run_id
)
SELECT a.method, a.run_id, a.n_queries, a.n_no_ground_truth, a.list_length, a.mrr, a.recall_at_10,
       coalesce(p.n_tailpatch_queries, 0) AS n_tailpatch_queries,
       p.tailpatch_at_1, p.tailpatch_at_3, p.tailpatch_at_5, p.tailpatch_at_10
FROM attribution a
LEFT JOIN patch p USING (run_id)
ORDER BY coalesce(nullif(list_position(['bm25', 'embedding', 'grad-dot', 'grad-cos', 'trak', 'opt-cos',
                                       'r-train', 'trackstar'], a.method), 0), 99),
         a.method, a.run_id
