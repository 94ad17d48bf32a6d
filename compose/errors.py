"""User-facing errors.

A :class:`UserError` is a mistake in what the user asked for (a missing file, a LoRA made for
another base model, a bad box). Its message is one line that names the input and says what to do;
the CLI prints it without a traceback and exits with status 2.
"""


class UserError(ValueError):
    """A bad input, reported to the user as one line."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type name if it
    has none: what a one-line :class:`UserError` quotes of a library's error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
