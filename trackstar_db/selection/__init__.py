"""Questions a data curator asks of the stored gradients: which examples to keep for a task
(select.py), which examples are outliers (self_influence.py), and how much each source of the
data contributes to the retrieved proponents and their tail-patch effects (ledger.py)."""
