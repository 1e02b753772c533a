"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class AnybitError(Exception):
    """An error caused by the user's input or environment, not by a bug in anybit."""

    exit_code = 2
