"""Everything orstack says to a person goes through here, to standard error.

Standard output is reserved for data. `--quiet` silences messages and progress;
rich itself honours NO_COLOR and plain-text output when stderr is not a terminal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

T = TypeVar("T")

_quiet = False
_console: Console | None = None


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def stderr() -> Console:
    """The shared stderr console (created on first use: rich is not imported at start-up)."""
    global _console
    if _console is None:
        import os
        import sys

        from rich.console import Console

        # A log file or CI log has no width of its own: give tables room rather than 80 columns.
        width = None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", "160"))
        _console = Console(stderr=True, highlight=False, soft_wrap=True, width=width)
    return _console


def info(message: str) -> None:
    if not _quiet:
        stderr().print(message, markup=False)


def warn(message: str) -> None:
    """Warnings are shown even with --quiet: they are about the result, not progress."""
    stderr().print(f"warning: {message}", markup=False, style="yellow")


def error(message: str) -> None:
    stderr().print(f"orstack: error: {message}", markup=False, style="red")


def table(tbl: Table) -> None:
    if not _quiet:
        stderr().print(tbl)


def new_table(*columns: str, title: str | None = None) -> Table:
    from rich.table import Table

    tbl = Table(title=title)
    for i, name in enumerate(columns):
        tbl.add_column(name, justify="left" if i == 0 else "right")
    return tbl


def progress() -> Progress:
    """A rich progress display on stderr with count, rate and ETA; disabled with --quiet.

    Add tasks with `bar.add_task(description, total=n, unit="tokens")`.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
            unit = task.fields.get("unit", "items")
            return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else f"- {unit}/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr(),
        disable=_quiet,
    )


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "items") -> Iterator[T]:
    """Iterate with a progress bar showing items done, rate and ETA."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task(description, total=total, unit=unit)
        for item in items:
            yield item
            bar.advance(task)
