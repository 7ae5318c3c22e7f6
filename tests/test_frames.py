"""Arrow results as polars / pandas frames, with a one-line error when the library is missing."""

import importlib.util

import pyarrow as pa
import pytest

from trackstar_db.errors import TrackstarError
from trackstar_db.frames import to_pandas, to_polars

TABLE = pa.table({"example_id": ["e1", "e2"], "score": pa.array([0.5, -0.25], pa.float32())})


def test_to_polars_round_trip():
    pytest.importorskip("polars")
    frame = to_polars(TABLE)
    assert frame.columns == ["example_id", "score"] and frame.height == 2
    assert frame.to_arrow().cast(TABLE.schema).equals(TABLE)
    assert to_polars(TABLE.to_batches()[0]).height == 2


def test_missing_library_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("polars", "pandas") else real(name, *a))
    for convert, name in ((to_polars, "polars"), (to_pandas, "pandas")):
        with pytest.raises(TrackstarError, match=f"pip install {name}") as info:
            convert(TABLE)
        assert "\n" not in str(info.value)


def test_not_a_table():
    with pytest.raises(TrackstarError, match="expected a pyarrow.Table"):
        to_polars({"a": [1]})
