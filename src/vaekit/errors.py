"""The one exception type for mistakes a user can make."""


class VaekitError(Exception):
    """A problem with the user's input: the CLI prints its message as one line and exits with code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or the name of its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
