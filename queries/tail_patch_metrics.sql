-- Tail-patch influence of each run, in percentage points, overall and split like mrr.sql.
-- uses: tail_patch_per_query
--
-- tailpatch@k = mean over patched queries of (mean over the query's top-k proponents of
-- (p_after - p_before) * 100), k in 1, 3, 5, 10; NULL when the run patched fewer than k ranks.
-- See tail_patch_per_query.sql for every term. Ground truth plays no part here.
SELECT run_id, method, split, split_value,
       count(*) AS n_queries,
       avg(tailpatch_at_1 ORDER BY query_id) AS tailpatch_at_1,
       avg(tailpatch_at_3 ORDER BY query_id) AS tailpatch_at_3,
       avg(tailpatch_at_5 ORDER BY query_id) AS tailpatch_at_5,
       avg(tailpatch_at_10 ORDER BY query_id) AS tailpatch_at_10
FROM (SELECT *, unnest(splits, recursive := true) FROM tail_patch_per_query)
GROUP BY run_id, method, split, split_value
ORDER BY run_id, method, split, split_value
