"""Query layer: answers from stored vectors without re-running the backbone."""
