"""The one exception type that user-facing problems raise.

The CLI turns a `BiounetError` into a one-line message on stderr and exit code 2; anything
else is a bug and keeps its traceback. It is a `ValueError`: every one says what value (a
file, an option, an array) is wrong, and Python callers may catch it as one.
"""


class BiounetError(ValueError):
    """A problem with the user's input (file, folder, option), with a message that says the fix."""
