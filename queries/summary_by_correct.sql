-- The method-by-metric table split by model_correct: one row per retrieval run and model_correct value.
-- uses: attribution_per_query, tail_patch_per_query
--
-- Same definitions as summary.sql (MRR over queries with >= 1 ground-truth example; recall@10
-- as a hit rate; tail-patch in percentage points), computed within each model_correct group.
-- model_correct: whether the model's greedy answer equals the target (predictions table); NULL when not scored.
WITH attribution AS (
    SELECT run_id, method, model_correct,
           count(*) FILTER (WHERE has_ground_truth) AS n_queries,
           count(*) FILTER (WHERE NOT has_ground_truth) AS n_no_ground_truth,
           avg(reciprocal_rank) FILTER (WHERE has_ground_truth) AS mrr,
           avg(CAST(coalesce(first_correct_rank <= 10, false) AS DOUBLE)) FILTER (WHERE has_ground_truth)
               AS recall_at_10
    FROM attribution_per_query
    GROUP BY run_id, method, model_correct
),
patch AS (
    SELECT run_id, model_correct, count(*) AS n_tailpatch_queries,
           avg(tailpatch_at_1) AS tailpatch_at_1, avg(tailpatch_at_3) AS tailpatch_at_3,
           avg(tailpatch_at_5) AS tailpatch_at_5, avg(tailpatch_at_10) AS tailpatch_at_10
    FROM tail_patch_per_query
    GROUP BY run_id, model_correct
)
SELECT a.method, a.run_id, a.model_correct, a.n_queries, a.n_no_ground_truth, a.mrr, a.recall_at_10,
       coalesce(p.n_tailpatch_queries, 0) AS n_tailpatch_queries,
       p.tailpatch_at_1, p.tailpatch_at_3, p.tailpatch_at_5, p.tailpatch_at_10
FROM attribution a
LEFT JOIN patch p ON p.run_id = a.run_id AND p.model_correct IS NOT DISTINCT FROM a.model_correct
ORDER BY coalesce(nullif(list_position(['bm25', 'embedding', 'grad-dot', 'grad-cos', 'trak', 'opt-cos',
                                       'r-train', 'trackstar'], a.method), 0), 99),
         a.method, a.run_id, a.model_correct
