"""Beyond one machine: the Ray engine for ingest, fit and retrieve (`--engine ray`).

    ranges.py   a gradient table's fragments cut into contiguous ranges, one per Ray task
    scan.py     retrieve: each task scans a range with retrieval.topk.search; the driver merges
                the per-range top-k into the one-process ranking (merge_topk)
    fit.py      fit: each task sums g g^T over a range (GramAccumulator); the driver adds them
    ingest.py   ingest gradients: Ray actors featurize crc32 shards of the missing ids and write
                Lance fragments; the driver commits them (LanceOperation.Append)

Ray is optional (`pip install 'trackstar-db[ray]'`). `ray_session()` joins the cluster named by
RAY_ADDRESS (a `ray job submit` run, a `ray up` head), or else starts a local one; a session the
caller already opened (ray.init in a test) is used as it is.
"""

from __future__ import annotations

import os

from trackstar_db.errors import ParameterError

def ray_session(num_cpus: int | None = None):
    """The ray module, connected: an existing session, RAY_ADDRESS's cluster, or a new local one."""
    try:
        import ray  # heavy: ray
    except ImportError:
        raise ParameterError("engine", "ray needs Ray: pip install 'trackstar-db[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return ray


def cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
