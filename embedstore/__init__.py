"""embedstore: vision-foundation-model embeddings for radiology archives.

Data flow, one direction: sources → catalog → decode → embed → store → query.

The Python API: `store = embedstore.open(path)` (embedstore/api.py), then `store.models()`,
`store.vectors(...)`, `store.items(...)`, `store.patches(key)`, `store.search(...)`, `store.export(...)`.
`import embedstore` stays light: LanceDB, Zarr and torch load only when a store is opened.
"""

from embedstore.version import __version__

__all__ = ["__version__", "open"]


def open(path):  # noqa: A001 - embedstore.open, like zarr.open: the package's entry point
    """The store at `path`, as an `embedstore.api.EmbedStore`; UsageError when `path` holds none.

    Example::

        import embedstore

        store = embedstore.open("archive-store")
        v = store.vectors(feature="patch_mean", where="modality = 'CT'")  # v.matrix, v.rows
        hits = store.search(key=v.rows["key"][0].as_py(), k=5, feature="patch_mean")
    """
    from embedstore.api import open_store  # imported here, so that `import embedstore` loads no store code

    return open_store(path)
