"""The errors a user sees as one line (the CLI prints them; exit 1, or 2 for a `UsageError`), and
helpers that keep such a line short."""

from __future__ import annotations

import re


class PlatformError(RuntimeError):
    """A failure with an actionable message: bad input location, credentials, a missing model..."""


class UsageError(PlatformError):
    """A bad argument value (a count below 1, an unknown name, a malformed reference): the CLI exits 2."""


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^)\"'\]\n]+)")
# Names in the MRO of an exception that means "could not connect": builtins (ConnectionRefusedError...),
# socket.gaierror, urllib3 (MaxRetryError, NewConnectionError, NameResolutionError, ConnectTimeoutError)
# and requests (ConnectionError, ConnectTimeout). Matched by name: no third-party import here.
_CONNECTION_TYPES = {
    "ConnectionError",
    "gaierror",
    "MaxRetryError",
    "NewConnectionError",
    "NameResolutionError",
    "ConnectTimeoutError",
    "ConnectTimeout",
}


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none."""
    text = str(getattr(exc, "message", None) or exc)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and everything it wraps: __cause__, __context__, urllib3's `reason`, exceptions in `args`."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(e for e in linked if isinstance(e, BaseException))
    return seen


def connection_failure(exc: BaseException) -> str | None:
    """The short cause ("Connection refused", "Name or service not known", "timed out") when `exc` is, wraps
    or was raised while handling a failure to connect to a server; None when it is some other error."""
    chain = _chain(exc)
    if not any(cls.__name__ in _CONNECTION_TYPES for e in chain for cls in type(e).__mro__):
        return None
    for e in reversed(chain):  # the innermost cause is the most specific
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        found = _ERRNO.search(str(e))
        if found:
            return found.group(1).strip()
    if any("timeout" in cls.__name__.lower() for e in chain for cls in type(e).__mro__):
        return "timed out"
    return first_line(chain[-1]).rsplit(": ", 1)[-1]
