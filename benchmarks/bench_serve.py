"""A warm query over HTTP (`trackstar-db serve`) against the same query in-process (issue 25).

The database: the demo world's (benchmarks/bench_query.py builds it once in --workdir and reuses
it: 5,426 sentences, the testbed model, TrackStar gradients of d = 4,096, R). Then, in one run:

    first     `trackstar-db serve DB --no-warm` started as a user would; seconds until it
              answers /api/health, then the first /api/query (trackstar), which loads the model,
              featurizer and R, then the first of each other method
    floor     GET /api/health: what a round trip to the server costs with no work in it
    1 client  per method, N rounds of: Database.query in this process, then the same query over
              HTTP (keep-alive); p50/p95 of each and of their difference. Paired rounds, so both
              sides see the same machine load. Goal: HTTP p50 <= in-process p50 + 20 ms. Also
              each HTTP latency less the seconds Database.query took inside the server for that
              very request (the answer's `seconds`): the cost of HTTP, JSON and the queue alone
    8 clients per method, 8 threads each sending M requests at once: every request's latency
              (the model runs one request at a time, so this is mostly queueing) and the rate

    python benchmarks/bench_serve.py                            # demo world (builds in minutes)
    python benchmarks/bench_serve.py --size tiny --rounds 5     # a smoke test
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_query import build  # noqa: E402

METHODS = ("trackstar", "grad-cos", "bm25")
CLI = [str(Path(sys.executable).with_name("trackstar-db"))]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{name:34} p50 {percentile(ms, 50):8.1f} ms   p95 {percentile(ms, 95):8.1f} ms   (n {len(ms)})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-serve"))
    parser.add_argument("--size", default="demo", choices=["demo", "tiny"])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=20, help="paired in-process / HTTP queries per method")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=4, help="requests each concurrent client sends")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    import httpx

    from trackstar_db import connect

    path = build(args.workdir, args.size, args.dim)
    db = connect(path)
    first = db.table("queries", columns=["prompt", "target"]).slice(0, 1).to_pylist()[0]
    prompt, target = first["prompt"], first["target"]
    print(f"{path}: {db.count('examples'):,} examples; prompt {prompt!r} -> {target!r}; k {args.k}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; load average {os.getloadavg()[0]:.2f}", flush=True)

    loads, sampling = [os.getloadavg()[0]], threading.Event()

    def sample() -> None:
        while not sampling.wait(2.0):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample, daemon=True).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen(CLI + ["serve", str(path), "--port", str(port), "--device", "cpu", "--no-warm"],
                              stderr=subprocess.DEVNULL)
    try:
        http = httpx.Client(base_url=url, timeout=600)
        while True:
            try:
                http.get("/api/health")
                break
            except httpx.TransportError:
                if server.poll() is not None:
                    raise SystemExit("the server exited")
                time.sleep(0.05)
        ready = time.perf_counter() - started

        inside: list[float] = []  # the server's own Database.query seconds of each answer

        def ask(method: str, client=http) -> float:
            begin = time.perf_counter()
            response = client.post("/api/query", json={"prompt": prompt, "target": target, "methods": [method],
                                                       "k": args.k})
            response.raise_for_status()
            seconds = time.perf_counter() - begin
            inside.append(response.json()["results"][0]["seconds"])
            return seconds

        print(f"server process answering /api/health after {ready:.2f} s (no warm-up: --no-warm)")
        for method in METHODS:
            print(f"first /api/query {method:10} {ask(method):7.2f} s"
                  f"{'  (loads the model, featurizer and R)' if method == METHODS[0] else ''}", flush=True)

        floor = []
        for _ in range(args.rounds):
            begin = time.perf_counter()
            http.get("/api/health").raise_for_status()
            floor.append(time.perf_counter() - begin)
        print(row("\nGET /api/health (the HTTP floor)", floor))
        print(f"\n1 client, {args.rounds} paired rounds per method (in-process Database.query, then HTTP):")
        for method in METHODS:
            db.query(prompt, target, k=args.k, method=method)  # this process warm too
            local, remote = [], []
            inside.clear()
            for _ in range(args.rounds):
                begin = time.perf_counter()
                db.query(prompt, target, k=args.k, method=method)
                local.append(time.perf_counter() - begin)
                remote.append(ask(method))
            extra = [r - i for r, i in zip(remote, local)]
            print(row(f"{method} in-process", local))
            print(row(f"{method} HTTP", remote))
            print(row(f"{method} HTTP - server's own query", [r - i for r, i in zip(remote, inside)]))
            print(f"{method:10} HTTP - in-process: p50 of the pairs {percentile(extra, 50) * 1000:+.1f} ms, "
                  f"difference of the p50s {(percentile(remote, 50) - percentile(local, 50)) * 1000:+.1f} ms "
                  f"(goal <= +20 ms)", flush=True)

        print(f"\n{args.clients} clients at once, {args.per_client} requests each, per method:")
        for method in METHODS:
            latencies, failures = [], []

            def client() -> None:
                with httpx.Client(base_url=url, timeout=600) as mine:
                    for _ in range(args.per_client):
                        try:
                            latencies.append(ask(method, mine))
                        except Exception as exc:  # noqa: BLE001 (counted below)
                            failures.append(repr(exc))

            begin = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - begin
            print(row(f"{method} {args.clients} clients", latencies)
                  + f"   {len(latencies) / wall:5.1f} queries/s, {len(failures)} failed", flush=True)
    finally:
        server.terminate()
        server.wait(30)
        sampling.set()
    print(f"load average (1 min) during the run: min {min(loads):.1f}, median {statistics.median(loads):.1f}, "
          f"max {max(loads):.1f} (sampled every 2 s)")


if __name__ == "__main__":
    main()
