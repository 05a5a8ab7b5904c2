"""The inference stage: one file decoded and embedded (embed.py: a query image, an upload), or one
stored slice read back as the model saw it (readback.py: thumbnails, overlays, fine-tuning), from the
model's stored spec alone. Everything it needs to map pixels is in the spec; ingest builds the same
preprocessing from the same specs (preprocess.DecodeSettings.for_specs)."""
