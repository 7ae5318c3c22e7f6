-- Tail-patch influence of each run, in percentage points, overall and split like mrr.sql.
-- uses: tail_patch_per_query
--
-- tailpatch@k = mean over patched queries of (mean over the query's top-k proponents of
-- (p_after - p_before) * 100), k in 1, 3, 5, 10; NULL when the run patched fewer than k ranks.
-- See tail_patch_per_query.sql for every term. Ground truth plays no part here.
SELECT run_id, method,
       CASE WHEN grouping(frequency_bucket) = 0 THEN 'frequency_bucket'
            WHEN grouping(model_correct) = 0 THEN 'model_correct' ELSE 'all' END AS split,
       CASE WHEN grouping(frequency_bucket) = 0 THEN coalesce(CAST(frequency_bucket AS VARCHAR), 'unknown')
            WHEN grouping(model_correct) = 0 THEN coalesce(CAST(model_correct AS VARCHAR), 'unknown')
            ELSE 'all' END AS split_value,
       count(*) AS n_queries,
       avg(tailpatch_at_1) AS tailpatch_at_1,
       avg(tailpatch_at_3) AS tailpatch_at_3,
       avg(tailpatch_at_5) AS tailpatch_at_5,
       avg(tailpatch_at_10) AS tailpatch_at_10
FROM tail_patch_per_query
GROUP BY GROUPING SETS ((run_id, method), (run_id, method, frequency_bucket), (run_id, method, model_correct))
ORDER BY run_id, method, split, split_value
