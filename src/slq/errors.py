"""The one exception type users see: a clear, single-line message about bad input."""


class SlqError(ValueError):
    """Bad input or an unusable model/checkpoint; the CLI prints it as one line and exits 1."""
