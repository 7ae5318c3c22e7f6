-- Recall@k of each retrieval run (k = 1, 5, 10), overall and split like mrr.sql.
-- uses: attribution_per_query
--
-- recall@k = fraction of evaluated fact queries with >= 1 ground-truth example that have at
-- least one correct PROPONENT at rank <= k (a hit rate, as in the authors' viewer); see
-- attribution_per_query.sql for every term. Queries without ground truth: n_no_ground_truth.
SELECT run_id, method,
       CASE WHEN grouping(frequency_bucket) = 0 THEN 'frequency_bucket'
            WHEN grouping(model_correct) = 0 THEN 'model_correct' ELSE 'all' END AS split,
       CASE WHEN grouping(frequency_bucket) = 0 THEN coalesce(CAST(frequency_bucket AS VARCHAR), 'unknown')
            WHEN grouping(model_correct) = 0 THEN coalesce(CAST(model_correct AS VARCHAR), 'unknown')
            ELSE 'all' END AS split_value,
       count(*) FILTER (WHERE has_ground_truth) AS n_queries,
       count(*) FILTER (WHERE NOT has_ground_truth) AS n_no_ground_truth,
       avg(CAST(coalesce(first_correct_rank <= 1, false) AS DOUBLE)) FILTER (WHERE has_ground_truth) AS recall_at_1,
       avg(CAST(coalesce(first_correct_rank <= 5, false) AS DOUBLE)) FILTER (WHERE has_ground_truth) AS recall_at_5,
       avg(CAST(coalesce(first_correct_rank <= 10, false) AS DOUBLE)) FILTER (WHERE has_ground_truth) AS recall_at_10
FROM attribution_per_query
GROUP BY GROUPING SETS ((run_id, method), (run_id, method, frequency_bucket), (run_id, method, model_correct))
ORDER BY run_id, method, split, split_value
