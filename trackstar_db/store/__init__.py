"""The database on disk: directory, manifest, table schemas, vector codec, gradient tables."""
