"""`sharegpt4v` command line: subcommands map to plain functions of the core package.

Exit codes: 0 success, 1 failure (one-line cause on stderr), 2 usage error (a bad or missing argument
or argument value, a recipe that cannot run: also one line). `main()` is the one boundary where every
error becomes that line; `SHAREGPT4V_DEBUG=1` re-raises it for the full traceback.
"""

from __future__ import annotations

import os
import sys

from sharegpt4v.cli.parser import build_parser
from sharegpt4v.config import ConfigError
from sharegpt4v.errors import PlatformError, UsageError, first_line
from sharegpt4v.redact import redact_text

__all__ = ["build_parser", "error_line", "main"]


def error_line(exc: BaseException) -> str:
    """The one line the CLI prints for `exc`, without credentials in any URL it quotes. Our own errors
    (PlatformError, ConfigError) and OSError / ValueError say what went wrong in their message; any other
    type (a bug, or a third-party layer's error nobody translated) is named, with where to look further."""
    message = first_line(exc)
    if not isinstance(exc, (PlatformError, ConfigError, ValueError, OSError)):
        message = f"{type(exc).__name__}: {message} (SHAREGPT4V_DEBUG=1 shows the traceback)"
    return redact_text(message)


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 success, 1 failure, 2 usage error; every error is one line on stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), its line already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("sharegpt4v: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SHAREGPT4V_DEBUG"):
            raise  # the full traceback, for developers
        print(f"sharegpt4v: error: {error_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (UsageError, ConfigError)) else 1
