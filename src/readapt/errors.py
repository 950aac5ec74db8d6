"""The one exception type readapt raises for bad input, and the mapping of OS errors onto it.

Every message names the file, tensor, flag or value at fault and says what to do next. The CLI prints
it on one line and exits with status 2; Python callers can catch :class:`ReadaptError`.
"""

import errno
import os


class ReadaptError(Exception):
    """Bad input or a refused operation; the message says what is wrong and how to fix it."""


_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another -o",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another -o",
    errno.ENAMETOOLONG: "a file name is too long for the file system: choose a shorter -o",
    errno.EROFS: "the file system is read-only: choose another -o",
    errno.EACCES: "permission denied: choose another -o or check the permissions",
    errno.EPERM: "operation not permitted: choose another -o or check the permissions",
    errno.EIO: "an input/output error: check the disk",
}


def os_error(err: OSError, context: str = "") -> ReadaptError:
    """`err` (a full disk, a name too long, a permission...) as a one-line ReadaptError: what the system
    said, the file it concerns, `context` (e.g. "nothing was written to OUT") and what to do."""
    names = [os.fsdecode(f) for f in (err.filename, err.filename2) if f is not None]
    where = f" ({' -> '.join(names)})" if names else ""
    hint = _HINTS.get(err.errno)
    return ReadaptError(f"{err.strerror or err}{where}" + "".join(f"; {x}" for x in (context, hint) if x))
