"""The one exception type for problems with what the user gave us."""


class UserError(Exception):
    """Bad input from the user: a wrong path, an unusable data set, a bad option.

    The message names the value, what was expected and what to do; entry points print it
    alone (no traceback) and exit non-zero.
    """
