"""The ``kmipd`` command line: one module per command group, each with its own arguments."""

from kmipd.cli._main import main

__all__ = ["main"]
