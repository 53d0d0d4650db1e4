"""The console scripts' entry point: load the command's module, then run its ``main``.

Loading a command takes a moment (protobuf, gRPC, the crypto libraries: a few tenths of a
second, seconds on a loaded machine). Ctrl-C meanwhile exits as Ctrl-C does later (status
130, no traceback), instead of printing the import it interrupted. So this module imports
nothing heavy, nor does a package whose ``launch`` calls it (`dna_bootstrap.launch`, ...):
the interruptible part is inside the ``try``. (`dna` has its own: `dna_peer.launch`.)
"""

from __future__ import annotations

import importlib
import sys


def launch(module: str) -> None:
    """Import ``module`` and call its ``main()``; Ctrl-C at any moment exits 130."""
    try:
        importlib.import_module(module).main()
    except KeyboardInterrupt:
        sys.exit(130)
