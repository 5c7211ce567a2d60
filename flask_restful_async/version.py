"""The package's version, in one place: the package, its spans' tracer and the
packaging metadata (``pyproject.toml`` reads it from here) all take it from this
module, which imports nothing."""

__version__ = "0.1.0"
