-- Recall@k of each retrieval run (k = 1, 5, 10), overall and split like mrr.sql.
-- uses: attribution_per_query
--
-- recall@k = fraction of evaluated fact queries with >= 1 ground-truth example that have at
-- least one correct PROPONENT at rank <= k (a hit rate, as in the authors' viewer); see
-- attribution_per_query.sql for every term. Queries without ground truth: n_no_ground_truth.
SELECT run_id, method, split, split_value,
       count(*) FILTER (WHERE has_ground_truth) AS n_queries,
       count(*) FILTER (WHERE NOT has_ground_truth) AS n_no_ground_truth,
       avg(CAST(coalesce(first_correct_rank <= 1, false) AS DOUBLE)) FILTER (WHERE has_ground_truth) AS recall_at_1,
       avg(CAST(coalesce(first_correct_rank <= 5, false) AS DOUBLE)) FILTER (WHERE has_ground_truth) AS recall_at_5,
       avg(CAST(coalesce(first_correct_rank <= 10, false) AS DOUBLE)) FILTER (WHERE has_ground_truth) AS recall_at_10
FROM (SELECT *, unnest(splits, recursive := true) FROM attribution_per_query)
GROUP BY run_id, method, split, split_value
ORDER BY run_id, method, split, split_value
