class InputError(Exception):
    """A problem with what the user gave us (data, options, stores), reported as one line, no traceback."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line reports of library errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
