"""Find image files under the given paths and sort them by kind."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from embedstore.errors import EMPTY_FILE, UsageError
from embedstore.sources.records import Failure

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
# Files that sit in archives but are never images; anything else without a known suffix is
# checked for the DICOM magic bytes (PACS exports often have no suffix at all).
NEVER_IMAGES = {"DICOMDIR"}


@dataclass(frozen=True)
class FoundFile:
    kind: str  # "dicom" | "nifti" | "raster"
    path: str


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if path.suffix.lower() in RASTER_SUFFIXES:
        return "raster"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    if path.name in NEVER_IMAGES:
        return None
    return "dicom" if has_dicom_magic(path) else None


def has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def check_sources(sources: list[str | Path]) -> list[Path]:
    """Absolute source paths; UsageError for one that does not exist."""
    if not sources:
        raise UsageError("no source paths given")
    resolved = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise UsageError(f"source path {source} does not exist")
        resolved.append(path.resolve())
    return resolved


def discover(sources: list[Path]) -> tuple[list[FoundFile], list[Failure]]:
    """Every image file under `sources` (recursively, in sorted order), and empty files as failures."""
    found: list[FoundFile] = []
    failures: list[Failure] = []
    for path in _walk(sources):
        kind = file_kind(path)
        if kind is None:
            continue
        if path.stat().st_size == 0:
            failures.append(Failure(str(path), "discover", EMPTY_FILE, "file is empty (0 bytes)"))
            continue
        found.append(FoundFile(kind, str(path)))
    return found, failures


def _walk(sources: list[Path]):
    seen: set[Path] = set()
    for source in sources:
        if source.is_file():
            candidates = [source]
        else:
            candidates = []
            for directory, subdirectories, files in os.walk(source):
                subdirectories.sort()
                candidates.extend(Path(directory, name) for name in sorted(files) if not name.startswith("."))
        for path in candidates:
            if path not in seen:
                seen.add(path)
                yield path
