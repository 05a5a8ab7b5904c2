"""Format-3 stores written before the items' `kind` and `axis` columns (the reader a slice's file
needs, a NIfTI slice's axis): the columns added, read once from the keys. This is the one place a
key is parsed; every reader since takes the columns. `embedstore migrate` and the next ingest do it,
holding the store's exclusive lock; the items table is rewritten whole (it holds no vectors) through
a staged copy, so a crash anywhere leaves either table to finish from."""

from __future__ import annotations

import pyarrow as pa

from embedstore.errors import UsageError
from embedstore.store import Store
from embedstore.store.schema import ITEM_READER_COLUMNS, ITEMS_SCHEMA

STAGED = "upgrade-items"


def item_kind(key: str) -> str:
    return "dicom" if key.startswith("dicom:") else "nifti" if key.startswith("nifti:") else "raster"


def item_axis(key: str) -> str | None:
    """The slicing axis in a NIfTI key: nifti:<path>:<axis>[:t<volume>]:<n> (the path may hold ':')."""
    if not key.startswith("nifti:"):
        return None
    parts = key.rsplit(":", 3)
    return parts[-3] if parts[-2].startswith("t") and parts[-2][1:].isdigit() else parts[-2]


def check_item_columns(store: Store) -> None:
    """UsageError naming `embedstore migrate` when a reader needs the columns and the store lacks them."""
    if lacks_item_columns(store):
        raise UsageError(f"the items of store {store.path} do not say the kind and axis of their files (written "
                         f"before them): run `embedstore migrate {store.path}` once")


def lacks_item_columns(store: Store) -> bool:
    return store.has_table(STAGED) or (store.has_table("items") and
                                       not set(ITEM_READER_COLUMNS) <= set(store.schema("items").names))


def with_reader_columns(rows: pa.Table) -> pa.Table:
    """`rows` of the items table with `kind` and `axis` from their keys, in ITEMS_SCHEMA."""
    keys = rows.column("key").to_pylist()
    columns = {name: rows.column(name) for name in rows.column_names}
    columns.update(kind=pa.array([item_kind(key) for key in keys], pa.string()),
                   axis=pa.array([item_axis(key) for key in keys], pa.string()))
    return pa.table({name: columns[name] for name in ITEMS_SCHEMA.names}).cast(ITEMS_SCHEMA)


def add_item_columns(store: Store) -> int:
    """Give the items table its reader columns (nothing when it has them); the rows rewritten."""
    if not lacks_item_columns(store):
        return 0
    with store.commit_lock():
        if not store.has_table(STAGED):
            store.db.create_table(STAGED, data=with_reader_columns(store.rows("items")), schema=ITEMS_SCHEMA)
        staged = store.rows(STAGED)
        if store.has_table("items"):
            store.db.drop_table("items")
        store.db.create_table("items", data=staged, schema=ITEMS_SCHEMA)
        store.db.drop_table(STAGED)
    return staged.num_rows
