"""What the serve tests share: a small database the server can answer every method on (the tiny
world, its gradients and R, a stored bm25 and grad-cos run, and one corpus text that holds
HTML and a script), and a uvicorn server running an app in a thread of the test process."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

EVIL_ID = "evil-1"
EVIL_TEXT = ("Zanzibar marker <script>document.title='pwned'</script> "
             "<img src=x onerror=\"window.__xss=1\"> &amp; done")
EVIL_PROMPT, EVIL_TARGET = "Zanzibar marker", "pwned"


def build_serve_db(template: Path, root: Path) -> Path:
    """root/db: a copy of the tiny database with the hostile text, both gradient tables (d=1,024),
    R, and runs of bm25 and grad-cos over the prompt0 queries (k 5)."""
    from trackstar_db import connect
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
    from trackstar_db.sources.corpus import ingest_corpus

    shutil.copytree(template / "model", root / "model")
    shutil.copytree(template / "db", root / "db")
    db = connect(root / "db")
    db.set_model(root / "model")
    (root / "evil.jsonl").write_text(json.dumps({"id": EVIL_ID, "text": EVIL_TEXT}) + "\n", encoding="utf-8")
    ingest_corpus(db, [root / "evil.jsonl"], progress=False)
    for split in ("train", "queries"):
        ingest_gradients(db, FeaturizerConfig(dim=1024, correction="adam-factored"),
                         GradientJob(split, batch_size=32, device="cpu"), progress=False)
    fit(db)
    for method in ("bm25", "grad-cos"):
        retrieve(db, method, RetrieveOptions(k=5, device="cpu"))
    return root / "db"


@contextlib.contextmanager
def live_server(asgi):
    """Serve `asgi` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
