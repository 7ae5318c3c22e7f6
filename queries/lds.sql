-- lds: the linear datamodeling score of each retrieval run under each validation, averaged
-- over the validation's queries that the run retrieved for (lds_per_query.sql defines the
-- per-query score and its sign: +1 = the run's scores order the subsets exactly as the
-- retrained models' target losses, lowest loss first).
-- uses: lds_per_query
--
--   n_queries    queries averaged
--   n_undefined  queries whose correlation was undefined (counted as 0)
--   n_subsets    retrained models (subsets) behind each query's correlation (the smallest)
--   n_scored     examples with a score behind the sums (the fewest over the queries)
--   partial      some query's sums came from a stored top-k, not every example (lds_per_query)
--   position     the method's place in method_order (for display order)
SELECT p.run_id, p.method, p.validation, count(*) AS n_queries,
       count(*) FILTER (WHERE NOT p.defined) AS n_undefined, min(p.n_subsets) AS n_subsets,
       avg(p.lds ORDER BY p.query_id) AS lds, min(p.n_scored) AS n_scored, bool_or(p.partial) AS partial,
       coalesce(any_value(o.position), 99) AS position
FROM lds_per_query p
LEFT JOIN method_order o ON o.method = p.method
GROUP BY p.run_id, p.method, p.validation
ORDER BY position, p.method, p.run_id, p.validation
