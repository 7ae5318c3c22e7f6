-- attribution_per_query: one row per (retrieval run, fact query), the inputs of MRR and recall@k.
--
-- Evaluated queries: every row of `queries` with a fact_id (ad-hoc queries have none), crossed
-- with every (run_id, method) present in `retrievals`. To evaluate a subset of queries, give a
-- filtered `queries` view. A query with no proponents in a run still counts (an empty list).
--
--   correct            a PROPONENT is correct when (query's fact_id, example_id) is in ground_truth
--   first_correct_rank smallest stored rank (1-based) of a correct proponent; NULL when the list
--                      holds none (or is empty). Opponents never count.
--   reciprocal_rank    1 / first_correct_rank, 0 when NULL
--   has_ground_truth   the fact has >= 1 ground-truth example; metrics average over these
--                      queries only and count the others apart (n_no_ground_truth)
--   list_length        proponents retrieved for the query in this run
--   frequency_bucket   facts.frequency_bucket of the query's fact (NULL when unknown)
--   model_correct      model_correct.correct of the query (NULL when not measured)
--   splits             the (split, split_value) groups the row counts in, for the metric files:
--                      ('all', 'all'), ('frequency_bucket', bucket), ('model_correct', 'true'/'false');
--                      'unknown' when the bucket or correctness is not known
WITH runs_ AS (SELECT DISTINCT run_id, method FROM retrievals),
truth AS (SELECT DISTINCT fact_id, example_id FROM ground_truth),
fact_queries AS (
    SELECT q.query_id, q.fact_id, f.frequency_bucket, m.correct AS model_correct,
           q.fact_id IN (SELECT fact_id FROM truth) AS has_ground_truth
    FROM queries q
    LEFT JOIN (SELECT fact_id, max(frequency_bucket) AS frequency_bucket FROM facts GROUP BY fact_id) f
           USING (fact_id)
    LEFT JOIN (SELECT query_id, bool_and(correct) AS correct FROM model_correct GROUP BY query_id) m
           USING (query_id)
    WHERE q.fact_id IS NOT NULL
),
proponents AS (
    SELECT r.run_id, r.method, r.query_id, r.rank, t.example_id IS NOT NULL AS correct
    FROM retrievals r
    JOIN fact_queries q USING (query_id)
    LEFT JOIN truth t ON t.fact_id = q.fact_id AND t.example_id = r.example_id
    WHERE r.kind = 'proponent'
)
SELECT u.run_id, u.method, q.query_id, q.fact_id, q.frequency_bucket, q.model_correct, q.has_ground_truth,
       count(p.rank) AS list_length,
       min(p.rank) FILTER (WHERE p.correct) AS first_correct_rank,
       coalesce(1.0 / min(p.rank) FILTER (WHERE p.correct), 0.0) AS reciprocal_rank,
       [{'split': 'all', 'split_value': 'all'},
        {'split': 'frequency_bucket', 'split_value': coalesce(CAST(q.frequency_bucket AS VARCHAR), 'unknown')},
        {'split': 'model_correct', 'split_value': coalesce(CAST(q.model_correct AS VARCHAR), 'unknown')}] AS splits
FROM runs_ u
CROSS JOIN fact_queries q
LEFT JOIN proponents p ON p.run_id = u.run_id AND p.method = u.method AND p.query_id = q.query_id
GROUP BY ALL
