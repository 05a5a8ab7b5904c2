"""Read-only SQL over a store's tables, in DuckDB: `embedstore sql STORE "SELECT ..."`.

Every table of the store is a view under its own name, read from its Lance files as the query runs:
`items`, `series`, `files`, `models`, `failures`, `runs`, and each model's `slices-<model_id>` and
`series-<model_id>`, these without their vector columns unless asked for them. `vectors` is every model's
slice rows in one view, with a `model_id` column: `WHERE model_id LIKE 'dinov2_vits14%'` picks a model.
DuckDB hands each scan its columns and filter, so Lance reads only the columns a query names (measured:
`SELECT count(*) ... WHERE modality = 'CT'` asks Lance for `key` with the filter, never for a vector).

Read-only twice over: a query must be one SELECT (or EXPLAIN of one) before anything runs, and the
connection, in memory and holding views only, has file access, extension loading and its own settings
switched off before the query runs, so a SELECT cannot read or write a file either (`read_csv`, `COPY`).
"""

from __future__ import annotations

import re

import pyarrow as pa

from embedstore.errors import StoreDamagedError, UsageError
from embedstore.store import Store, as_damage
from embedstore.store.schema import SEARCH_FIELDS, SERIES_PREFIX, SLICES_PREFIX

VECTORS_VIEW = "vectors"
# Leading comments, EXPLAIN and its options: what is left must be a SELECT.
EXPLAINED = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^)]*\)\s*)?",
                       re.IGNORECASE | re.DOTALL)
# DuckDB's words for a scan whose Python source (Lance) raised: the table's name when it was registered
# whole (a model table's view without vectors has none), then Lance's error.
SCAN_FAILED = re.compile(r"reading the (?:stream registered as '(?P<name>.+?)'|Arrow source) failed: (?P<error>.*)",
                         re.DOTALL)
# A column a query names that the model tables have only with vectors.
VECTOR_COLUMN = re.compile(r'Referenced column "(?:cls|patch_mean|cls_b\d+)" not found')
MISSING_TABLE = re.compile(r"Table with name (?P<name>.+?) does not exist")
# Once the views exist: no files (read_csv, COPY, ATTACH), no extensions, no Python variables as
# tables, and no SET that turns any of it back on.
LOCKED_DOWN = ("SET python_enable_replacements = false", "SET autoinstall_known_extensions = false",
               "SET autoload_known_extensions = false", "SET allow_community_extensions = false",
               "SET enable_external_access = false", "SET lock_configuration = true")


def run_sql(store: Store, query: str, with_vectors: bool = False) -> pa.Table:
    """The rows `query` (one SELECT) selects from the store's tables; UsageError for any other
    statement and for a query DuckDB refuses, StoreDamagedError when a table it reads is damaged."""
    import duckdb

    con = duckdb.connect()  # in memory: nothing is ever written to disk
    try:
        check_read_only(con, query)
        damaged = register_tables(con, store, with_vectors)
        for setting in LOCKED_DOWN:
            con.execute(setting)
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.Error as error:
            raise query_error(error, store, damaged, with_vectors) from None
    finally:
        con.close()


def check_read_only(con, query: str) -> None:
    """UsageError unless `query` is one SELECT statement, or EXPLAIN of one."""
    import duckdb

    try:
        statements = con.extract_statements(query)
    except duckdb.Error as error:
        raise UsageError(first_line(error)) from None
    kinds = [statement.type.name for statement in statements]
    if kinds == ["EXPLAIN"]:
        explained = con.extract_statements(EXPLAINED.sub("", statements[0].query, count=1))
        kinds = ["EXPLAIN " + statement.type.name for statement in explained]
    if kinds in (["SELECT"], ["EXPLAIN SELECT"]):
        return
    if not kinds:
        raise UsageError("the SQL query is empty")
    got = kinds[0] if len(kinds) == 1 else f"{len(kinds)} statements ({', '.join(kinds)})"
    raise UsageError(f"a store's SQL query must be one SELECT statement (the store is read-only), not {got}")


def register_tables(con, store: Store, with_vectors: bool) -> dict[str, StoreDamagedError]:
    """Every table of the store as a view of its own name, and the `vectors` view; returns the tables
    that cannot be opened (and `vectors`, when a model's slices are among them), by name."""
    damaged: dict[str, StoreDamagedError] = {}
    slices: dict[str, pa.Schema] = {}
    for name in store.table_names():
        try:
            dataset = store.dataset(name)
        except StoreDamagedError as error:
            damaged[name] = error
            continue
        if is_model_table(name) and not with_vectors:  # a view of its other columns, no name for the whole
            columns = ", ".join(quoted(field.name) for field in dataset.schema if not is_vector(field))
            con.from_arrow(dataset).project(columns).create_view(name)
        else:
            con.register(name, dataset)
        if name.startswith(SLICES_PREFIX):
            slices[name] = dataset.schema
    damaged_slices = [error for name, error in damaged.items() if name.startswith(SLICES_PREFIX)]
    if damaged_slices:
        damaged[VECTORS_VIEW] = damaged_slices[0]
    else:
        create_vectors_view(con, slices, with_vectors)
    return damaged


def create_vectors_view(con, slices: dict[str, pa.Schema], with_vectors: bool) -> None:
    """`vectors`: every model's slice rows, by column name (models keep different CLS blocks), each
    with its `model_id`; vectors, when kept, as FLOAT[] (models have different widths)."""
    if not slices:  # no model yet: the columns every model's rows have, and no row
        con.register(VECTORS_VIEW, pa.schema([pa.field("model_id", pa.string()), pa.field("key", pa.string()),
                                              *SEARCH_FIELDS]).empty_table())
        return
    parts = []
    for name, schema in slices.items():
        model_id = name.removeprefix(SLICES_PREFIX)
        vectors = [quoted(field.name) for field in schema if is_vector(field)] if with_vectors else []
        replaced = f" REPLACE ({', '.join(f'CAST({column} AS FLOAT[]) AS {column}' for column in vectors)})" \
            if vectors else ""
        parts.append(f"SELECT {sql_string(model_id)} AS model_id, *{replaced} FROM {quoted(name)}")
    con.execute(f"CREATE TEMP VIEW {VECTORS_VIEW} AS " + " UNION ALL BY NAME ".join(parts))


def is_model_table(name: str) -> bool:
    return name.startswith((SLICES_PREFIX, SERIES_PREFIX))


def is_vector(field: pa.Field) -> bool:
    """A model table's vector column (cls, patch_mean, cls_b<i>): the only fixed-size float lists there."""
    return pa.types.is_fixed_size_list(field.type) and pa.types.is_floating(field.type.value_type)


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def query_error(error: Exception, store: Store, damaged: dict[str, StoreDamagedError],
                with_vectors: bool) -> Exception:
    """What a DuckDB error amounts to: a damaged table's StoreDamagedError (a table that did not open,
    or Lance failing to read it during the scan), else a UsageError with DuckDB's first line."""
    import duckdb

    text = str(error)
    missing = MISSING_TABLE.search(text)
    by_name = {name.lower(): damage for name, damage in damaged.items()}  # DuckDB's names ignore case
    if isinstance(error, duckdb.CatalogException) and missing and missing["name"].lower() in by_name:
        return by_name[missing["name"].lower()]
    failed = SCAN_FAILED.search(text)
    if isinstance(error, duckdb.InvalidInputException) and failed:
        damage = as_damage(RuntimeError(failed["error"]), store.path, failed["name"])
        if damage is not None:
            return damage
    if isinstance(error, (duckdb.InternalException, duckdb.FatalException)):
        return error  # a bug of DuckDB's (or ours), not of the query: shown whole
    asks_vectors = not with_vectors and VECTOR_COLUMN.search(text)
    hint = "; vector columns are left out unless asked for (--vectors)" if asks_vectors else ""
    return UsageError(first_line(error) + hint)
