"""A Ray job: featurize, fit and retrieve with the Ray engine, on the cluster it is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"pip": ["trackstar-db[ray]"]}' \
        -- python ingest/ray_job.py DB --device cuda --dim 65536 --dtype bfloat16

DB is a database directory every node sees at the same path (NFS, FSx for Lustre, a mounted
bucket; see docs/distributed.md for a database on s3://). Inside a submitted job RAY_ADDRESS is
set, so every step joins the cluster (one actor per GPU for the featurizer, one task per CPU
for the scans). Rerun the same submit after a failure: each step does only what is missing
(ingest) or is idempotent (fit, retrieve --replace).
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def run(*args: str) -> None:
    print("+ trackstar-db", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "trackstar_db.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db")
    parser.add_argument("--device", default="auto", help="what each actor featurizes on (cuda: one actor per GPU)")
    parser.add_argument("--dim", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--correction", default=None)
    parser.add_argument("--methods", default="trackstar,r-train,bm25", help="comma-separated, or 'all'")
    parser.add_argument("--k", default="100")
    args = parser.parse_args()
    settings = [f"--{name}={value}" for name, value in (("dim", args.dim), ("dtype", args.dtype),
                                                         ("correction", args.correction)) if value]
    for split in ("train", "queries"):
        run("ingest", "gradients", args.db, "--split", split, "--device", args.device, "--engine", "ray", *settings)
    run("fit", args.db, "--engine", "ray")
    for method in args.methods.split(","):
        run("retrieve", args.db, "--method", method, "--k", args.k, "--engine", "ray", "--replace")
    run("eval", args.db)


if __name__ == "__main__":
    main()
