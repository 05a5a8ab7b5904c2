"""Similarity search over stored vectors: exact and ANN, `--where` filters, slice / series / study level."""
