"""One error type for bad user input, so every CLI can report it the same way."""


class ConfigError(ValueError):
    """Bad input from the user: a file, a flag or a recipe field.

    The message is one line that names what is wrong and how to fix it; the
    CLI prints it as ``ringleader: error: <message>`` and exits with status 2.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), to quote in a ConfigError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
