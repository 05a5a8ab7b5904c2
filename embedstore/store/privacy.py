"""Patient identity in the store: PatientID is kept only as a keyed hash unless the user asks.

Patient names, birth dates and other direct identifiers are never read into a row at all (the
readers copy only the fields listed in docs/store-format.md). PatientID is needed to keep a
patient's images on one side of a split, so it is stored as HMAC-SHA256 under a secret key: equal
IDs give equal hashes, and without the key nobody can test a guessed ID against the store. The key
is made once per store (`patient-id.key`, readable by its owner only); set EMBEDSTORE_PATIENT_ID_KEY
to use one key across stores, or to keep the key away from a store you share.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "patient-id.key"
KEY_ENV = "EMBEDSTORE_PATIENT_ID_KEY"
HASHED, AS_READ = "hmac-sha256", "as-read"
HASH_PREFIX = "pid:"
HASH_HEX_CHARS = 32  # 128 bits: no collisions among any archive's patients


def patient_id_key(store_path: Path) -> bytes:
    """The store's hashing key: from the environment, else the store's key file (made on first use)."""
    from_env = os.environ.get(KEY_ENV)
    if from_env:
        return from_env.encode()
    path = store_path / KEY_FILE
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()


def pseudonymise(patient_id: str | None, key: bytes) -> str | None:
    if patient_id is None:
        return None
    digest = hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest[:HASH_HEX_CHARS]
