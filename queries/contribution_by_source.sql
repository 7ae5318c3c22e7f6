-- contribution_by_source: the contribution ledger's per-query cells, one row per (run, group,
-- query). A group is a value of one metadata column of the examples (source, domain, licence,
-- shard...): the view `example_groups` (example_id, group_value) is built from the column the
-- caller names (selection/ledger.py; `trackstar-db eval --by COLUMN`). Examples without a value
-- fall in '(none)'.
--
--   n_proponents      the query's retrieved proponents from the group
--   proponent_share   n_proponents / the query's list length (the shares of a query sum to 1)
--   score_sum         sum of the method's scores over those proponents
--   tailpatch_pp      sum over the group's patched proponents of (p_after - p_before) * 100,
--                     percentage points of P(target | prompt); 0 for a group with none of them,
--                     NULL when the run did not tail-patch this query
--
-- Every group appears for every (run, query), with zeros where it has no proponent, so the mean
-- over a run's queries is the group's expected share; ledger.py adds bootstrap intervals over queries.
WITH proponents AS (
    SELECT r.run_id, r.method, r.query_id, r.score, coalesce(g.group_value, '(none)') AS group_value,
           count(*) OVER (PARTITION BY r.run_id, r.query_id) AS list_length
    FROM retrievals r LEFT JOIN example_groups g ON g.example_id = r.example_id
    WHERE r.kind = 'proponent'
),
all_groups AS (
    SELECT DISTINCT coalesce(group_value, '(none)') AS group_value FROM example_groups
    UNION SELECT DISTINCT group_value FROM proponents
),
cells AS (
    SELECT q.run_id, q.method, q.query_id, q.list_length, a.group_value
    FROM (SELECT run_id, method, query_id, max(list_length) AS list_length FROM proponents GROUP BY ALL) q
    CROSS JOIN all_groups a
),
counted AS (
    SELECT run_id, query_id, group_value, count(*) AS n_proponents, sum(score) AS score_sum
    FROM proponents GROUP BY ALL
),
patched AS (
    SELECT t.run_id, t.query_id, coalesce(g.group_value, '(none)') AS group_value,
           sum((t.p_after - t.p_before) * 100) AS tailpatch_pp
    FROM tail_patch t LEFT JOIN example_groups g ON g.example_id = t.example_id
    GROUP BY ALL
),
patched_queries AS (SELECT DISTINCT run_id, query_id FROM tail_patch)
SELECT c.run_id, c.method, c.group_value, c.query_id,
       coalesce(n.n_proponents, 0) AS n_proponents,
       coalesce(n.n_proponents, 0) / c.list_length AS proponent_share,
       coalesce(n.score_sum, 0) AS score_sum,
       CASE WHEN pq.query_id IS NOT NULL THEN coalesce(p.tailpatch_pp, 0) END AS tailpatch_pp
FROM cells c
LEFT JOIN counted n ON n.run_id = c.run_id AND n.query_id = c.query_id AND n.group_value = c.group_value
LEFT JOIN patched p ON p.run_id = c.run_id AND p.query_id = c.query_id AND p.group_value = c.group_value
LEFT JOIN patched_queries pq ON pq.run_id = c.run_id AND pq.query_id = c.query_id
ORDER BY c.run_id, c.group_value, c.query_id
