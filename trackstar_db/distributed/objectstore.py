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
import sys
from pathlib import Path

import click

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
        import boto3  # heavy: boto3
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


def pull(uri: str, client=None, cache: Path | None = None) -> tuple[Path, dict[str, str]]:
    """Bring the cache (default cache_dir(uri)) up to date with the bucket; (cache directory, ETags as read)."""
    client = client or _client()
    bucket, prefix = split_uri(uri)
    cache = cache or cache_dir(uri)
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


class Remote:
    """The object-store home of a handle opened on its cache: `push()` uploads what changed since
    the pull (the manifest last, swapped only if unchanged); `changed()` says whether the bucket's
    small files differ from the ones this cache read (one LIST request)."""

    def __init__(self, uri: str, cache: Path, before: dict[str, str], client):
        self.uri, self.cache, self.before, self.client = uri, cache, before, client

    def push(self) -> None:
        push(self.uri, self.cache, self.before, self.client)
        self.before = {p.relative_to(self.cache).as_posix(): _md5(p) for p in _local_files(self.cache)}

    def marks(self) -> dict[str, str]:
        """{relative path: ETag} of the small files in the bucket now."""
        return remote_files(self.client, self.uri)


def has_tables(client, uri: str) -> bool:
    """Does the bucket hold any object under uri/tables/?"""
    bucket, prefix = split_uri(uri)
    return bool(client.list_objects_v2(Bucket=bucket, Prefix=_key(prefix, "tables/"), MaxKeys=1).get("KeyCount"))


def tables_home(client, uri: str, manifest: dict) -> str | None:
    """uri/tables where the database's tables are (or the manifest names no other place), else
    None: the manifest's tables_uri applies (a directory uploaded whose tables lived elsewhere)."""
    recorded = manifest.get("tables_uri")
    return f"{uri}/tables" if recorded in (None, f"{uri}/tables") or has_tables(client, uri) else None


def open_remote(uri: str, create: bool = False, model_dir=None, handle=None):
    """The database at `uri` (s3://bucket/db) on its local cache, its tables at uri/tables, with
    `.remote` (Remote) to upload its changes. A directory uploaded as plain files (`aws s3 sync
    DB s3://bucket/db`) opens so, its manifest's tables_uri aside: tables live beside the
    manifest wherever the database is (a `tables_uri` elsewhere is used only when uri/tables is
    empty). create: make one there when the bucket holds none (model_dir as for `init --model`);
    handle: the class opened (default store.database.Store; trackstar_db.connect passes Database)."""
    from trackstar_db.store.database import Store  # heavy: pyarrow

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
        db._tables_at = tables_home(client, uri, db.manifest)
        if model_dir is not None:
            db.set_model(model_dir)
    db.remote = Remote(uri, cache, before, client)
    return db


@contextlib.contextmanager
def open_database(uri: str, create: bool = False, model_dir=None, handle=None):
    """open_remote as a block: the changes are uploaded when it ends without an error."""
    db = open_remote(uri, create=create, model_dir=model_dir, handle=handle)
    yield db
    db.remote.push()


SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "file://", "memory://")


def is_uri(location) -> bool:
    """Does `location` name an object store (s3://..., also as click's Path writes it, s3:/...)?"""
    text = str(location)
    return any(text.startswith(scheme[:-1]) for scheme in SCHEMES)


def normal_uri(location) -> str:
    """'s3://bucket/db' for s3://bucket/db or s3:/bucket/db (a Path keeps one slash); other object
    stores are refused in one line (the database's small files go through boto3's S3 API)."""
    text = str(location)
    scheme, _, rest = text.partition(":")
    if scheme != "s3":
        raise TrackstarError(f"{text}: only s3:// object stores hold a database (S3-compatible endpoints such as "
                             "MinIO, R2 or GCS's XML API: set AWS_ENDPOINT_URL)")
    return "s3://" + rest.lstrip("/")


def object_uri(db) -> str | None:
    """'s3://bucket/db' for a command's DB argument naming one (click's Path keeps one slash), else None."""
    return normal_uri(db) if is_uri(db) else None


def open_for_command(uri: str, create: bool = False, model_dir=None, handle=None):
    """open_remote for the running CLI command: its changes are uploaded when the command ends
    without an error; after an error nothing is uploaded (the next pull restores the cache)."""
    db = open_remote(uri, create=create, model_dir=model_dir, handle=handle)
    upload_on_close(db)
    return db


def upload_on_close(db) -> None:
    """Upload `db`'s changes (db.remote) when the running click command ends without an error."""
    def finish():
        if sys.exc_info()[1] is None:
            db.remote.push()

    click.get_current_context().call_on_close(finish)
