"""trackstar-db: a storage-centric training-data attribution database (TrackStar).

`import trackstar_db` stays light: the database handle (and LanceDB behind it) loads on first
use of `connect` or `Database`, so the CLI and the featurizer never pay for what they skip.
"""

from trackstar_db.version import __version__

__all__ = ["Database", "connect", "__version__"]


def __getattr__(name):
    if name in ("Database", "connect"):
        from trackstar_db import api  # heavy: pyarrow

        return getattr(api, name)
    raise AttributeError(f"module 'trackstar_db' has no attribute {name!r}")
