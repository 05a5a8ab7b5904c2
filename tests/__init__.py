"""embedstore's tests (a package, so that tests/support.py imports as tests.support)."""
