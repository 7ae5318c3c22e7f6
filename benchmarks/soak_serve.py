"""A soak of `trackstar-db serve` (issue 34, item 5): many clients and a writer at once, for a stated time.

The database is benchmarks/bench_query.py's (built once in --workdir, the tiny world by default:
a 2-core machine featurizes and refits it in seconds), copied afresh for every soak. Then:

    server    `trackstar-db serve DB --device cpu` started as a user would (warm: the model is
              loaded at start), following the newest committed version; then 20 s of the
              clients' requests as a warm-up, after which its RSS is taken as the start
    clients   --clients threads (8), each asking in turn: /api/query with one method of
              trackstar, r-train, grad-cos and bm25, /api/sql, /api/runs, /api/evaluation,
              /api/examples/{id} and /api/version, for --minutes (10)
    writer    one process, in a loop until the time is up: append --append new examples
              (texts that share the clients' query words, so BM25 and the gradient methods
              rank them), featurize them, refit R and replace the bm25 run. One cycle is one
              commit (it holds the writer lock throughout): between an ingest and its refit
              the stored R would trail the gradients, a state the server refuses to score;
              it rests --pause seconds (2) between cycles, when the server moves to the new version

Reported: requests served and errors (any answer but 200, or a transport error: must be 0),
p50/p95 latency per minute (all requests, and /api/query alone; the last row is a part minute
when --minutes is not whole), the server's RSS (VmRSS of its process) at start (after the
warm-up) and at the end, writer cycles, and
whether every answer matched one committed version (below), and two figures that tell growth
of the database from growth of the server: the RSS growth over the second half of the soak, and
the RSS of a fresh server on the final database after the same 20 s warm-up (--no-fresh skips it;
what the soak's server holds beyond it is what the versions it served cost). --no-writer is the
control: the clients alone on one version.

Every answer is checked against one committed version:
  - every hit of every /api/query answer carries its example's text (a hit on an example the
    answer's version does not hold would have none), BM25 included;
  - every /api/sql answer finds no retrieval or ground-truth row naming an example it lacks;
  - every /api/version answer's table versions equal one committed record (DB/versions.json
    as the writer left it after a cycle, or as it was at the start).

    python benchmarks/soak_serve.py                    # 10 minutes
    python benchmarks/soak_serve.py --minutes 1.5      # a short try
    python benchmarks/soak_serve.py --minutes 3 --no-writer   # the control: no version moves
    python benchmarks/soak_serve.py --minutes 4 --kinds "sql,runs,evaluation,example,version"   # some kinds only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_query import build  # noqa: E402

CLI = [sys.executable, "-m", "trackstar_db.cli"]
METHODS = ("trackstar", "r-train", "grad-cos", "bm25")
KINDS = [f"query {m}" for m in METHODS] + ["sql", "runs", "evaluation", "example", "version"]
SQL = ("SELECT (SELECT count(*) FROM examples) AS examples, "
       "(SELECT count(*) FROM retrievals WHERE example_id NOT IN (SELECT example_id FROM examples)) AS stray, "
       "(SELECT count(*) FROM ground_truth WHERE example_id NOT IN (SELECT example_id FROM examples)) AS lost")

WRITER = r"""
import json, sys, time
from pathlib import Path
from trackstar_db import connect
from trackstar_db.gradients.fit import fit
from trackstar_db.gradients.worker import GradientJob, ingest_gradients
from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
from trackstar_db.sources.corpus import ingest_corpus

path, until, per_cycle, prompt, target, out, pause = (sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                                      sys.argv[5], sys.argv[6], float(sys.argv[7]))
db = connect(path)
records = [json.loads((Path(path) / "versions.json").read_text())["tables"]]
cycle, seconds = 0, []
while time.time() < until:
    begin = time.perf_counter()
    texts = Path(out).with_name(f"cycle-{cycle}.jsonl")
    texts.write_text("".join(json.dumps({"sentence_id": f"soak-{cycle}-{i}", "text": f"{prompt} {target}, cycle {cycle}, {i}."}) + "\n"
                             for i in range(per_cycle)))
    with db.writer("soak cycle", timeout=600):  # one commit: examples, their gradients, R and the run together
        ingest_corpus(db, [texts], progress=False)
        ingest_gradients(db, None, GradientJob("train", batch_size=32, device="cpu"), progress=False)
        fit(db)
        retrieve(db, "bm25", RetrieveOptions(k=5), replace=True)
    records.append(json.loads((Path(path) / "versions.json").read_text())["tables"])
    seconds.append(time.perf_counter() - begin)
    cycle += 1
    time.sleep(max(0.0, min(pause, until - time.time())))  # no writer at work: the server moves to the new version
Path(out).write_text(json.dumps({"cycles": cycle, "seconds": seconds, "records": records}))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`trackstar-db serve DB --device cpu` on a free port, started as a user would."""

    def __init__(self, path: Path, env: dict):
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(CLI + ["serve", str(path), "--port", str(port), "--device", "cpu"], env=env,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        with httpx.Client(base_url=self.url, timeout=600) as http:
            while True:
                try:
                    http.get("/api/health").raise_for_status()
                    return
                except httpx.TransportError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise SystemExit(f"the server did not start: {self.process.stderr.read()[-2000:]}")
                    time.sleep(0.2)

    def warm_up(self, warm: "Soak", clients: int, seconds: float = 20.0) -> None:
        """`seconds` of every client's requests: every kind answered by every client thread, the
        warm state a soak starts from."""
        threads = [threading.Thread(target=warm.client, args=(i, time.time() + seconds)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if warm.errors:
            raise SystemExit(f"warm-up failed: {warm.errors[0]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


class Soak:
    """The clients' shared record: (time, kind, seconds, ok) of every request and every mismatch."""

    def __init__(self, url: str, prompt: str, target: str, k: int, example_ids: list[str], kinds: list[str] = KINDS):
        self.url, self.prompt, self.target, self.k, self.ids, self.kinds = url, prompt, target, k, example_ids, kinds
        self.lock = threading.Lock()
        self.requests: list[tuple[float, str, float, bool]] = []
        self.errors: list[str] = []
        self.mismatches: list[str] = []
        self.versions: list[dict] = []  # /api/version's table versions, checked against the committed records

    def ask(self, client, kind: str, call) -> None:
        begin = time.perf_counter()
        try:
            response = call()
            ok = response.status_code == 200
            problem = None if ok else f"{kind}: HTTP {response.status_code}: {response.text[:300]}"
            if ok:
                self.check(kind, response.json())
        except Exception as exc:  # noqa: BLE001 (a transport error is an error of the soak)
            ok, problem = False, f"{kind}: {type(exc).__name__}: {exc}"
        with self.lock:
            self.requests.append((time.time(), kind, time.perf_counter() - begin, ok))
            if problem:
                self.errors.append(problem)

    def check(self, kind: str, answer: dict) -> None:
        """Does the answer belong to one committed version? (see the module doc)"""
        wrong = None
        if kind.startswith("query"):
            for result in answer["results"]:
                hits = result["proponents"] + result["opponents"]
                if not result["proponents"] or any(h["text"] is None for h in hits):
                    wrong = f"{kind}: a hit without its example's text (version {answer['version']})"
        elif kind == "sql":
            row = dict(zip([c["name"] for c in answer["columns"]], answer["rows"][0]))
            if row["stray"] or row["lost"]:
                wrong = f"sql: rows naming examples the version lacks: {row}"
        elif kind == "version":
            with self.lock:
                self.versions.append(answer["tables"])
        if wrong:
            with self.lock:
                self.mismatches.append(wrong)

    def client(self, index: int, until: float) -> None:
        import httpx

        kinds = itertools.cycle(self.kinds)
        for _ in range(index):  # the clients start at different points of the cycle
            next(kinds)
        with httpx.Client(base_url=self.url, timeout=600) as http:
            step = 0
            while time.time() < until:
                kind = next(kinds)
                step += 1
                if kind.startswith("query"):
                    body = {"prompt": self.prompt, "target": self.target, "methods": [kind.split()[1]], "k": self.k}
                    self.ask(http, kind, lambda: http.post("/api/query", json=body))
                elif kind == "sql":
                    self.ask(http, kind, lambda: http.post("/api/sql", json={"sql": SQL, "limit": 10}))
                elif kind == "example":
                    eid = self.ids[(index * 7919 + step) % len(self.ids)]
                    self.ask(http, kind, lambda: http.get(f"/api/examples/{eid}"))
                else:
                    self.ask(http, kind, lambda: http.get(f"/api/{kind}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-soak"))
    parser.add_argument("--size", default="tiny", choices=["demo", "tiny"])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--append", type=int, default=8, help="examples the writer appends per cycle")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--pause", type=float, default=2.0, help="seconds the writer rests between cycles")
    parser.add_argument("--kinds", default=None,
                        help="comma-separated request kinds the clients cycle through (default: all of "
                             + ", ".join(KINDS) + "); e.g. 'query trackstar,version' to tell which kind grows memory")
    parser.add_argument("--writer", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-writer: the control, clients alone on one version")
    parser.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                        help="at the end, a fresh server on the final database, warmed up alike: its RSS")
    args = parser.parse_args()
    kinds = KINDS if args.kinds is None else [k.strip() for k in args.kinds.split(",")]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds: choose among {', '.join(KINDS)}")
    from trackstar_db import connect

    built = build(args.workdir, args.size, args.dim)
    path = args.workdir / "soak-db"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(built, path)
    db = connect(path)
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve

    if "bm25" not in db.ids("runs", "run_id"):
        retrieve(db, "bm25", RetrieveOptions(k=args.k))
    first = db.table("queries", columns=["prompt", "target"]).slice(0, 1).to_pylist()[0]
    prompt, target = first["prompt"], first["target"]
    ids = db.table("examples", columns=["example_id"]).column(0).to_pylist()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"{path}: {db.count('examples'):,} examples, d {args.dim}; {args.clients} clients asking "
          f"{'every kind' if kinds == KINDS else ', '.join(kinds)}, {args.minutes:g} min; "
          f"commit {commit}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    server = Server(path, env)
    url = server.url
    loads, rss, sampling = [], [], threading.Event()
    writer = None
    try:
        server.warm_up(Soak(url, prompt, target, args.k, ids, kinds), args.clients)
        start_rss = rss_kib(server.process.pid)
        begin = time.time()
        until = begin + args.minutes * 60

        def sample() -> None:
            while not sampling.wait(5.0):
                loads.append((time.time(), os.getloadavg()[0]))
                rss.append((time.time(), rss_kib(server.process.pid)))

        threading.Thread(target=sample, daemon=True).start()
        out = args.workdir / "soak-writer.json"
        out.unlink(missing_ok=True)
        if args.writer:
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(until), str(args.append), prompt,
                                       target, str(out), str(args.pause)], env=env, stderr=subprocess.PIPE, text=True)
        soak = Soak(url, prompt, target, args.k, ids, kinds)
        threads = [threading.Thread(target=soak.client, args=(i, until)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if writer is not None:
            _, werr = writer.communicate(timeout=900)
            if writer.returncode != 0:
                raise SystemExit(f"the writer failed: {werr[-3000:]}")
            wrote = json.loads(out.read_text())
        else:  # the one version committed before the soak
            wrote = {"cycles": 0, "seconds": [], "records": [json.loads((path / "versions.json").read_text())["tables"]]}
        end_rss = rss_kib(server.process.pid)
    finally:
        sampling.set()
        if writer is not None and writer.poll() is None:
            writer.kill()
        server.stop()
    fresh_rss = None
    if args.fresh:  # the control: what a server holds for the final database alone, after the same warm-up
        fresh = Server(path, env)
        try:
            fresh.warm_up(Soak(fresh.url, prompt, target, args.k, ids, kinds), args.clients)
            fresh_rss = rss_kib(fresh.process.pid)
        finally:
            fresh.stop()

    committed = [json.dumps(r, sort_keys=True) for r in wrote["records"]]
    unmatched = [v for v in soak.versions if json.dumps(v, sort_keys=True) not in committed]
    print(f"\nwriter: none (--no-writer): one version for the whole soak" if writer is None else
          f"\nwriter: {wrote['cycles']} cycles of +{args.append} examples, featurize, refit, replace the bm25 run "
          f"(p50 {percentile(wrote['seconds'], 50):.1f} s a cycle); {connect(path).count('examples'):,} examples "
          "at the end")
    print(f"{'minute':>6} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8} {'query p50':>10} {'query p95':>10} "
          f"{'load':>5} {'RSS MiB':>8}")
    for minute in range(int(-(-args.minutes // 1))):
        lo, hi = begin + 60 * minute, begin + 60 * (minute + 1)
        done = [r for r in soak.requests if lo <= r[0] < hi]
        ms = [r[2] * 1000 for r in done]
        queries = [r[2] * 1000 for r in done if r[1].startswith("query")]
        load = [x for t, x in loads if lo <= t < hi]
        mem = [x for t, x in rss if lo <= t < hi]
        print(f"{minute + 1:>6} {len(done):>9} {sum(not r[3] for r in done):>7} {percentile(ms, 50):>8.1f} "
              f"{percentile(ms, 95):>8.1f} {percentile(queries, 50):>10.1f} {percentile(queries, 95):>10.1f} "
              f"{statistics.mean(load) if load else float('nan'):>5.2f} {(mem[-1] / 1024 if mem else float('nan')):>8.1f}")
    by_kind = {}
    for _, kind, seconds, _ in soak.requests:
        by_kind.setdefault(kind, []).append(seconds * 1000)
    for kind, ms in sorted(by_kind.items()):
        print(f"  {kind:16} n {len(ms):6}  p50 {percentile(ms, 50):8.1f} ms  p95 {percentile(ms, 95):8.1f} ms")
    growth = (end_rss - start_rss) / start_rss * 100
    print(f"\nrequests served: {len(soak.requests):,}; errors: {len(soak.errors)}"
          + (f" (first: {soak.errors[0]})" if soak.errors else ""))
    print(f"server RSS: {start_rss / 1024:.1f} MiB at start, {end_rss / 1024:.1f} MiB at the end ({growth:+.1f}%)")
    half = [x for t, x in rss if t >= begin + args.minutes * 30]
    if half and args.minutes >= 2:
        print(f"  steady state: {half[0] / 1024:.1f} MiB at minute {args.minutes / 2:g}, {end_rss / 1024:.1f} MiB at "
              f"the end ({(end_rss - half[0]) / half[0] * 100:+.1f}% over the second half)")
    if fresh_rss is not None:
        print(f"  a fresh server on the final database, after the same warm-up: {fresh_rss / 1024:.1f} MiB "
              f"({(fresh_rss - start_rss) / start_rss * 100:+.1f}% on the soak's start: what the larger database "
              f"itself costs); the soak's server held {(end_rss - fresh_rss) / 1024:+.1f} MiB more than it")
    matched = not soak.mismatches and not unmatched
    print(f"every answer matched one committed version: {'yes' if matched else 'NO'} "
          f"({len(soak.versions)} /api/version answers over {len(set(map(json.dumps, soak.versions)))} versions, "
          f"{len(committed)} committed records; {len(soak.mismatches)} answers with a mismatch, {len(unmatched)} "
          "versions not committed)" + (f"; first: {(soak.mismatches + [str(u) for u in unmatched])[0]}"
                                       if not matched else ""))
    print(f"load average (1 min): min {min(x for _, x in loads):.2f}, median {statistics.median(x for _, x in loads):.2f}, "
          f"max {max(x for _, x in loads):.2f} (sampled every 5 s)" if loads else "")
    if soak.errors or not matched:
        sys.exit(1)


if __name__ == "__main__":
    main()
