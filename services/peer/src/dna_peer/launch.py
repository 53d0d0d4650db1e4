"""The `dna` command's entry point (pyproject `[project.scripts]`).

Loading the program takes a moment (protobuf, gRPC, the crypto libraries: a few tenths of
a second, seconds on a loaded machine), and so does building and reading the command line.
Ctrl-C at any of those moments exits as Ctrl-C does later (status 130, no traceback),
instead of printing the import or the argparse regex that was interrupted.
"""

from __future__ import annotations

import _thread
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


def main() -> None:
    previous = sys.unraisablehook
    sys.unraisablehook = _ctrl_c_raised_again(previous)
    try:
        from dna_peer.cli import main as run

        run()
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        sys.unraisablehook = previous


def _ctrl_c_raised_again(
    previous: Callable[[sys.UnraisableHookArgs], object],
) -> Callable[[sys.UnraisableHookArgs], None]:
    """A Ctrl-C that lands in a weakref callback or a finalizer cannot propagate: Python
    prints "Exception ignored in ..." with its traceback and the program goes on (on a
    loaded machine it landed in importlib's module-lock callback, and `dna sync` went on to
    join). This hook raises it again in the main thread; other unraisable errors go to
    ``previous``."""

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            # From another thread: asked here, the main thread would take it in this hook
            # and drop it again. That thread runs once the main one yields the GIL, out of
            # the callback by then (or in another one: this hook asks again).
            _thread.start_new_thread(_thread.interrupt_main, ())
        else:
            previous(unraisable)

    return hook
