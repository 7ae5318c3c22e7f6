-- The method-by-metric table split by fact frequency bucket and by model correctness.
-- uses: attribution_per_query, tail_patch_per_query
--
-- Same definitions as summary.sql (MRR over queries with >= 1 ground-truth example; recall@10
-- as a hit rate; tail-patch in percentage points), computed within each group.
-- split: 'frequency_bucket' (0 = never stated .. 5 = most frequent) or 'model_correct'
-- (the model's greedy answer equals the target: the predictions table); split_value: the
-- bucket, 'true'/'false', or 'unknown' when not known.
WITH attribution AS (
    SELECT run_id, method,
           CASE WHEN grouping(frequency_bucket) = 0 THEN 'frequency_bucket' ELSE 'model_correct' END AS split,
           CASE WHEN grouping(frequency_bucket) = 0 THEN coalesce(CAST(frequency_bucket AS VARCHAR), 'unknown')
                ELSE coalesce(CAST(model_correct AS VARCHAR), 'unknown') END AS split_value,
           count(*) FILTER (WHERE has_ground_truth) AS n_queries,
           count(*) FILTER (WHERE NOT has_ground_truth) AS n_no_ground_truth,
           avg(reciprocal_rank) FILTER (WHERE has_ground_truth) AS mrr,
           avg(CAST(coalesce(first_correct_rank <= 10, false) AS DOUBLE)) FILTER (WHERE has_ground_truth)
               AS recall_at_10
    FROM attribution_per_query
    GROUP BY GROUPING SETS ((run_id, method, frequency_bucket), (run_id, method, model_correct))
),
patch AS (
    SELECT run_id,
           CASE WHEN grouping(frequency_bucket) = 0 THEN 'frequency_bucket' ELSE 'model_correct' END AS split,
           CASE WHEN grouping(frequency_bucket) = 0 THEN coalesce(CAST(frequency_bucket AS VARCHAR), 'unknown')
                ELSE coalesce(CAST(model_correct AS VARCHAR), 'unknown') END AS split_value,
           count(*) AS n_tailpatch_queries,
           avg(tailpatch_at_1) AS tailpatch_at_1, avg(tailpatch_at_3) AS tailpatch_at_3,
           avg(tailpatch_at_5) AS tailpatch_at_5, avg(tailpatch_at_10) AS tailpatch_at_10
    FROM tail_patch_per_query
    GROUP BY GROUPING SETS ((run_id, frequency_bucket), (run_id, model_correct))
)
SELECT a.method, a.run_id, a.split, a.split_value, a.n_queries, a.n_no_ground_truth, a.mrr, a.recall_at_10,
       coalesce(p.n_tailpatch_queries, 0) AS n_tailpatch_queries,
       p.tailpatch_at_1, p.tailpatch_at_3, p.tailpatch_at_5, p.tailpatch_at_10
FROM attribution a
LEFT JOIN patch p USING (run_id, split, split_value)
ORDER BY a.split,
         coalesce(nullif(list_position(['bm25', 'embedding', 'grad-dot', 'grad-cos', 'trak', 'opt-cos',
                                       'r-train', 'trackstar'], a.method), 0), 99),
         a.method, a.run_id, a.split_value
