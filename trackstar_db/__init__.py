"""trackstar-db: a storage-centric training-data attribution database (TrackStar)."""

__version__ = "0.1.0"

from .database import Database, connect  # noqa: E402

__all__ = ["Database", "connect", "__version__"]
