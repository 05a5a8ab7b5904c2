"""What may leave the service: an allowlist of metadata fields, and identifiers that carry no path.

Keys, series and study UIDs of files that are not DICOM are made from the file's path
(`file:/archive/<patient name>/x.png`), and folder names can carry patient names. Such an
identifier is served as an opaque id, an HMAC of it under a secret kept in the service's cache
folder (stable across restarts, so a shared link keeps working; not testable against guessed
paths without the secret). DICOM keys (`dicom:<SOPInstanceUID>:<frame>`) and UIDs made only of
digits and dots are served as they are. With `--show-paths` everything is served as stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import threading
from pathlib import Path

from embedstore.store import Store

# a DICOM key or UID: digits and dots, nothing a folder name could put there
PLAIN_IDENTIFIER = re.compile(r"^(dicom:)?[0-9.]+(:[0-9]+)?$")
OPAQUE_PREFIX = "id:"
IDENTITY_COLUMNS = ("key", "series_uid", "study_uid")
# the metadata a result or an item shows; patient_id (a keyed hash, still an identifier) and path never
ITEM_FIELDS = ("modality", "body_part", "study_date", "series_description", "slice_index")
# what a `where` may filter on: a filter on a hidden column would let a client test guesses about it
FILTER_COLUMNS = ("modality", "body_part", "study_date", "series_description", "slice_index", "n_slices")
SECRET_FILE = "id-secret"


class PublicIds:
    """Stored identifiers ↔ the ids the service shows."""

    def __init__(self, store: Store, cache_folder: Path, show_paths: bool):
        self.store, self.show_paths = store, show_paths
        self.secret = _secret(cache_folder)
        self._stored: dict[str, str] = {}  # opaque id → stored identifier
        self._lock = threading.Lock()

    def public(self, identifier: str | None) -> str | None:
        if identifier is None or self.show_paths or PLAIN_IDENTIFIER.match(identifier):
            return identifier
        return OPAQUE_PREFIX + hmac.new(self.secret, identifier.encode(), hashlib.sha256).hexdigest()[:32]

    def stored(self, public_id: str) -> str | None:
        """The stored identifier behind an id the service showed; None for an id it never could have."""
        if self.show_paths or PLAIN_IDENTIFIER.match(public_id):
            return public_id
        if not public_id.startswith(OPAQUE_PREFIX):
            return None
        with self._lock:
            if public_id not in self._stored:  # new rows since the last look: index the items again
                columns = self.store.rows("items", None, list(IDENTITY_COLUMNS))
                self._stored = {self.public(value): value for name in IDENTITY_COLUMNS
                                for value in set(columns.column(name).to_pylist())}
            return self._stored.get(public_id)


def _secret(cache_folder: Path) -> bytes:
    path = cache_folder / SECRET_FILE
    if not path.exists():
        cache_folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        try:
            with contextlib.suppress(FileExistsError):  # link never replaces: two services share the first secret
                os.link(temporary, path)
        finally:
            temporary.unlink()
    return path.read_bytes()
