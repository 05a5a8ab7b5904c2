"""What the sources hold now, against what the catalog recorded: the files to read, the files gone.

The listing is an Arrow table (path, size, mtime, kind, position in walk order) built from the
streaming walk in blocks, so 10^6 files cost about 100 MB of Arrow columns and no Python object
per file. A file is read again when its size or modification time changed, and when its header
could not be used last time (a reader fixed since, a file copied in place with its old mtime).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from embedstore.sources.discover import Source, iter_found
from embedstore.sources.records import Failure
from embedstore.store import Store

LISTING_SCHEMA = pa.schema([pa.field("path", pa.string()), pa.field("size", pa.int64()),
                            pa.field("mtime_ns", pa.int64()), pa.field("kind", pa.string()),
                            pa.field("position", pa.int64())])
LISTING_BLOCK = 65536  # files per Arrow block while walking


@dataclass
class Listing:
    files: pa.Table  # LISTING_SCHEMA, in walk order
    failures: list[Failure]  # what the walk found that cannot be an input (discover stage)


def list_sources(sources: list[Source]) -> Listing:
    blocks, failures = [], []
    block: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}
    position = 0
    for found in iter_found(sources):
        if isinstance(found, Failure):
            failures.append(found)
            continue
        for name, value in zip(LISTING_SCHEMA.names, (found.path, found.size, found.mtime_ns, found.kind, position)):
            block[name].append(value)
        position += 1
        if len(block["path"]) == LISTING_BLOCK:
            blocks.append(pa.table(block, schema=LISTING_SCHEMA))
            block = {name: [] for name in LISTING_SCHEMA.names}
    blocks.append(pa.table(block, schema=LISTING_SCHEMA))
    return Listing(pa.concat_tables(blocks).combine_chunks(), failures)


@dataclass
class Comparison:
    to_read: pa.Table  # new or changed files, LISTING_SCHEMA, in walk order
    n_unchanged: int
    n_changed: int
    n_new: int  # to read, and not in the table at all
    gone: pa.Table  # `path` of catalogued files under the sources that are no longer there


def compare_with_catalog(store: Store, listing: pa.Table, sources: list[Source]) -> Comparison:
    """Split the listing by what the `files` table already says about each file."""
    known = store.rows("files", columns=["path", "size", "mtime_ns", "reason"])
    if not known.num_rows:
        return Comparison(listing, 0, 0, listing.num_rows, pa.table({"path": pa.array([], pa.string())}))
    known = known.rename_columns(["path", "known_size", "known_mtime_ns", "known_reason"])
    joined = listing.join(known, "path", join_type="left outer")
    new = pc.is_null(joined["known_size"])
    differs = pc.or_(pc.not_equal(joined["size"], joined["known_size"]),
                     pc.not_equal(joined["mtime_ns"], joined["known_mtime_ns"]))
    changed = pc.fill_null(differs, False)  # null: a new file, nothing to differ from
    failed_before = pc.is_valid(joined["known_reason"])
    to_read = joined.filter(pc.or_(pc.or_(new, changed), failed_before)).select(LISTING_SCHEMA.names)
    to_read = to_read.sort_by("position")
    n_changed = pc.sum(changed).as_py() or 0
    missing = known.select(["path"]).join(listing.select(["path"]), "path", join_type="left anti")
    gone = missing.filter(under_any(missing["path"], sources))
    return Comparison(to_read, listing.num_rows - to_read.num_rows, n_changed, pc.sum(new).as_py() or 0, gone)


def under_any(paths: pa.ChunkedArray, sources: list[Source]) -> pa.ChunkedArray:
    """Which paths lie under one of the sources (a folder, a DICOMweb service) or are one of them (a
    file). A DICOMweb source narrowed by a query covers nothing: what it leaves out is not gone."""
    roots = [str(s) if isinstance(s, Path) else s.root for s in sources if isinstance(s, Path) or not s.narrowed]
    inside = pc.is_in(paths, pa.array(roots, pa.string()))
    for root in roots:
        inside = pc.or_(inside, pc.starts_with(paths, root.rstrip("/") + "/"))
    return inside
