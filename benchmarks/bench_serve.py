"""A warm query over HTTP (`trackstar-db serve`) against the same query in-process (issue 25), and
the server under 1 to 16 concurrent clients, batched against unbatched (issue 33).

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
    clients   two more servers side by side, unbatched (--max-batch 1: one model pass a query)
              and batched (--max-batch 16), both warm; for 1, 2, 4, 8 and 16 clients at once and
              each method, the two servers in turn: every client sends its requests one after
              another (a closed loop; client i asks stored query i, so prompts differ), each
              request's latency (p50, p95) and the answers per second. Targets (batched, trackstar):
              p95 at 8 clients <= 3 x the one-client p50, and the rate at 8 clients >= 3 x the
              one-client rate

    python benchmarks/bench_serve.py                            # demo world (builds in minutes)
    python benchmarks/bench_serve.py --size tiny --rounds 5     # a smoke test
    python benchmarks/bench_serve.py --only-clients             # the concurrency table alone
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
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrent clients of the side-by-side table")
    parser.add_argument("--requests", type=int, default=16,
                        help="requests per level and method at least (a client sends max(--per-client, this/clients))")
    parser.add_argument("--only-clients", action="store_true", help="skip the first-query, floor and paired sections")
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
    if args.only_clients:
        try:
            side_by_side(args, path, db)
        finally:
            sampling.set()
        print_load(loads)
        return
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
    try:
        side_by_side(args, path, db)
    finally:
        sampling.set()
    print_load(loads)


def print_load(loads: list[float]) -> None:
    print(f"load average (1 min) during the run: min {min(loads):.1f}, median {statistics.median(loads):.1f}, "
          f"max {max(loads):.1f} (sampled every 2 s; {os.cpu_count()} CPUs)")


def start_server(path: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """A warm `trackstar-db serve` (model loaded before it listens) and its URL, once it answers."""
    import httpx

    port = free_port()
    server = subprocess.Popen(CLI + ["serve", str(path), "--port", str(port), "--device", "cpu", *extra],
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(f"{url}/api/health")
            return server, url
        except httpx.TransportError:
            if server.poll() is not None:
                raise SystemExit("the server exited")
            time.sleep(0.1)


def load_clients(url: str, bodies: list[dict], clients: int, per_client: int) -> tuple[list[float], float, int]:
    """`clients` threads at once, client i sending bodies[i % len] `per_client` times one after
    another: (every latency, wall seconds, failures)."""
    import httpx

    latencies, failures, start = [], [], threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            http.get("/api/health")  # the connection is open before the clock starts
            start.wait()
            for _ in range(per_client):
                begin = time.perf_counter()
                try:
                    http.post("/api/query", json=bodies[i % len(bodies)]).raise_for_status()
                    latencies.append(time.perf_counter() - begin)
                except Exception as exc:  # noqa: BLE001 (counted)
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    begin = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - begin, len(failures)


def side_by_side(args, path: Path, db) -> None:
    """The concurrency table: unbatched and batched servers, 1..16 clients, every method."""
    import httpx

    levels = [int(n) for n in args.levels.split(",")]
    queries = db.table("queries", columns=["prompt", "target"]).slice(0, max(levels)).to_pylist()
    servers = {"unbatched": ["--max-batch", "1"], "batched": ["--max-batch", "16"]}
    running = {name: start_server(path, extra) for name, extra in servers.items()}
    table: dict[tuple, tuple] = {}
    try:
        for name, (_, url) in running.items():  # warm every method's R and index reads too
            for method in METHODS:
                httpx.post(f"{url}/api/query", json={"prompt": queries[0]["prompt"], "target": queries[0]["target"],
                                                     "methods": [method], "k": args.k}, timeout=600).raise_for_status()
        print(f"\nconcurrent clients (closed loop, client i asks stored query i; k {args.k}); "
              f"latency p50 / p95 in ms, answers per second:")
        print(f"{'method':10} {'clients':>7} | {'unbatched p50':>13} {'p95':>7} {'rate':>6} | "
              f"{'batched p50':>11} {'p95':>7} {'rate':>6}")
        for method in METHODS:
            bodies = [{"prompt": q["prompt"], "target": q["target"], "methods": [method], "k": args.k} for q in queries]
            for clients in levels:
                per_client = max(args.per_client, -(-args.requests // clients))
                cells = []
                for name, (_, url) in running.items():
                    latencies, wall, failed = load_clients(url, bodies, clients, per_client)
                    ms = [v * 1000 for v in latencies]
                    table[(name, method, clients)] = (percentile(ms, 50), percentile(ms, 95), len(ms) / wall, failed)
                    cells.append(table[(name, method, clients)])
                (u50, u95, urate, ufail), (b50, b95, brate, bfail) = cells
                print(f"{method:10} {clients:7d} | {u50:13.1f} {u95:7.1f} {urate:6.1f} | {b50:11.1f} {b95:7.1f} "
                      f"{brate:6.1f}" + (f"   ({ufail + bfail} failed)" if ufail + bfail else ""), flush=True)
        health = httpx.get(f"{running['batched'][1]}/api/health").json()
        print(f"batched server's model passes by batch size: {health.get('batches')}")
    finally:
        for server, _ in running.values():
            server.terminate()
            server.wait(30)
    if 1 in levels and 8 in levels:
        for name in servers:
            one, eight = table[(name, "trackstar", 1)], table[(name, "trackstar", 8)]
            print(f"{name:9} trackstar: p95 at 8 clients / p50 at 1 client = {eight[1] / one[0]:.2f} (target <= 3); "
                  f"rate at 8 clients / rate at 1 client = {eight[2] / one[2]:.2f} (target >= 3)")


if __name__ == "__main__":
    main()
