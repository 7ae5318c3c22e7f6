-- tail_patch_per_query: one row per (run, query) with tail-patch measurements.
--
-- Tail-patch (docs/method.md section 3): one optimizer step on a single proponent, then the change of
-- P(target | prompt); each row of `tail_patch` is one (query, proponent) measurement.
--
--   delta_pp           (p_after - p_before) * 100, in percentage points
--   tailpatch_at_k     mean delta_pp over the query's measured proponents of rank <= k,
--                      k in 1, 3, 5, 10; NULL when the run patched fewer than k ranks
--                      (max rank in the run's tail_patch rows < k)
--   n_patched          measured proponents of the query
--   frequency_bucket, model_correct, splits   as in attribution_per_query.sql
WITH measured AS (
    SELECT run_id, query_id, rank, (p_after - p_before) * 100 AS delta_pp,
           max(rank) OVER (PARTITION BY run_id) AS depth
    FROM tail_patch
)
SELECT t.run_id, r.method, t.query_id, q.fact_id, f.frequency_bucket, m.correct AS model_correct,
       count(*) AS n_patched,
       CASE WHEN max(t.depth) >= 1 THEN avg(t.delta_pp ORDER BY t.rank) FILTER (WHERE t.rank <= 1) END AS tailpatch_at_1,
       CASE WHEN max(t.depth) >= 3 THEN avg(t.delta_pp ORDER BY t.rank) FILTER (WHERE t.rank <= 3) END AS tailpatch_at_3,
       CASE WHEN max(t.depth) >= 5 THEN avg(t.delta_pp ORDER BY t.rank) FILTER (WHERE t.rank <= 5) END AS tailpatch_at_5,
       CASE WHEN max(t.depth) >= 10 THEN avg(t.delta_pp ORDER BY t.rank) FILTER (WHERE t.rank <= 10) END AS tailpatch_at_10,
       [{'split': 'all', 'split_value': 'all'},
        {'split': 'frequency_bucket', 'split_value': coalesce(CAST(f.frequency_bucket AS VARCHAR), 'unknown')},
        {'split': 'model_correct', 'split_value': coalesce(CAST(m.correct AS VARCHAR), 'unknown')}] AS splits
FROM measured t
LEFT JOIN (SELECT DISTINCT run_id, method FROM retrievals) r USING (run_id)
LEFT JOIN (SELECT DISTINCT query_id, fact_id FROM queries) q USING (query_id)
LEFT JOIN (SELECT fact_id, max(frequency_bucket) AS frequency_bucket FROM facts GROUP BY fact_id) f
       USING (fact_id)
LEFT JOIN (SELECT query_id, bool_and(correct) AS correct FROM model_correct GROUP BY query_id) m
       USING (query_id)
GROUP BY ALL
