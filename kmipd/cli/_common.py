"""What every command group shares: the error it raises and the argument types it parses."""

from __future__ import annotations

import argparse
import datetime
from typing import TypeAlias

#: The ``kmipd`` subcommand table a group's ``register`` adds its commands to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def parse_datetime(text: str) -> datetime.datetime:
    """An argparse type: ISO 8601 (naive means UTC) or epoch seconds."""
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.datetime.fromtimestamp(float(text), datetime.UTC)
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither ISO 8601 nor epoch seconds"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def parse_timestamp(text: str) -> int:
    """An argparse type: as parse_datetime, as epoch seconds."""
    return int(parse_datetime(text).timestamp())
