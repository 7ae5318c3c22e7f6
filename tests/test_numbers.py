"""Tables print their numbers alike (trackstar_db/numbers.py): every value of a float column with
the column's one count of decimal places, the same in the text tables (`eval`, `sql`, the demo),
the HTML report and the live page's table JSON."""

import pyarrow as pa

from trackstar_db import numbers
from trackstar_db.evaluation.sql import format_table


def test_a_column_never_mixes_places():
    values = [0.07521, 1.0, 0.4389, None, float("nan")]
    assert numbers.column("score", values) == ["0.075", "1.000", "0.439", "", ""]
    assert numbers.column("score", [1234.5, 2.0]) == ["1234", "2"]  # 4 significant digits of the largest
    assert numbers.column("score", [0.0001234, 0.00002]) == ["0.000123", "0.000020"]
    assert numbers.column("score", [0.0, 0.0]) == ["0.000", "0.000"]
    assert numbers.column("n_queries", [499, 525]) == ["499", "525"]
    assert numbers.column("tailpatch_at_1", [5.14, 0.04, -0.08]) == ["5.14", "0.04", "-0.08"]
    assert numbers.column("mrr", [0.381, 1.0]) == ["0.381", "1.000"]
    assert numbers.column("lds_low", [0.1]) == ["0.100"]


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def test_text_report_and_live_page_print_the_same_numbers():
    from trackstar_db.report.summary import summary_html
    from trackstar_db.serve.payload import table_json

    summary = pa.table({"method": ["bm25", "grad-dot", "trackstar"], "run_id": ["bm25", "grad-dot", "trackstar"],
                        "n_queries": [499, 499, 499], "mrr": [0.98512, 0.07521, 0.4389],
                        "recall_at_10": [1.0, 0.146, 0.5714], "tailpatch_at_1": [2.9311, 2.64, 5.1]})
    text = format_table(summary, "table").splitlines()
    mrr_at = text[0].index("mrr")
    header = text[0].split()
    rows = [line.split() for line in text[2:-1]]
    for name in ("mrr", "recall_at_10", "tailpatch_at_1"):
        printed = [row[header.index(name)] for row in rows]
        assert printed == numbers.column(name, summary.column(name).to_pylist())
        assert len({_decimals(p) for p in printed}) == 1, printed
        page = summary_html(summary)
        assert all(f">{p}</td>" in page for p in printed), (name, printed)
        live = table_json(summary)
        column = next(c for c in live["columns"] if c["name"] == name)
        at = [c["name"] for c in live["columns"]].index(name)
        assert [f"{row[at]:.{column['places']}f}" for row in live["rows"]] == printed  # app.js: toFixed(places)
    assert mrr_at > 0 and "0.075" in text[3] and "0.07521" not in "\n".join(text)
