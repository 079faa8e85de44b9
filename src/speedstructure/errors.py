"""Exceptions that the command line reports as a clear one-line error with exit code 2."""


class UserError(Exception):
    """Bad input or configuration: the message names the file and the problem."""


class DataError(UserError, ValueError):
    """A zip, member or array that does not match the challenge's format."""
