"""`dna-bootstrap`'s entry point (pyproject `[project.scripts]`): Ctrl-C while the command still
loads exits 130 with no traceback (`dna_core.launch`)."""

from __future__ import annotations

from dna_core.launch import launch


def main() -> None:
    launch("dna_bootstrap.cli")
