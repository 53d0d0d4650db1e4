"""The `dna` command's entry point (pyproject `[project.scripts]`).

Loading the program takes a moment (protobuf, gRPC, the crypto libraries: a few tenths of
a second, seconds on a loaded machine), and so does building and reading the command line.
Ctrl-C at any of those moments exits as Ctrl-C does later (status 130, no traceback),
instead of printing the import or the argparse regex that was interrupted
(`dna_core.launch`, which imports nothing heavy).
"""

from __future__ import annotations

from dna_core.launch import launch


def main() -> None:
    launch("dna_peer.cli")
