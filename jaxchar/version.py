"""jaxchar's version: one place, read by pyproject.toml, the CLI and checkpoints."""

__version__ = "0.2.0"
