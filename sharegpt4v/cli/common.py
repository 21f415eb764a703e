"""What every command module shares: the one-line error type, the argparse parser class, argument types,
recipe arguments and `NAME=VALUE` pairs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from sharegpt4v.config import available_profiles, load_recipe
from sharegpt4v.errors import PlatformError, UsageError


class CommandError(PlatformError):
    """A failure to report as one line and exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one `--help` away), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low` (a count, a port, an index)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_COUNT = _int_at_least(1)
_NON_NEGATIVE = _int_at_least(0)


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="tiny", help=f"recipe profile ({', '.join(available_profiles())}) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. world.image_size=32")


def _recipe(args: argparse.Namespace) -> Any:
    return load_recipe(args.profile, args.overrides)


def _pairs(items: list[str], flag: str, shape: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{flag} {item!r}: expected {shape}")
        pairs.append((name, value))
    return pairs
