"""The package version (one place: `__init__` and the deprecations read it; pyproject.toml states the same)."""

__version__ = "0.2.0"
