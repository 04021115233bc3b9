"""User-facing errors: every one names the problem and the fix."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class SurgeryBookError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The command line prints it as one line, ``error: <problem> Fix: <fix>``, and exits with status 2.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")


#: errno name -> the fix for an operating-system error on a path the user gave (or a cache folder).
_OS_FIXES = {
    "ENAMETOOLONG": "use shorter folder and file names (file systems allow 255 bytes per name)",
    "ELOOP": "remove the symbolic link loop from the path, or pass another path",
    "EACCES": "make the path writable for this user (a shared cache: a group-writable folder with umask 002), or pass another",
    "EPERM": "make the path writable for this user, or pass another",
    "EROFS": "pass a path on a writable file system",
    "ENOTDIR": "a part of the path is a file: pass a folder path",
    "EISDIR": "the path is a folder: pass a file path",
    "EEXIST": "the path exists as a file: pass a folder path, or remove the file",
    "ENOENT": "check that the path exists",
    "ENOSPC": "free disk space, or pass a path on another disk; finished files are kept",
    "EDQUOT": "free space within your disk quota, or pass a path on another disk; finished files are kept",
}


def from_os_error(exc: OSError) -> SurgeryBookError:
    """An operating-system error (a name too long, a link loop, no permission, a file where a folder belongs)
    as one clear error naming the path and the fix, for the command line to print instead of a traceback."""
    import errno as errno_module

    name = errno_module.errorcode.get(exc.errno or 0, "")
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return SurgeryBookError(
        f"{reason}{where}", _OS_FIXES.get(name, "check the path and its permissions, then run the same command again")
    )


def run_script(main: Callable[[], int | None]) -> int:
    """Run the ``main`` of a script under ``bench/`` as the command line runs its commands, and return the exit
    status for ``sys.exit``: a :class:`SurgeryBookError` or an operating-system error on a path is one line on
    stderr (``error: <problem> Fix: <fix>``) and status 2, and a reader that closed the pipe ends it quietly
    (status 141, as the shell reports SIGPIPE). ``SURGERY_BOOK_DEBUG=1`` shows the traceback instead."""
    try:
        return int(main() or 0)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the final flush does not raise
        return 141
    except (SurgeryBookError, OSError) as exc:
        if os.environ.get("SURGERY_BOOK_DEBUG"):
            raise
        error = exc if isinstance(exc, SurgeryBookError) else from_os_error(exc)
        print(f"error: {error}", file=sys.stderr)
        return 2
