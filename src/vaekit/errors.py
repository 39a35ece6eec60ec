"""The one exception type for mistakes a user can make."""


class VaekitError(Exception):
    """A problem with the user's input: the CLI prints its message as one line and exits with code 2."""
