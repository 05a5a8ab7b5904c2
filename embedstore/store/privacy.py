"""Patient identity in the store: PatientID is kept only as a keyed hash unless the user asks.

Patient names, birth dates and other direct identifiers are never read into a row at all (the
readers copy only the fields listed in docs/store-format.md). PatientID is needed to keep a
patient's images on one side of a split, so it is stored as HMAC-SHA256 under a secret key: equal
IDs give equal hashes, and without the key nobody can test a guessed ID against the store. The key
is made once per store (`patient-id.key`, readable by its owner only); set EMBEDSTORE_PATIENT_ID_KEY
to use one key across stores, or to keep the key away from a store you share.

The manifest records a fingerprint of the key (an HMAC of a fixed label under it: it tells keys
apart and reveals nothing of the key), and so does `patient-id.fingerprint` beside it, so that the
fingerprint outlives a damaged manifest (`embedstore check --repair` rebuilds the manifest from it).
A key that does not match it, or a key file that is gone, is refused: a new key would give every
patient a second hash, and a split by patient would no longer keep a patient's images together.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import warnings
from pathlib import Path

from embedstore.errors import UsageError
from embedstore.store.location import is_object_store, replace_file

KEY_FILE = "patient-id.key"
KEY_TEMP = KEY_FILE + ".tmp"
FINGERPRINT_FILE = "patient-id.fingerprint"  # the key's fingerprint, kept apart from the manifest
FINGERPRINT_TEMP = FINGERPRINT_FILE + ".tmp"
KEY_ENV = "EMBEDSTORE_PATIENT_ID_KEY"
HASHED, AS_READ = "hmac-sha256", "as-read"
HASH_PREFIX = "pid:"
HASH_HEX_CHARS = 32  # 128 bits: no collisions among any archive's patients
FINGERPRINT_LABEL = b"embedstore patient-id key fingerprint"
FINGERPRINT_HEX_CHARS = 16
MIN_KEY_BYTES = 32  # HMAC-SHA256's own strength; a made key has 64


class PatientKeyWarning(UserWarning):
    """A patient-ID key too short to keep guessed IDs from being tested against the store."""


def key_fingerprint(key: bytes) -> str:
    return "hmac-sha256:" + hmac.new(key, FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX_CHARS]


def read_fingerprint(store_path: Path) -> str | None:
    """The fingerprint kept in `patient-id.fingerprint`, if that file is there."""
    path = store_path / FINGERPRINT_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def write_fingerprint(store_path: Path, fingerprint: str) -> None:
    replace_file(store_path / FINGERPRINT_FILE, (fingerprint + "\n").encode())


def present_key(store_path: Path) -> tuple[bytes, str] | None:
    """(the key, where it came from): EMBEDSTORE_PATIENT_ID_KEY, else the store's key file; None
    when neither is there."""
    from_env = os.environ.get(KEY_ENV)
    path = store_path / KEY_FILE
    if from_env:
        return from_env.encode(), KEY_ENV
    if path.exists():
        return path.read_text().strip().encode(), str(path)
    return None


def patient_id_key(store_path: Path, fingerprint: str | None, may_make: bool) -> bytes:
    """The store's hashing key: from the environment, else the store's key file, made when missing
    only if `may_make` (a store with no fingerprint and no hashed IDs yet). UsageError when the key
    is missing or is not the one `fingerprint` names. Call it under the store's commit lock, so
    that two processes never both make a key."""
    path = store_path / KEY_FILE
    found = present_key(store_path)
    if found is not None:
        key, source = found
    elif may_make:
        check_key_source(store_path)
        key, source = make_key_file(path), str(path)
    else:
        raise UsageError(f"store {store_path} hashes patient IDs with a key that is not here ({path} is missing "
                         f"and {KEY_ENV} is not set): put back {KEY_FILE}, or set {KEY_ENV} to the key the store "
                         "was made with; a new key would give every patient a second ID")
    if fingerprint is not None and key_fingerprint(key) != fingerprint:
        raise UsageError(f"the patient-ID key from {source} is not the key store {store_path} was made with "
                         f"(fingerprint {key_fingerprint(key)}, the store's {fingerprint}): put back its "
                         f"{KEY_FILE}, or set {KEY_ENV} to that key (or unset it)")
    if len(key) < MIN_KEY_BYTES:
        # A file name and line of 0 keep the warning on one line (no source line is printed).
        warnings.warn_explicit(f"the patient-ID key from {source} is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                               "random bytes, or a guessed patient ID can be tested against the store",
                               PatientKeyWarning, "embedstore", 0)
    return key


def check_key_source(store_path: Path) -> None:
    """UsageError for a store in object storage without EMBEDSTORE_PATIENT_ID_KEY: there a key file
    would be readable by everyone who can read the bucket, so the key never goes there."""
    if is_object_store(store_path) and not os.environ.get(KEY_ENV):
        raise UsageError(f"store {store_path} is in object storage, where a key file would be readable by everyone "
                         f"who can read the bucket: set {KEY_ENV} to a secret of at least {MIN_KEY_BYTES} random "
                         "bytes (and keep it: every later run needs it), or keep patient IDs as read with "
                         "--keep-patient-id")


def make_key_file(path: Path) -> bytes:
    """A new random key, written owner-only; renamed into place whole, so no reader sees half a key."""
    key = secrets.token_hex(32)
    replace_file(path, (key + "\n").encode(), mode=0o600)
    return key.encode()


def pseudonymise(patient_id: str | None, key: bytes) -> str | None:
    if patient_id is None:
        return None
    digest = hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest[:HASH_HEX_CHARS]
