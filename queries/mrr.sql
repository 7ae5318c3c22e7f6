-- MRR of each retrieval run, overall and split by fact frequency bucket and by model correctness.
-- uses: attribution_per_query
--
-- MRR = mean over evaluated fact queries with >= 1 ground-truth example of 1 / rank of the
-- first correct PROPONENT (0 when none is in the retrieved list, or the list is empty);
-- see attribution_per_query.sql for every term. list_length is the longest proponent list
-- (the cut-off of "in the retrieved list"); n_empty_lists counts queries with no proponent.
-- split: 'all' | 'frequency_bucket' | 'model_correct'; split_value: the bucket, 'true'/'false',
-- or 'unknown' when the bucket or correctness is not known. Float averages are summed in query_id
-- order, so evaluating the same rows twice (another node, another scan order) agrees to the bit.
SELECT run_id, method, split, split_value,
       count(*) FILTER (WHERE has_ground_truth) AS n_queries,
       count(*) FILTER (WHERE NOT has_ground_truth) AS n_no_ground_truth,
       count(*) FILTER (WHERE list_length = 0) AS n_empty_lists,
       max(list_length) AS list_length,
       avg(reciprocal_rank ORDER BY query_id) FILTER (WHERE has_ground_truth) AS mrr
FROM (SELECT *, unnest(splits, recursive := true) FROM attribution_per_query)
GROUP BY run_id, method, split, split_value
ORDER BY run_id, method, split, split_value
