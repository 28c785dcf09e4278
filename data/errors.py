"""The exceptions the entry points turn into one message and an exit status, no traceback."""


class UserError(Exception):
    """Bad input from the user: a wrong path, an unusable data set, a bad option.

    The message names the value, what was expected and what to do; entry points print it
    alone (no traceback) and exit non-zero.
    """


def message(error: UserError) -> str:
    """The user-facing text, also for an error re-raised from a DataLoader worker (whose message
    torch prefixes with the worker's traceback)."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text


class Preempted(Exception):
    """The run stopped on a scheduler's signal after saving its exact position; `code` is the
    exit status (128 + the signal's number, as for a process the signal ended)."""

    def __init__(self, text: str, code: int):
        super().__init__(text)
        self.code = code
