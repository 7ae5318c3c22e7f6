"""Measure the preconditioner settings the paper leaves open, on an existing database.

    python benchmarks/sweep_preconditioner.py DB [--damping 1e-4 1e-3 1e-2 1e-1] [--kind block dense]

For each (kind, damping) it refits R on a copy of DB, reruns r-train and trackstar retrieval and
prints MRR and recall@10 (queries/summary.sql), and, with --tail-patch N, tail-patch@1 on a
sample of N queries. This is how the defaults in featurizer/preconditioner.py were chosen.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import trackstar_db
from trackstar_db.report.analysis import evaluation
from trackstar_db.gradients.fit import fit
from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
from trackstar_db.tailpatch.runs import tail_patch_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("--damping", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--kind", nargs="+", default=["block", "dense"])
    parser.add_argument("--crossing-k", type=int, nargs="+", default=[None], help="spectrum-crossing components")
    parser.add_argument("--tail-patch", type=int, default=0, help="queries to tail-patch per setting (0: none)")
    parser.add_argument("--patch-k", type=int, default=1, help="proponents tail-patched per query")
    args = parser.parse_args()
    patch = f"tailpatch@{args.patch_k}"
    print(f"{'kind':<6} {'damping':>8} {'k':>5} {'lambda':>7} {'method':<10} {'mrr':>6} {'recall@10':>9} {patch:>12}")
    settings = [(kind, damping, k) for kind in args.kind for damping in args.damping for k in args.crossing_k]
    for kind, damping, crossing_k in settings:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "db"
            shutil.copytree(args.db, copy)
            db = trackstar_db.connect(copy)
            db.set_model(db.manifest["model"]["path"])
            params = fit(db, kind=kind, damping=damping, k=crossing_k)
            for method in ("r-train", "trackstar"):
                retrieve(db, method, RetrieveOptions(k=100), run_id=f"sweep-{method}")
            runs = ["sweep-r-train", "sweep-trackstar"]
            if args.tail_patch:
                tail_patch_runs(db, runs, k=args.patch_k, max_queries=args.tail_patch)
            for row in evaluation(db).to_pylist():
                if row["run_id"] in runs:
                    value = row[f"tailpatch_at_{args.patch_k}"]
                    print(f"{kind:<6} {damping:>8g} {params['mixed']['k']:>5} {params['mixed']['lambda']:>7.4f} "
                          f"{row['method']:<10} {row['mrr']:>6.3f} {row['recall_at_10']:>9.3f} "
                          f"{'' if value is None else f'{value:.2f}':>12}", flush=True)


if __name__ == "__main__":
    main()
