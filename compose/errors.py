"""User-facing errors.

A :class:`UserError` is a mistake in what the user asked for (a missing file, a LoRA made for
another base model, a bad box). Its message is one line that names the input and says what to do;
the CLI prints it without a traceback and exits with status 2.
"""


class UserError(ValueError):
    """A bad input, reported to the user as one line."""
