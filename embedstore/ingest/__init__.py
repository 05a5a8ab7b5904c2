"""Ingest: plan what is left, decode in worker processes, embed, write, summarise.

The public names load lazily: decode workers import `embedstore.ingest.decode` and must not pay
for the model and store imports that `run` needs.
"""

__all__ = ["IngestOptions", "IngestSummary", "ingest"]


def __getattr__(name: str):
    if name in __all__:
        from embedstore.ingest import run

        return getattr(run, name)
    raise AttributeError(name)
