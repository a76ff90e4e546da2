"""The one exception type users see: the CLI prints its message as one line and exits 2."""


class KaggleVitError(Exception):
    """A problem with the user's input (file, row, column named in the message), not a bug."""
