"""What the command lines print: text from others made safe for a terminal, tables and
colours (rich: off when not a terminal or under NO_COLOR), and a quiet exit when the
reader of a pipe goes away (`dna-testnet status | head -3`)."""

from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

# Characters that steer a terminal or reorder text rather than show: bidirectional
# overrides and isolates (a name that reads backwards), and line/paragraph separators.
_STEERING = frozenset("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
                      "\u2066\u2067\u2068\u2069")  # fmt: skip


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` (a contact's message, name or device name) with every control character
    shown escaped (ESC as ``\\x1b``), so it cannot recolour, clear, overwrite or reorder
    what the terminal shows. With ``newlines`` a line break stays a line break; the caller
    indents the continuation lines so that they cannot pass for lines of its own."""
    out = []
    for ch in text:
        if ch == "\n" and newlines:
            out.append(ch)
        elif unicodedata.category(ch) == "Cc" or ch in _STEERING:
            out.append(_escaped(ch))
        else:
            out.append(ch)
    return "".join(out)


def console(*, stderr: bool = False) -> Console:
    """A rich console: colours only on a terminal without NO_COLOR (rich checks both);
    when not a terminal, wide enough that tables never wrap (scripts split on spaces)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 10_000
    return _Console(file=stream, width=width, highlight=False, emoji=False, soft_wrap=False)


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich's own exits with 1; ours as the rest of the CLI
        self.quiet = True
        _exit_on_broken_pipe()


def table(out: Console, *columns: str) -> Table:
    """Lines on a terminal, bare aligned columns (one row per line) in a pipe."""
    grid = Table(box=box.SIMPLE_HEAD if out.is_terminal else None, show_edge=False,
                 pad_edge=False, header_style="bold")  # fmt: skip
    for name in columns:
        grid.add_column(name, no_wrap=not out.is_terminal)
    return grid


@contextmanager
def quiet_broken_pipe() -> Iterator[None]:
    """Exit quietly when stdout's reader has gone (`| head`), as `cat` does."""
    try:
        try:
            yield
        finally:  # also on SystemExit (argparse's --help): what is buffered goes out now
            sys.stdout.flush()
    except BrokenPipeError:
        _exit_on_broken_pipe()


def _exit_on_broken_pipe() -> NoReturn:
    # Python flushes stdout again at exit; point it at /dev/null so that flush is silent.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe


class _RateColumn(ProgressColumn):
    """Items per second (rich's own speed column counts bytes)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:.0f} {self.unit}/s" if task.total else "")


@contextmanager
def progress_bar(phase: str, unit: str, *, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress display on stderr, only when it is a terminal and ``enabled``: ``phase``
    with a spinner until the first ``update(done, total)``, then a bar with the count, the
    rate and the time left. Gone when the work is done (the result is printed after)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), _RateColumn(unit), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(phase, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, description=unit, completed=done, total=total)

        yield update


@contextmanager
def phase_line(text: str, *, enabled: bool) -> Iterator[None]:
    """A spinner with ``text`` on stderr while a slow step runs (a terminal only)."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    with console(stderr=True).status(text):
        yield
