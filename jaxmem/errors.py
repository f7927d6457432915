"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input a user can fix (unknown name, bad value, unreadable file); never a bug."""
