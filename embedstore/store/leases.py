"""Leases: several ingests (processes or machines) on one store share the work instead of each
embedding everything.

Before a writer embeds a series it takes the series' lease (one per series and set of models: an
ingest of another model embeds the series too): a small file under `leases/` naming the run, host,
process and an expiry. A lease held by a live writer makes the others skip the series; once its rows
are committed the holder marks it done, and the others leave the series to it while it runs (once it
has ended, its committed rows say what is done). A writer that dies leaves a lease that is free at
once on its own host (its process is gone) and after `LEASE_SECONDS` elsewhere. Leases only save
work: rows stay exactly-once through the commit lock whatever happens to them. The last ingest to
finish removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from enum import Enum
from pathlib import Path

from embedstore.store import Store, exclusive_lock
from embedstore.store.location import is_object_store, remove_tree

LEASES_DIR = "leases"
LEASE_LOCK = ".lock"
LEASE_SECONDS = 600.0  # a unit takes seconds; a lease this old is a dead writer's on another host
NEW_LEASE_SECONDS = 5.0  # an empty lease younger than this is being written, not left by a crash


class Claim(Enum):
    TAKEN = "taken"  # this run embeds it
    HELD = "held"  # a live writer is embedding it
    DONE = "done"  # another writer has finished it


class LeaseBook:
    def __init__(self, store: Store, run_id: str, model_ids: list[str], seconds: float = LEASE_SECONDS):
        self.root = store.path / LEASES_DIR
        self.run_id, self.seconds = run_id, seconds
        self.models = "\n".join(sorted(model_ids))
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.sole_writer = is_object_store(store.path)  # object storage takes one writer: nothing to share

    def claim(self, part: str) -> Claim:
        if self.sole_writer:
            return Claim.TAKEN
        path = self.path_of(part)
        self.root.mkdir(exist_ok=True)  # here, not once: the last ingest to end removes the folder
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._claim_existing(path)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(self._mine(done=False)))
        return Claim.TAKEN

    def finish(self, parts: list[str]) -> None:
        """Mark this run's leases of `parts` done: their rows are committed (or their files failed)."""
        if self.sole_writer:
            return
        for part in parts:
            self._write(self.path_of(part), self._mine(done=True))

    def _claim_existing(self, path: Path) -> Claim:
        with exclusive_lock(self.root / LEASE_LOCK):  # two writers must not both take over one lease
            lease = _read(path)
            if lease is None and time.time() - _mtime(path) < NEW_LEASE_SECONDS:
                return Claim.HELD  # being written by the writer that just made it
            if lease is not None and lease["run_id"] != self.run_id and self._alive(lease):
                return Claim.DONE if lease["done"] else Claim.HELD
            self._write(path, self._mine(done=False))
        return Claim.TAKEN

    def _alive(self, lease: dict) -> bool:
        if lease["expires"] < time.time():
            return False
        if lease["host"] != self.host:
            return True
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True

    def _mine(self, done: bool) -> dict:
        return {"run_id": self.run_id, "host": self.host, "pid": self.pid, "done": done,
                "expires": time.time() + self.seconds}

    def path_of(self, part: str) -> Path:
        """The lease file of a series (or file) for this run's models."""
        return self.root / hashlib.sha1(f"{part}\n{self.models}".encode()).hexdigest()

    @staticmethod
    def _write(path: Path, lease: dict) -> None:
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(lease))
        os.replace(temporary, path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _read(path: Path) -> dict | None:
    """A lease, or None when it is unreadable (a writer killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def clear_leases(store: Store) -> bool:
    """Remove every lease when no ingest runs on the store (the caller has ended its own); a store
    in object storage has none (one writer: nothing to share)."""
    if is_object_store(store.path):
        return True
    if store.ingest_running():
        return False
    remove_tree(store.path / LEASES_DIR)
    return True
