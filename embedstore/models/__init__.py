"""Models: the registry of names (registry.py), weights from hub / file / seeded random (weights.py),
the model spec every reader rebuilds a model from (spec.py, no torch: a store opens without it), the
one build path (build.py), engines (engines.py) and the embedder that turns preprocessed pixels into
the stored features (embedder.py)."""
