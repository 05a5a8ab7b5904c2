"""Find image files under the given paths and sort them by kind.

Whatever is found ends as an input or a `failures` row (stage `discover`), never as a silent gap or
a stopped run: a folder that cannot be listed is `unreadable`, a link to nothing or a loop of links
`broken_link`, a FIFO, socket or device `not_a_file` (never opened: reading a FIFO blocks until a
writer comes). Links are followed; links to folders after every real folder, so a folder also
reached through a link keeps its real path, and no folder is walked twice (no endless link cycle).
Hidden files are skipped; hidden folders are walked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

from embedstore.errors import BROKEN_LINK, EMPTY_FILE, NOT_A_FILE, UNREADABLE, UsageError
from embedstore.sources.dicomweb import DicomwebSource, check_source, dicomweb_source, is_dicomweb
from embedstore.sources.records import Failure

if TYPE_CHECKING:
    from embedstore.sources.objects import BucketSource

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
# Files that sit in archives but are never images; anything else without a known suffix is
# checked for the DICOM magic bytes (PACS exports often have no suffix at all).
NEVER_IMAGES = {"DICOMDIR"}

Source = Union[Path, DicomwebSource, "BucketSource"]  # a folder or file, a DICOMweb service, a bucket


@dataclass(frozen=True)
class FoundFile:
    kind: str  # "dicom" | "nifti" | "raster"
    path: str  # a file, a DICOMweb instance (sources/dicomweb.py) or an object (sources/objects.py)
    size: int = 0  # bytes, and modification time: what a rerun compares to read only changed files
    # (0 for a DICOMweb instance: a SOP instance never changes under its UID)
    mtime_ns: int = 0


def kind_by_name(name: str) -> str | None:
    """The reader a file name selects: nifti, raster or dicom by suffix; None when the name does not
    decide (then the content does: DICOM's preamble)."""
    lower = name.lower()
    suffix = Path(lower).suffix
    if lower.endswith((".nii", ".nii.gz")):
        return "nifti"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    return None


def file_kind(path: Path) -> str | None:
    kind = kind_by_name(path.name)
    if kind is not None:
        return kind
    if path.name in NEVER_IMAGES:
        return None
    return "dicom" if has_dicom_magic(path) else None


DICOM_MAGIC_OFFSET = 128  # "DICM" follows the preamble


def has_dicom_magic(path: Path) -> bool:
    """Whether the file starts with DICOM's preamble; OSError when it cannot be read. Only for
    regular files: opening a FIFO would block."""
    with open(path, "rb") as handle:
        return handle.read(DICOM_MAGIC_OFFSET + 4)[DICOM_MAGIC_OFFSET:] == b"DICM"


def check_sources(sources: list[str | Path], query: str | None = None) -> list[Source]:
    """Absolute source paths, DICOMweb services and buckets (each asked once, so that an unreachable
    server or refused credentials stop the run before anything is written); UsageError for a path
    that does not exist."""
    if not sources:
        raise UsageError("no source paths given")
    resolved: list[Source] = []
    for source in sources:
        if isinstance(source, str) and is_dicomweb(source):
            remote = dicomweb_source(source, query)
            check_source(remote)
            resolved.append(remote)
            continue
        if isinstance(source, str) and source.startswith("s3://"):
            from embedstore.sources import objects  # here: it imports this module

            bucket = objects.bucket_source(source)
            objects.check_source(bucket)
            resolved.append(bucket)
            continue
        path = Path(source)
        if not path.exists():
            raise UsageError(f"source path {source} does not exist")
        resolved.append(path.resolve())
    if query and not any(isinstance(source, DicomwebSource) for source in resolved):
        raise UsageError("--query narrows a DICOMweb source (dicomweb+http://...); no source is one")
    return resolved


def check_input_file(path: Path, what: str) -> None:
    """UsageError unless `path` is a regular file this process can read; the message says what it
    is instead (missing, a folder, a FIFO: never opened, since reading one blocks)."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise UsageError(f"{what} {path} does not exist" if error.errno == errno.ENOENT
                         else f"{what} {path} cannot be read: {error.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} {path} is {_file_type(info.st_mode)}, not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path} cannot be read: permission denied")


def discover(sources: list[Path]) -> tuple[list[FoundFile], list[Failure]]:
    """Every image file under `sources` (recursively, in sorted order), and as failures what cannot
    be an input: empty files, broken links, special files, what cannot be read."""
    found: list[FoundFile] = []
    failures: list[Failure] = []
    for entry in iter_found(sources):
        (failures if isinstance(entry, Failure) else found).append(entry)
    return found, failures


def iter_found(sources: list[Source]) -> Iterator[FoundFile | Failure]:
    """`discover` as a stream, in the same order: nothing is held per file, so an archive of any
    size is listed in constant memory. A DICOMweb source's instances come after the folders."""
    folders = [source for source in sources if isinstance(source, Path)]
    yield from _found_files(folders)
    for source in sources:
        if isinstance(source, DicomwebSource):
            yield from (FoundFile("dicom", path) for path in source.instances())
        elif not isinstance(source, Path):
            yield from source.objects()


def _found_files(sources: list[Path]) -> Iterator[FoundFile | Failure]:
    for entry in _walk(sources):
        if isinstance(entry, Failure):
            yield entry
            continue
        path, info = entry
        try:
            kind = file_kind(path)
        except OSError as error:
            yield Failure(str(path), "discover", UNREADABLE, f"file cannot be read: {error.strerror}")
            continue
        if kind is None:
            continue
        if info.st_size == 0:
            yield Failure(str(path), "discover", EMPTY_FILE, "file is empty (0 bytes)")
            continue
        yield FoundFile(kind, str(path), info.st_size, info.st_mtime_ns)


def _walk(sources: list[Path]) -> Iterator[tuple[Path, os.stat_result] | Failure]:
    """(path, stat) of every regular file under `sources`, and failures for what is not one. Order
    as os.walk's: a folder's files, then its subfolders, each sorted by name. A file is listed once
    even when a source names it and a source folder holds it: only the named files are remembered
    (remembering every file would grow with the archive)."""
    named_files = {source for source in sources if source.is_file()}
    seen: set[Path] = set()
    walked: set[tuple[int, int]] = set()  # (device, inode) of every folder listed
    pending = [(source, False) for source in reversed(sources)]  # a stack of (path, found in a listing)
    linked_folders: deque[Path] = deque()
    while pending or linked_folders:
        path, listed = pending.pop() if pending else (linked_folders.popleft(), False)
        hidden = listed and path.name.startswith(".")
        try:
            info = os.stat(path)  # follows links
        except OSError as error:
            if not hidden:
                yield _stat_failure(path, error)
            continue
        if stat.S_ISDIR(info.st_mode):
            if listed and os.path.islink(path):
                linked_folders.append(path)
                continue
            if (info.st_dev, info.st_ino) in walked:
                if os.path.islink(path) and leads_back(path):
                    yield Failure(str(path), "discover", BROKEN_LINK, f"a loop of symbolic links: a link to "
                                  f"{os.readlink(path)}, a folder that holds it (its files are read once, there)")
                continue
            walked.add((info.st_dev, info.st_ino))
            try:
                names = _listing(path)
            except OSError as error:
                yield Failure(str(path), "discover", UNREADABLE, f"folder cannot be listed: {error.strerror}")
                continue
            pending.extend((path / name, True) for name in reversed(names))
        elif hidden or path in seen:
            continue
        elif stat.S_ISREG(info.st_mode):
            if path in named_files:
                seen.add(path)
            yield path, info
        else:
            yield Failure(str(path), "discover", NOT_A_FILE, f"{_file_type(info.st_mode)}, not a file: never opened")


def leads_back(link: Path) -> bool:
    """Whether a link to a folder points at the folder it sits in, or one above it: a loop."""
    target, home = link.resolve(), link.parent.resolve()
    return target == home or target in home.parents


def _listing(folder: Path) -> list[str]:
    """The folder's entry names: files first, then folders, each sorted."""
    with os.scandir(folder) as entries:
        return [entry.name for entry in sorted(entries, key=lambda entry: (_is_folder(entry), entry.name))]


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # decided when the entry itself is looked at
        return False


def _stat_failure(path: Path, error: OSError) -> Failure:
    if os.path.islink(path) and error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        target = os.readlink(path)
        problem = "a loop of symbolic links" if error.errno == errno.ELOOP else f"a link to {target}, which is missing"
        return Failure(str(path), "discover", BROKEN_LINK, f"{problem}: nothing to read")
    return Failure(str(path), "discover", UNREADABLE, f"cannot be read: {error.strerror}")


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"
