"""embedstore: vision-foundation-model embeddings for radiology archives.

Data flow, one direction: sources → catalog → decode → embed → store → query.
"""

__version__ = "0.1.0"
