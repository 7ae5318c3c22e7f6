"""How a table prints its numbers, written once: the text tables (`eval`, `sql`, the demo), the
HTML report and the live page (its table JSON carries each column's places) all ask here.

A float column prints every value with the same number of decimal places, so a column never
mixes 0.07521, 1 and 0.4389: a metric's own places (MRR, recall and LDS 3; tail-patch, in
percentage points, 2), else enough for 4 significant digits of the column's largest magnitude
(0 to 6 places). Integers print as they are; a missing value or NaN prints as nothing.
"""

from __future__ import annotations

import math
from typing import Iterable

SIGNIFICANT = 4  # digits of a column's largest magnitude shown, where the column is no known metric
MAX_PLACES = 6
METRIC_PLACES = (("tailpatch", 2), ("mrr", 3), ("recall", 3), ("lds", 3))  # by column name prefix


def places(column: str, values: Iterable) -> int:
    """Decimal places of the float column `column` holding `values`."""
    for prefix, fixed in METRIC_PLACES:
        if column.startswith(prefix):
            return fixed
    largest = max((abs(v) for v in values if isinstance(v, float) and math.isfinite(v) and v != 0), default=0.0)
    if largest == 0.0:
        return SIGNIFICANT - 1
    return min(MAX_PLACES, max(0, SIGNIFICANT - 1 - math.floor(math.log10(largest))))


def number(value, places: int) -> str:
    """One number as a table prints it: a float to `places` decimals, an int as it is, None/NaN empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.{places}f}"
    return str(value)


def column(name: str, values: list) -> list[str]:
    """Every value of one column as the tables print it (floats to the column's places)."""
    if not any(isinstance(v, float) for v in values):
        return [number(v, 0) for v in values]
    shown = places(name, values)
    return [number(v, shown) for v in values]
