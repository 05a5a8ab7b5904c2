"""Sources in S3-compatible object storage, through obstore: `s3://bucket/prefix/` listed page by
page, a DICOM header read with one range request, an object downloaded to a temporary file for the
readers and codecs to decode.

An object's path is its `s3://bucket/key` address, and its size and last-modified time play the part
of a file's size and mtime, so a rerun reads only new and changed objects. Credentials, region and
endpoint come from the standard AWS environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL for an S3-compatible server) and are never stored.
Requests are retried with backoff; a bucket that stops answering ends the run
(SourceUnavailableError) with what was committed kept, an object that cannot be read is a failure.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import lru_cache
from typing import Iterator

from embedstore.errors import RETRIEVE_FAILED, TRUNCATED, InputError, SourceUnavailableError, UsageError
from embedstore.sources.dicom import DicomHeader, read_header
from embedstore.sources.discover import DICOM_MAGIC_OFFSET, FoundFile, kind_by_name
from embedstore.sources.records import Failure

SCHEME = "s3://"
HEADER_BYTES = 64 * 1024  # one range request holds all but the most unusual DICOM headers
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
RETRY = {"max_retries": 3, "retry_timeout": timedelta(seconds=30),
         "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=5), "base": 2}}


def is_object(path: str) -> bool:
    return path.startswith(SCHEME)


@dataclass(frozen=True)
class BucketSource:
    root: str  # s3://bucket[/prefix], no trailing slash

    @property
    def narrowed(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.root

    def objects(self) -> Iterator[FoundFile]:
        """Every image object under the prefix, in key order (S3 lists keys sorted); objects with no
        telling suffix are DICOM when their bytes 128-131 say DICM (one small range request)."""
        import obstore

        bucket, prefix = split(self.root)
        store = store_for(bucket)
        with answers_of(self.root):
            for page in obstore.list(store, prefix=f"{prefix}/" if prefix else None, chunk_size=1000):
                for found in page:
                    key = found["path"]
                    name = key.rsplit("/", 1)[-1]
                    if name.startswith(".") or found["size"] == 0:
                        continue
                    kind = kind_by_name(name) or (_dicom_magic(store, key) and "dicom")
                    if kind:
                        modified = found["last_modified"]
                        yield FoundFile(kind, f"{SCHEME}{bucket}/{key}", found["size"],
                                        int(modified.timestamp() * 1_000_000_000))


def bucket_source(text: str) -> BucketSource:
    bucket, _ = split(text)
    if not bucket:
        raise UsageError(f"an object-storage source is s3://BUCKET[/PREFIX], not {text}")
    return BucketSource(text.rstrip("/"))


def check_source(source: BucketSource) -> None:
    check_listable(source.root, source.root)


def check_listable(address: str, naming: str) -> None:
    """One listing request under an s3:// address (a source's, or a store's, named `naming` in the
    message), to fail before anything is written: no credentials, a bucket that does not exist or
    refuses them, an endpoint that does not answer is a UsageError."""
    import obstore

    if not any(os.environ.get(name) for name in CREDENTIAL_VARIABLES) and \
            not os.path.exists(os.path.expanduser("~/.aws/credentials")):
        raise UsageError(f"no AWS credentials for {naming}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(or AWS_PROFILE), and AWS_ENDPOINT_URL for an S3-compatible server")
    bucket, prefix = split(address)
    try:
        next(iter(obstore.list(store_for(bucket, retries=0), prefix=f"{prefix}/" if prefix else None,
                               chunk_size=1)), None)
    except Exception as error:  # obstore's errors: NotFound, PermissionDenied, Generic (with the S3 code)
        raise UsageError(f"cannot list {naming}: {s3_problem(error)}") from None


def read_object_header(found: FoundFile, max_pixels: int) -> DicomHeader:
    """A DICOM object's header facts from its first HEADER_BYTES (the whole object when the header is
    longer than that)."""
    bucket, key = split(found.path)
    store = store_for(bucket)
    head = _get(store, found.path, key, end=min(found.size, HEADER_BYTES))
    with _temporary(head) as local:
        try:
            return replace(read_header(local, max_pixels), path=found.path)
        except InputError as error:
            if error.reason != TRUNCATED or found.size <= HEADER_BYTES:
                raise
    local = download(found.path)  # a header longer than the range: read the object whole
    try:
        return replace(read_header(local, max_pixels), path=found.path)
    finally:
        os.unlink(local)


def download(path: str) -> str:
    """A temporary file holding the object, for the readers and codecs; the caller removes it."""
    bucket, key = split(path)
    return _written(_get(store_for(bucket), path, key), _suffix(key))


def scanned_object(found: FoundFile, scan) -> object:
    """`scan(local FoundFile)` of a NIfTI or raster object downloaded whole, its path made the object's."""
    local = download(found.path)
    try:
        scanned = scan(FoundFile(found.kind, local, found.size, found.mtime_ns))
    finally:
        os.unlink(local)
    if isinstance(scanned, Failure):
        return replace(scanned, path=found.path, message=scanned.message.replace(local, found.path))
    return replace(scanned, path=found.path)


def split(address: str) -> tuple[str, str]:
    """(bucket, key or prefix) of an s3:// address."""
    bucket, _, key = address.removeprefix(SCHEME).partition("/")
    return bucket, key.strip("/")


def store_for(bucket: str, retries: int = RETRY["max_retries"], prefix: str | None = None):
    """An obstore S3 store for the bucket (its keys under `prefix`, when given), configured from the
    AWS environment as it is now (plain HTTP allowed only when the endpoint says http://)."""
    return _store(bucket, endpoint_url(), os.environ.get("AWS_ACCESS_KEY_ID"), retries, prefix)


def endpoint_url() -> str:
    """The S3-compatible server named by the environment; empty for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


@lru_cache(maxsize=8)
def _store(bucket: str, endpoint: str, access_key_id: str | None, retries: int, prefix: str | None):
    from obstore.store import S3Store  # reads the credentials and region from the environment

    return S3Store(bucket, prefix=prefix,
                   client_options={"allow_http": endpoint.startswith("http://"), "timeout": timedelta(seconds=60)},
                   retry_config={**RETRY, "max_retries": retries})


@contextmanager
def answers_of(root: str) -> Iterator[None]:
    """Listing mid-run: a bucket that stops answering ends the run."""
    try:
        yield
    except Exception as error:
        if type(error).__module__.startswith("obstore"):
            raise SourceUnavailableError(f"object storage {root} stopped answering: {s3_problem(error)}") from None
        raise


def _get(store, path: str, key: str, end: int | None = None) -> bytes:
    import obstore
    from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

    try:
        if end is None:
            return bytes(obstore.get(store, key).bytes())
        return bytes(obstore.get_range(store, key, start=0, end=end))
    except NotFoundError:
        raise InputError(RETRIEVE_FAILED, "the object is gone from the bucket", "read") from None
    except (PermissionDeniedError, UnauthenticatedError) as error:
        raise InputError(RETRIEVE_FAILED, f"the object cannot be read: {s3_problem(error)}", "read") from None
    except Exception as error:  # obstore's GenericError: the server stopped answering, after retries
        if type(error).__module__.startswith("obstore"):
            raise SourceUnavailableError(f"object storage {path.rsplit('/', 1)[0]} stopped answering: "
                                         f"{s3_problem(error)}") from None
        raise InputError(RETRIEVE_FAILED, f"{type(error).__name__}: {error}", "read") from None


def _dicom_magic(store, key: str) -> bool:
    import obstore

    try:
        return bytes(obstore.get_range(store, key, start=DICOM_MAGIC_OFFSET, end=DICOM_MAGIC_OFFSET + 4)) == b"DICM"
    except Exception:  # shorter than a preamble, or unreadable: not DICOM by its bytes
        return False


def _written(data: bytes, suffix: str) -> str:
    """A temporary file holding `data`; the caller removes it."""
    handle, local = tempfile.mkstemp(suffix=suffix, prefix="embedstore-object-")
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return local


@contextmanager
def _temporary(data: bytes, suffix: str = ".dcm") -> Iterator[str]:
    local = _written(data, suffix)
    try:
        yield local
    finally:
        os.unlink(local)


def _suffix(key: str) -> str:
    name = key.rsplit("/", 1)[-1].lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1] or ".dcm"


def s3_problem(error: Exception) -> str:
    """What an obstore error says, in one line: the S3 error code when the server gave one."""
    text = " ".join(str(error).split())
    for code, meaning in (("NoSuchBucket", "the bucket does not exist"), ("AccessDenied", "access denied"),
                          ("InvalidAccessKeyId", "the access key is not known"),
                          ("SignatureDoesNotMatch", "the secret key does not match"),
                          ("Connection refused", "connection refused"), ("error sending request", "no answer")):
        if code in text:
            return meaning
    return text[:200]

