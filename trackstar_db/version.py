"""The package version, in a module of its own: the store records it without importing the package's
handle (trackstar_db/__init__.py re-exports it)."""

__version__ = "0.2.0"
