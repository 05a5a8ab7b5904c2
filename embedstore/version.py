"""The package version, apart from the package's __init__ (which reaches the Python API): every layer
stamps what it writes with it without importing the layers above."""

__version__ = "0.1.0"
