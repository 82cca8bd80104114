"""User-facing errors: the CLI prints them on one line and exits non-zero, without a traceback."""


class FewstepError(Exception):
    """Bad input or an unusable environment, explained in one line."""
