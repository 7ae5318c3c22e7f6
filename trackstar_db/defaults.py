"""Every default that more than one module reads, written once; imports nothing.

The store, the gradient worker, retrieval, the plan and the CLI read these names instead of
restating the numbers, so a default changes in one place. Rates measured on a machine are not
defaults: they live in benchmarks/rates.json (cost_plan.py reads it).
"""

TEMPLATE = "prompt0"  # the query template stored runs, fit's R_eval and Simfluence use unless told
TEMPLATES = ("prompt0", "prompt1", "prompt2")  # the fact file's prompt fields, in order

SCAN_BATCH_ROWS = 65536  # rows of a stored table per scanned batch, at most (also bounded by SCAN_BATCH_BYTES)
SCAN_BATCH_BYTES = 64 << 20  # float32 bytes of one scanned batch, at most: bounds memory at any width
STREAM_BATCH_ROWS = 8192  # rows per batch when a pass keeps float64 work per row (fit, TracIn-CP, checks)
COMMIT_ROWS = 2048  # gradient rows buffered per Lance commit by the ingest worker
CORPUS_COMMIT_ROWS = 10_000  # corpus rows per Lance commit

K_RETRIEVE = 100  # proponents (and opponents) kept per stored query
K_QUERY = 10  # proponents (and opponents) of a one-prompt query
FISHERS = ("sampled", "empirical")  # fit-factors' labels: drawn from the model (the true Fisher), or the data's
FISHER = "sampled"
CANDIDATES = 200  # a second stage (--rerank) re-scores this many first-stage proponents and opponents per query
K_TAIL_PATCH = 10  # top proponents a tail-patch run steps on

DIM = 4096  # total projected dimensions of a new database
DAMPING = 0.1  # R's damping: added to each eigenvalue, times their mean

PROGRESS_DELAY_S = 2.0  # a bar appears only once work has run this long (short work shows none)

MANIFEST_FILE = "manifest.json"  # the file that makes a folder a database (store/manifest.py writes it)
