"""The failures orstack reports in one line, each with its exit code (docs/design.md, exit codes)."""

from __future__ import annotations

import errno
import re


class BadInput(Exception):
    """Bad usage or bad input: one line naming the file, line and field. Exit 2."""

    exit_code = 2


class GateFailed(Exception):
    """A quality gate failed and nothing was written (unless --force). Exit 3."""

    exit_code = 3


class DiskFull(Exception):
    """The disk filled up while an output was written; the partial output was removed. Exit 1."""

    exit_code = 1

    def __init__(self, path: object) -> None:
        super().__init__(f"no space left on device writing {path}")


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    swallows it while outputs are cleaned up on the way out. Exit 143."""

    exit_code = 143


# numpy's tofile reports a short write without an errno: "139264 requested and 32320 written".
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def is_disk_full(e: BaseException) -> bool:
    """An OSError that means the device is full (ENOSPC, EDQUOT, or numpy's short write)."""
    if not isinstance(e, OSError):
        return False
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or bool(_SHORT_WRITE.match(str(e)))
