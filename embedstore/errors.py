"""The two kinds of error embedstore distinguishes.

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


# Stable failure reason codes (the `failures.reason` column). Never rename one: users filter on them.
EMPTY_FILE = "empty_file"
NOT_DICOM = "not_dicom"
NOT_IMAGE = "not_image"
TRUNCATED = "truncated"
CORRUPT_NIFTI = "corrupt_nifti"
NO_PIXEL_DATA = "no_pixel_data"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
DECODE_ERROR = "decode_error"
WORKER_CRASHED = "worker_crashed"
DUPLICATE_INSTANCE = "duplicate_instance"

REASONS = (
    EMPTY_FILE, NOT_DICOM, NOT_IMAGE, TRUNCATED, CORRUPT_NIFTI, NO_PIXEL_DATA,
    UNSUPPORTED_TRANSFER_SYNTAX, DECODE_ERROR, WORKER_CRASHED, DUPLICATE_INSTANCE,
)


class InputError(Exception):
    """An input file that cannot be embedded; `reason` is a stable code from REASONS."""

    def __init__(self, reason: str, message: str, stage: str = "read"):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stage = stage
