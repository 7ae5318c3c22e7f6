"""Counterfactual validation (`trackstar-db validate`, `Database.validate`): retrain models on
random subsets of the training examples, measure every query's target loss under each, score
every example for each retrieval run's queries, and rate each run by its linear datamodeling
score (LDS, queries/lds_per_query.sql).

    options.py   what a validation is: subsets, trainer, queries (ValidateOptions, draw_subset)
    trainers.py  train one subset's model: the testbed trainer or a user's train command
    runner.py    the resumable loop: train and measure each missing subset, store it
    scores.py    every example's score per run and query (a second stage optional), summed per subset
    lds.py       the LDS table (queries/lds.sql) with a bootstrap interval over queries
    qld.py       the second check: the loss rise without a run's top examples for a query
"""
