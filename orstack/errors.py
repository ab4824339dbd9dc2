"""The two failures a user can act on, each with its exit code (DESIGN.md, exit codes)."""

from __future__ import annotations


class BadInput(Exception):
    """Bad usage or bad input: one line naming the file, line and field. Exit 2."""

    exit_code = 2


class GateFailed(Exception):
    """A quality gate failed and nothing was written (unless --force). Exit 3."""

    exit_code = 3
