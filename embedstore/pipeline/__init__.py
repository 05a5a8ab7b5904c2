"""The ingest pipeline: plan what is left, decode in worker processes, embed with every requested
model, write shards and rows, summarise; run locally or on Ray by the same unit code.

The public names load lazily: decode workers import `embedstore.pipeline.decode` and must not pay
for the model and store imports that `ingest` needs.
"""

__all__ = ["IngestOptions", "IngestSummary", "ingest"]


def __getattr__(name: str):
    if name in __all__:
        from embedstore.pipeline import ingest

        return getattr(ingest, name)
    raise AttributeError(name)
