-- lds_per_query: the linear datamodeling score of each (retrieval run, validation, query).
--
-- A validation (trackstar-db validate) retrained M models, each on a random subset S_j of the
-- training examples (validate_runs.examples), and measured each query's target loss L_j(q)
-- under each (validate_losses.loss). A run's predicted effect of S_j on q is the sum of the
-- run's scores of the examples in S_j:
--
--   f_j(q) = sum over z in S_j of score(q, z)
--
-- Where validate scored every example with the run's method (validate_predictions, stamped with
-- the run's created_at: rows of a run replaced since are ignored), f_j(q) is that stored sum, so
-- the LDS does not depend on the run's k. Otherwise it is summed from the run's stored top-k,
-- the examples it did not retrieve counting 0: then n_scored < n_examples and `partial` is true.
--
-- Sign: a high attribution score says "training on z makes the target more likely", i.e. a
-- LOWER loss, so the score is compared with the NEGATED loss:
--
--   lds(q) = Spearman correlation over j = 1..M of f_j(q) and -L_j(q)
--
-- (Pearson correlation of the average ranks; ties share their mean rank). A perfect attributor
-- scores +1, a random one about 0, one with the sign flipped -1. When f or L is constant across
-- the subsets (e.g. BM25 matched no example of the query) the correlation is undefined: lds is
-- then 0 (the run predicts nothing), and `defined` is false.
--
--   n_subsets   subsets with a measured loss for the query
--   lds         as above, in [-1, 1]
--   n_scored    examples with a score behind f (every example: n_examples)
--   n_examples  training examples (when validated, validate_runs.parameters' n_corpus; when scored)
--   partial     n_scored < n_examples: the LDS of a top-k, not of every example
WITH members AS (
    SELECT validation, subset, unnest(examples) AS example_id FROM validate_runs
),
corpus AS (
    SELECT validation, max(CAST(json_extract(parameters, '$.identity.n_corpus') AS BIGINT)) AS n_examples
    FROM validate_runs GROUP BY validation
),
fresh AS (  -- predictions over every example, for runs unchanged since they were scored
    SELECT p.* FROM validate_predictions p JOIN runs r ON r.run_id = p.source_run_id AND r.created_at = p.run_created_at
),
covered AS (SELECT DISTINCT run_id, validation FROM fresh),
scored AS (  -- one score per (run, query, example): an example can be both proponent and opponent
    SELECT run_id, query_id, example_id, any_value(score) AS score
    FROM retrievals GROUP BY run_id, query_id, example_id
),
coverage AS (SELECT run_id, query_id, count(*) AS n_scored FROM scored GROUP BY run_id, query_id),
sums AS (
    SELECT s.run_id, m.validation, m.subset, s.query_id, sum(s.score ORDER BY s.example_id) AS subset_score
    FROM scored s JOIN members m USING (example_id)
    GROUP BY s.run_id, m.validation, m.subset, s.query_id
),
grid AS (
    -- every (run, query) the run retrieved for, under every subset whose loss was measured:
    -- the stored predictions where validate scored every example ...
    SELECT p.run_id, p.method, l.validation, l.subset, l.query_id, l.loss, p.prediction AS subset_score,
           p.n_scored, p.n_examples
    FROM fresh p
    JOIN validate_losses l ON l.validation = p.validation AND l.subset = p.subset AND l.query_id = p.query_id
    JOIN validate_runs v ON v.validation = l.validation AND v.subset = l.subset
    UNION ALL
    -- ... else the sums of the stored top-k
    SELECT r.run_id, r.method, l.validation, l.subset, l.query_id, l.loss,
           coalesce(x.subset_score, 0.0) AS subset_score, c.n_scored, coalesce(n.n_examples, c.n_scored) AS n_examples
    FROM (SELECT DISTINCT run_id, method, query_id FROM retrievals) r
    JOIN validate_losses l USING (query_id)
    JOIN validate_runs v ON v.validation = l.validation AND v.subset = l.subset
    JOIN coverage c ON c.run_id = r.run_id AND c.query_id = r.query_id
    LEFT JOIN corpus n ON n.validation = l.validation
    LEFT JOIN sums x ON x.run_id = r.run_id AND x.validation = l.validation AND x.subset = l.subset
                    AND x.query_id = l.query_id
    WHERE NOT EXISTS (SELECT 1 FROM covered k WHERE k.run_id = r.run_id AND k.validation = l.validation)
),
ranked AS (
    SELECT *,
           rank() OVER (PARTITION BY run_id, validation, query_id ORDER BY subset_score)
             + (count(*) OVER (PARTITION BY run_id, validation, query_id, subset_score) - 1) / 2.0 AS score_rank,
           rank() OVER (PARTITION BY run_id, validation, query_id ORDER BY -loss)
             + (count(*) OVER (PARTITION BY run_id, validation, query_id, loss) - 1) / 2.0 AS loss_rank
    FROM grid
)
SELECT run_id, method, validation, query_id, n_subsets, coalesce(rho, 0.0) AS lds, rho IS NOT NULL AS defined,
       n_scored, n_examples, n_scored < n_examples AS partial
FROM (SELECT run_id, any_value(method) AS method, validation, query_id, count(*) AS n_subsets,
             CASE WHEN var_pop(score_rank) > 0 AND var_pop(loss_rank) > 0 THEN corr(score_rank, loss_rank) END AS rho,
             min(n_scored) AS n_scored, max(n_examples) AS n_examples
      FROM ranked
      GROUP BY run_id, validation, query_id)
ORDER BY run_id, validation, query_id
