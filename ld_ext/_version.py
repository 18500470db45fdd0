"""The package version (read by pyproject.toml without importing ld_ext)."""

__version__ = "0.1.0"
