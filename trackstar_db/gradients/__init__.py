"""The gradient stage: plan, featurize and commit rows into gradient tables; fit R on them."""
