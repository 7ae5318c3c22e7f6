"""A database at s3://bucket/db: the tables in place, the small files through a local cache.

    s3://bucket/db/tables/...              LanceDB tables, read and written in place (tables_uri)
    s3://bucket/db/manifest.json           uploaded last, swapped only if nobody changed it since
    s3://bucket/db/bm25/, preconditioners/ mirrored files (Tantivy and safetensors need a local
                                           directory: built or read in the cache, uploaded)

`open_database(uri)` downloads the small files that changed (by ETag) into a cache directory
(TRACKSTAR_CACHE, default ~/.cache/trackstar-db, then bucket/prefix), yields a Database on it
whose tables live at uri/tables, and on a clean exit uploads what the block changed, removes
what it deleted, and writes manifest.json last with If-Match on the ETag it was read at
(If-None-Match: * for a new database). A writer that lost that race gets a one-line error and
reruns; its manifest never overwrites the other's. Endpoint and credentials come from the AWS_*
environment (AWS_ENDPOINT_URL or AWS_ENDPOINT, AWS_REGION, keys), the same variables Lance reads.

Limits: the writer lock and journal stay in the cache (one writer per cache); files other than
the manifest are uploaded before the swap under fixed names, so the loser of a race may already
have replaced a BM25 or R file the winner's manifest describes (`trackstar-db check` sees the
sha256 of an R file differ); content-addressed names would close that (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from trackstar_db.errors import TrackstarError

MANIFEST = "manifest.json"
LOCAL_ONLY = (".writer.lock", "journal.json")  # one cache's own lock and journal, never shared


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise TrackstarError(f"{uri}: expected s3://bucket/prefix")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def _client():
    try:
        import boto3
    except ImportError:
        raise TrackstarError("a database at s3:// needs boto3: pip install 'trackstar-db[s3]'") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION"))


def cache_dir(uri: str) -> Path:
    bucket, prefix = split_uri(uri)
    root = Path(os.environ.get("TRACKSTAR_CACHE", "~/.cache/trackstar-db")).expanduser()
    return root / bucket / (prefix or "_")


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _shared(rel: str) -> bool:
    return not rel.startswith("tables/") and rel not in LOCAL_ONLY and ".tmp" not in rel


def remote_files(client, uri: str) -> dict[str, str]:
    """{relative path: ETag} of the database's objects outside tables/."""
    bucket, prefix = split_uri(uri)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_key(prefix, "")):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(_key(prefix, "")):]
            if rel and _shared(rel):
                out[rel] = obj["ETag"].strip('"')
    return out


def pull(uri: str, client=None) -> tuple[Path, dict[str, str]]:
    """Bring the cache up to date with the bucket; (cache directory, ETags as read)."""
    client = client or _client()
    bucket, prefix = split_uri(uri)
    cache = cache_dir(uri)
    cache.mkdir(parents=True, exist_ok=True)
    remote = remote_files(client, uri)
    for rel, etag in remote.items():
        path = cache / rel
        if not (path.is_file() and _md5(path) == etag):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp-pull")
            client.download_file(bucket, _key(prefix, rel), str(tmp))
            tmp.replace(path)
    for path in _local_files(cache):
        if path.relative_to(cache).as_posix() not in remote:
            path.unlink()  # deleted in the bucket since this cache last saw it
    return cache, remote


def push(uri: str, cache: Path, before: dict[str, str], client=None) -> None:
    """Upload what changed in the cache since `pull`, the manifest last and only if unchanged."""
    client = client or _client()
    bucket, prefix = split_uri(uri)
    local = {p.relative_to(cache).as_posix(): p for p in _local_files(cache)}
    for rel, path in sorted(local.items()):
        if rel != MANIFEST and _md5(path) != before.get(rel):
            client.put_object(Bucket=bucket, Key=_key(prefix, rel), Body=path.read_bytes())
    manifest = local.get(MANIFEST)
    if manifest is None or _md5(manifest) == before.get(MANIFEST):
        _delete_gone(client, bucket, prefix, before, local)
        return
    condition = {"IfMatch": before[MANIFEST]} if MANIFEST in before else {"IfNoneMatch": "*"}
    try:
        client.put_object(Bucket=bucket, Key=_key(prefix, MANIFEST), Body=manifest.read_bytes(), **condition)
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            raise TrackstarError(f"{uri}: another command changed the database's manifest since this one read it; "
                                 "run it again") from None
        raise
    _delete_gone(client, bucket, prefix, before, local)


def _delete_gone(client, bucket, prefix, before, local) -> None:
    for rel in before:
        if rel not in local:
            client.delete_object(Bucket=bucket, Key=_key(prefix, rel))


def _local_files(cache: Path):
    return [p for p in cache.rglob("*") if p.is_file() and _shared(p.relative_to(cache).as_posix())]


def _md5(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


@contextlib.contextmanager
def open_database(uri: str, create: bool = False, model_dir=None, handle=None):
    """The database at `uri` (s3://bucket/db) on its local cache; changes are uploaded on exit.
    create: make one there when the bucket holds none (model_dir as for `init --model`);
    handle: the class opened (default store.database.Store; the CLI passes trackstar_db.Database)."""
    from trackstar_db.store.database import Store

    handle = handle or Store

    uri = uri.rstrip("/")
    client = _client()
    cache, before = pull(uri, client)
    tables = f"{uri}/tables"
    if MANIFEST not in before:
        if not create:
            raise TrackstarError(f"{uri}: no trackstar-db database here (no {MANIFEST})")
        db = handle.create(cache, model_dir, tables_uri=tables, exist_ok=(cache / MANIFEST).exists())
    else:
        db = handle.open(cache)
        if db.manifest.get("tables_uri") != tables:
            raise TrackstarError(f"{uri}/{MANIFEST}: its tables are at {db.manifest.get('tables_uri')!r}, not {tables!r}")
        if model_dir is not None:
            db.set_model(model_dir)
    yield db
    push(uri, cache, before, client)


def object_uri(db) -> str | None:
    """'s3://bucket/db' for a command's DB argument naming one (click's Path keeps one slash), else None."""
    text = str(db)
    return "s3://" + text[4:].lstrip("/") if text.startswith("s3:/") else None


def open_for_command(uri: str, create: bool = False, model_dir=None, handle=None):
    """open_database for the running CLI command: its changes are uploaded when the command ends
    without an error; after an error nothing is uploaded (the next pull restores the cache)."""
    import sys

    import click

    manager = open_database(uri, create=create, model_dir=model_dir, handle=handle)
    db = manager.__enter__()

    def finish():
        if sys.exc_info()[1] is None:
            manager.__exit__(None, None, None)

    click.get_current_context().call_on_close(finish)
    return db
