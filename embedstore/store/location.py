"""Where a store lives: a local (or shared) folder, or a prefix in S3-compatible object storage.

A local store's root is a `pathlib.Path`; an `s3://bucket/prefix` store's root is a
universal_pathlib `UPath` over obstore's fsspec file system, so the store's code reads, lists and
writes both through one Path API. What a Path cannot say has one function here each: Lance's and
Zarr's own ways in (Lance talks S3 natively; Zarr through `zarr.storage.ObjectStore` on obstore),
a whole-file replace (a rename locally, a PUT on S3, which is atomic), a folder's removal, a tree's
files, and the locks.

Locks: locally, `flock` (the kernel drops the lock of a dead process). On S3 there is no flock, so a
lock is an object created only if absent (a conditional PUT, `If-None-Match: *`). Its holder rewrites
it every `HEARTBEAT_S` seconds; one not rewritten for `STALE_AFTER_S` seconds belongs to a dead
process and is taken over by a PUT conditional on the stale copy's ETag (`If-Match`), so two waiters
never both take it. Credentials, region and endpoint come from the standard AWS environment
variables (obstore and Lance read them) and are never written to the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from embedstore.errors import UsageError
from embedstore.sources.objects import SCHEME, check_listable, endpoint_url, split, store_for

HEARTBEAT_S = 5.0
STALE_AFTER_S = 30.0  # six missed heartbeats: the holder is dead (or cut off, and then not writing either)
LOCK_POLL_S = 0.05
CACHE_ENV = "EMBEDSTORE_CACHE"


def is_object_store(path) -> bool:
    return str(path).startswith(SCHEME)


def store_root(path: str | Path):
    """The store's root: a Path for a folder, a UPath for `s3://bucket/prefix`."""
    if isinstance(path, Path) or not is_object_store(path):
        return Path(path)
    if not isinstance(path, str):  # already a UPath
        return path
    import obstore.fsspec
    from upath import UPath

    obstore.fsspec.register("s3")  # fsspec's "s3" through obstore, the client sources already use
    bucket, prefix = split(path)
    if not bucket:
        raise UsageError(f"an object-storage store is s3://BUCKET/PREFIX, not {path}")
    endpoint = endpoint_url()
    return UPath(f"{SCHEME}{bucket}/{prefix}".rstrip("/"), **({"endpoint": endpoint} if endpoint else {}),
                 client_options={"allow_http": endpoint.startswith("http://")})


def lance_options(root) -> dict[str, str] | None:
    """Storage options for Lance and LanceDB: none locally; on S3 the endpoint of an S3-compatible
    server (Lance reads the credentials and region from the environment itself)."""
    if not is_object_store(root):
        return None
    endpoint = endpoint_url()
    return {"aws_endpoint": endpoint, "allow_http": str(endpoint.startswith("http://")).lower()} if endpoint else {}


def zarr_location(path) -> dict:
    """Arguments that point `zarr.open_group` / `zarr.open_array` at `path`. On S3 the Zarr store is
    rooted at `path` itself, as a folder's is: rooted higher, Zarr would write group metadata into
    every folder above it."""
    if not is_object_store(path):
        return {"store": str(path)}
    from zarr.storage import ObjectStore

    bucket, key = split(str(path))
    return {"store": ObjectStore(store_for(bucket, prefix=key))}


def replace_file(path, data: bytes, mode: int | None = None) -> None:
    """Write a file whole: a reader sees the old bytes or the new, never half (locally a rename of
    `<name>.tmp`, so call it under the lock that guards the file; on S3 one PUT, which is atomic).
    `mode` sets a local file's permissions before its bytes are written."""
    if is_object_store(path):
        path.write_bytes(data)
        return
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def remove_tree(path) -> None:
    """Remove a folder (an S3 prefix) and everything under it; nothing when it is not there."""
    if not is_object_store(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    found = path.fs.find(path.path)
    if found:
        path.fs.rm(found)


def tree_files(path) -> Iterator[tuple[str, int, str]]:
    """(path relative to `path`, size, version) of every file under `path`: the version is the
    modification time in ns locally, the ETag (a digest of the bytes) on S3."""
    if is_object_store(path):
        import obstore

        bucket, key = split(str(path))
        for page in obstore.list(store_for(bucket), prefix=f"{key}/"):
            for found in page:
                yield found["path"][len(key) + 1:], int(found["size"]), str(found["e_tag"])
        return
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            info = os.stat(full)
            yield os.path.relpath(full, path), info.st_size, str(info.st_mtime_ns)


def tree_bytes(path) -> int:
    return sum(size for _, size, _ in tree_files(path))


def local_folder(root, name: str) -> Path:
    """A local folder for what the store keeps beside its tables: under the store itself when it is
    local; for an S3 store, under the user's cache (EMBEDSTORE_CACHE, else ~/.cache/embedstore), one
    folder per store address, so that derived copies stay on fast local disk."""
    if not is_object_store(root):
        return root / name
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "embedstore")
    return cache / "stores" / hashlib.sha256(str(root).encode()).hexdigest()[:16] / name


def check_bucket(root) -> None:
    """UsageError unless the store's bucket answers to this process's credentials (one listing)."""
    check_listable(str(root), f"the store {root}")


class ObjectLock:
    """A lock held as an object (see the module's docstring). `acquire(wait)` takes it, or returns
    False at once when `wait` is off and it is held; `holder()` says who holds it."""

    def __init__(self, path):
        self.path = path
        self.bucket, self.key = split(str(path))
        self.token = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex, "since": 0.0}
        self._etag: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def _store(self):
        return store_for(self.bucket)

    def acquire(self, wait: bool) -> bool:
        self.token["since"] = time.time()
        while not self._try_take():
            if not wait:
                return False
            time.sleep(LOCK_POLL_S)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"lock {self.key}")
        self._beat.start()
        return True

    def _try_take(self) -> bool:
        """Make the lock object, or take over a stale one; False while a live holder has it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        while True:  # until the object is made here, or found held
            try:
                self._etag = obstore.put(self._store, self.key, self._body(), mode="create")["e_tag"]
                return True
            except AlreadyExistsError:
                try:
                    held = obstore.head(self._store, self.key)
                except FileNotFoundError:  # released meanwhile: make it again
                    continue
            if time.time() - held["last_modified"].timestamp() <= STALE_AFTER_S:
                return False
            try:  # a dead holder's: taken over only if nobody rewrote it since (If-Match)
                self._etag = obstore.put(self._store, self.key, self._body(), mode={"e_tag": held["e_tag"]})["e_tag"]
                return True
            except PreconditionError:  # another waiter took it over first
                return False

    def release(self) -> None:
        import obstore

        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        obstore.delete(self._store, self.key)

    def holder(self) -> dict | None:
        """The live holder's host, pid and since when; None when the lock is free (or stale)."""
        import obstore

        try:
            found = obstore.get(self._store, self.key)
            body = json.loads(bytes(found.bytes()))
        except (FileNotFoundError, ValueError):  # obstore's NotFoundError is a FileNotFoundError
            return None
        if time.time() - found.meta["last_modified"].timestamp() > STALE_AFTER_S:
            return None
        return body

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire(wait=True)
        try:
            yield
        finally:
            self.release()

    def _body(self) -> bytes:
        return json.dumps({**self.token, "beat": time.time()}).encode()  # new bytes, so a new ETag, each beat

    def _heartbeat(self) -> None:
        import obstore

        while not self._stop.wait(HEARTBEAT_S):
            self._etag = obstore.put(self._store, self.key, self._body(), mode={"e_tag": self._etag})["e_tag"]
