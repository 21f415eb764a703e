"""The base of every error a user should see as one line (the CLI prints it and exits 1)."""


class PlatformError(RuntimeError):
    """A failure with an actionable message: bad input location, credentials, a missing model..."""
