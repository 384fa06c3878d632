"""Errors a user can cause. ``lopt.cli.main`` turns them into one line on stderr and exit status 2."""


class UsageError(Exception):
    """Bad input: a missing path, an unusable data file, an impossible setting. The message says what to do."""


class NonFiniteLossError(UsageError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""
