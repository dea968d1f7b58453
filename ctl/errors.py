"""The one exception type the CLI turns into a single stderr line and exit status 1."""


class AtomnetError(Exception):
    """A failure the user can act on; str(exc) is the whole message."""
