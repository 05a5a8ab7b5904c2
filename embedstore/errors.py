"""The kinds of error embedstore distinguishes.

`UsageError` is a wrong request (bad argument, missing path, unknown model): the CLI prints its
message on one line and exits with code 2, before anything is written.

`InputError` is bad data inside an archive: it never stops a run; it becomes a `failures` row
whose `reason` is one of the stable codes below.
"""

from __future__ import annotations


class UsageError(Exception):
    """A request that cannot be carried out as given."""


class StoreFormatError(UsageError):
    """A directory that is not a store this version of embedstore can read."""


class SourceUnavailableError(Exception):
    """A source that stopped answering mid-run (a DICOMweb server gone): the run stops with what it
    committed, the CLI prints one line naming the source and exits with code 1; a rerun finishes."""


class StoreDamagedError(Exception):
    """A store file that is missing or cannot be read: the CLI prints one line naming the file and
    `embedstore check`, and exits with code 1."""


# Stable failure reason codes (the `failures.reason` column). Never rename one: users filter on them.
EMPTY_FILE = "empty_file"  # zero bytes
NOT_DICOM = "not_dicom"  # a .dcm (or DICM-less) file that does not parse as DICOM
NOT_IMAGE = "not_image"  # a raster suffix on something no image library can open
TRUNCATED = "truncated"  # the file, or its pixel data, ends before its header says it should
INVALID_HEADER = "invalid_header"  # DICOM attributes an image needs are missing or malformed
NO_PIXEL_DATA = "no_pixel_data"  # a DICOM object without an image: SR, PR, KOS, RT plan, DICOMDIR...
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"  # no installed codec for the syntax
CORRUPT_STREAM = "corrupt_stream"  # every codec for the syntax rejected the compressed data
CORRUPT_NIFTI = "corrupt_nifti"  # a NIfTI header or data block that nibabel cannot read
INCONSISTENT_SERIES = "inconsistent_series"  # a file whose study or patient contradicts its series
DUPLICATE_INSTANCE = "duplicate_instance"  # a second file with an already-seen SOPInstanceUID
WORKER_CRASHED = "worker_crashed"  # the decode process died on this file (e.g. a codec segfault)
TOO_LARGE = "too_large"  # the header declares more pixels than --max-pixels allows: refused before decoding
BROKEN_LINK = "broken_link"  # a symbolic link to nothing, or a loop of links
NOT_A_FILE = "not_a_file"  # a FIFO, socket or device: never opened, since reading one can block forever
UNREADABLE = "unreadable"  # the file or folder cannot be read (permission denied, I/O error)
DECODE_ERROR = "decode_error"  # an unexpected reader exception: a bug to report, not a data category
RETRIEVE_FAILED = "retrieve_failed"  # a DICOMweb server would not give the instance or its metadata (HTTP status)

REASONS = (
    EMPTY_FILE, NOT_DICOM, NOT_IMAGE, TRUNCATED, INVALID_HEADER, NO_PIXEL_DATA, UNSUPPORTED_TRANSFER_SYNTAX,
    CORRUPT_STREAM, CORRUPT_NIFTI, INCONSISTENT_SERIES, DUPLICATE_INSTANCE, WORKER_CRASHED, TOO_LARGE, BROKEN_LINK,
    NOT_A_FILE, UNREADABLE, DECODE_ERROR, RETRIEVE_FAILED,
)


class InputError(Exception):
    """An input file that cannot be embedded; `reason` is a stable code from REASONS."""

    def __init__(self, reason: str, message: str, stage: str = "read"):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stage = stage
