"""The ``loracompose`` command line (``main``); one module per command group."""

from loracompose.cli.main import main

__all__ = ["main"]
