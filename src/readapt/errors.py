"""The one exception type readapt raises for bad input.

Every message names the file, tensor, flag or value at fault and says what to do next. The CLI prints
it on one line and exits with status 2; Python callers can catch :class:`ReadaptError`.
"""


class ReadaptError(Exception):
    """Bad input or a refused operation; the message says what is wrong and how to fix it."""
