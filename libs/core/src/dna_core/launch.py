"""The console scripts' entry point: load the command's module, then run its ``main``.

Loading a command takes a moment (protobuf, gRPC, the crypto libraries: a few tenths of a
second, seconds on a loaded machine). Ctrl-C meanwhile exits as Ctrl-C does later (status
130, no traceback), instead of printing the import it interrupted. So this module imports
nothing heavy, nor does a package whose ``launch`` calls it (`dna_bootstrap.launch`, ...):
the interruptible part is inside the ``try``.

A Ctrl-C that lands in a weakref callback or a finalizer cannot propagate: Python prints
"Exception ignored in ..." with its traceback and the program goes on (on a loaded
machine one landed in importlib's module-lock callback, and `dna sync` went on to join).
`exit_130_on_ctrl_c` raises it again in the main thread.
"""

from __future__ import annotations

import _thread
import importlib
import sys

TYPE_CHECKING = False  # `typing` would import `re`: ~20 ms before Ctrl-C is handled
if TYPE_CHECKING:
    from collections.abc import Callable


def launch(module: str) -> None:
    """Import ``module`` and call its ``main()``; Ctrl-C at any moment exits 130."""
    exit_130_on_ctrl_c(lambda: importlib.import_module(module).main())


def exit_130_on_ctrl_c(main: Callable[[], object]) -> None:
    """Run ``main``; Ctrl-C meanwhile exits 130, also one dropped in a callback."""
    previous = sys.unraisablehook
    sys.unraisablehook = _ctrl_c_raised_again(previous)
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        sys.unraisablehook = previous


def _ctrl_c_raised_again(
    previous: Callable[[sys.UnraisableHookArgs], object],
) -> Callable[[sys.UnraisableHookArgs], None]:
    """An unraisable-exception hook: a KeyboardInterrupt is asked again of the main thread;
    other errors go to ``previous``."""

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            # From another thread: asked here, the main thread would take it in this hook
            # and drop it again. That thread runs once the main one yields the GIL, out of
            # the callback by then (or in another one: this hook asks again).
            _thread.start_new_thread(_thread.interrupt_main, ())
        else:
            previous(unraisable)

    return hook
