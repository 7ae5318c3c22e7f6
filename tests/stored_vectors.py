"""Test helpers shared by the gradient-worker tests: stored vectors by id, row-relative closeness."""

from trackstar_db.store.vectors import to_torch


def close(a, b, tol=1e-4):
    """Row-wise relative error below tol (elementwise rtol fails near zero for honest float noise)."""
    return a.shape == b.shape and bool(((a - b).norm(dim=1) <= tol * b.norm(dim=1)).all())


def vectors_by_id(db, name):
    table = db.table(name).sort_by("id")
    dtype = db.manifest["gradient_tables"][name]["dtype"]
    return table.column("id").to_pylist(), to_torch(table.column("vector"), dtype), table
