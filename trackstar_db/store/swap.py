"""Write-then-swap: replace some rows of a table, or some files of the database directory, as one
step under kill -9. The methods Database gets from SwapWriter.

New rows go in first under staging keys (STAGING + key); once they are all in, the journal turns
to 'forward' (store/journal.py) and the old rows are deleted and the staged ones renamed. A kill
before the new rows are complete rolls back to the old ones; after, the next writer calls
roll_forward, which finishes the swap idempotently. Runs (retrievals + the runs table) and
tail-patch results are replaced this way; fit's R files with swap_files.
"""

from __future__ import annotations

import datetime as _dt
import json as _json

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import faults
from trackstar_db.errors import TrackstarError

from . import journal as _journal

from trackstar_db.option_checks import RESERVED_PREFIX as STAGING  # prefix of the key under which swap_rows writes new rows
from trackstar_db.option_checks import name as valid_name
from trackstar_db.version import __version__


class SwapWriter:
    """Mixed into Database: needs its append, table, lance_table, delete_rows, ids, update_manifest."""

    def record_run(self, run_id: str, method: str, parameters: dict) -> None:
        """Add a row to the runs table."""
        valid_name("run", run_id)

        self.append("runs", pa.table({
            "run_id": [run_id], "method": [method], "parameters": [_json.dumps(parameters, sort_keys=True)],
            "created_at": pa.array([_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)], pa.timestamp("us")),
            "code_version": [__version__],
        }))

    def replace_run(self, run_id: str, method: str, parameters: dict, rows: pa.Table,
                    derived: tuple[str, ...] = ("tail_patch",)) -> None:
        """Store a retrieval run, replacing one of the same name (write-then-swap, swap_rows):
        a failure or a kill at any point keeps the old run or ends with the complete new one."""
        self.swap_rows("retrievals", "run_id", [run_id], rows, drop_from=derived, fault="run",
                       record_run={"run_id": run_id, "method": method, "parameters": parameters},
                       command=f"retrieve --run {run_id}")

    def swap_rows(self, name: str, column: str, keys: list[str], rows: pa.Table, drop_from: tuple[str, ...] = (),
                  record_run: dict | None = None, fault: str = "swap", command: str | None = None) -> None:
        """Replace the rows of `name` whose `column` is one of `keys` by `rows` (write-then-swap).

        The new rows are appended under staging values of `column` (STAGING + key); once they are
        all in, the journal turns to 'forward', the old rows (in `name`, `drop_from` and, with
        `record_run`, runs) are deleted and the staged ones renamed. A kill before the staged rows
        are complete rolls back to the old rows; after, the next writer finishes the swap."""
        keys = sorted(valid_name(column, key) for key in set(keys))  # never a staging key: a swap of one would jam
        values = rows.column(column).to_pylist()
        if set(values) - set(keys):
            raise TrackstarError(f"{name}: rows for {sorted(set(values) - set(keys))[0]!r}, which is not being replaced")
        staged = {key: STAGING + key for key in keys}
        tables = [name, *drop_from] + (["runs"] if record_run else [])
        with _journal.transaction(self, command or f"replace {name}", tables) as entry:
            index = rows.column_names.index(column)
            self.append(name, rows.set_column(index, column, pa.array([staged[v] for v in values], pa.string())))
            faults.point(f"{fault}.after_stage")
            forward = {"table": name, "column": column, "staged": staged, "drop_from": list(drop_from),
                       "counts": {key: values.count(key) for key in keys}, "record_run": record_run}
            _journal.go_forward(self, entry, forward)
            self.roll_forward(forward, fault)

    def roll_forward(self, forward: dict, fault: str = "swap") -> None:
        """Finish a swap_rows whose staged rows are complete; idempotent, so a kill while
        finishing is finished by the next writer."""
        if forward.get("kind") == "files":
            return self._finish_files(forward)
        name, column = forward["table"], forward["column"]
        record = forward.get("record_run")
        drop = [name, *forward["drop_from"]] + (["runs"] if record else [])
        for key, staging in forward["staged"].items():
            expected = forward["counts"][key]
            have = self.table(name, columns=[column], filter=pc.field(column) == staging).num_rows
            if have == expected:  # staged and not yet renamed (or nothing to rename)
                for table in drop:
                    self.delete_rows(table, column, key)
                faults.point(f"{fault}.after_delete")
                if expected:
                    escaped, target = staging.replace("'", "''"), key
                    self.lance_table(name).update(where=f"{column} = '{escaped}'", values={column: target})
                faults.point(f"{fault}.after_rename")
            elif have:
                raise TrackstarError(f"{self.path}: {have} of {expected} staged rows of {key!r} in {name}; "
                                     f"the journal {_journal.FILENAME} does not match the table")
        if record and record["run_id"] not in self.ids("runs", "run_id"):
            self.record_run(record["run_id"], record["method"], record["parameters"])

    def swap_files(self, command: str, directory: str, renames: list[tuple[str, str]], manifest: dict,
                   unlink: list[str] = (), fault: str = "files") -> None:
        """Move complete temp files into place and point the manifest at them, as one step under
        kill -9 (the journal rolls it forward): `renames` [(temp, final)] and `unlink` are file
        names in DB/`directory`; `manifest` holds the top-level keys to set."""
        forward = {"kind": "files", "directory": directory, "renames": [list(r) for r in renames],
                   "manifest": manifest, "unlink": list(unlink), "fault": fault}
        with _journal.transaction(self, command, []) as entry:
            _journal.go_forward(self, entry, forward)
            self._finish_files(forward)

    def _finish_files(self, forward: dict) -> None:
        folder = self.path / forward["directory"]
        for tmp, final in forward["renames"]:
            if (folder / tmp).exists():  # else moved by an earlier, interrupted attempt
                (folder / tmp).replace(folder / final)
        faults.point(f"{forward['fault']}.after_rename")
        self.update_manifest(lambda manifest: manifest.update(forward["manifest"]))
        faults.point(f"{forward['fault']}.after_manifest")
        for name in forward["unlink"]:
            (folder / name).unlink(missing_ok=True)
