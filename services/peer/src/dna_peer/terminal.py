"""What the command lines print: text from others made safe for a terminal, tables and
colours (rich: off when not a terminal or under NO_COLOR), and a quiet exit when the
reader of a pipe goes away (`dna-testnet status | head -3`)."""

from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from rich import box
from rich.console import Console
from rich.table import Table

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
    return Console(file=stream, width=width, highlight=False, emoji=False, soft_wrap=False)


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
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        _exit_on_broken_pipe()


def _exit_on_broken_pipe() -> NoReturn:
    # Python flushes stdout again at exit; point it at /dev/null so that flush is silent.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe


def run_main(body: Callable[[], Any]) -> None:
    """Run a CLI's body with the broken-pipe exit."""
    with quiet_broken_pipe():
        body()
