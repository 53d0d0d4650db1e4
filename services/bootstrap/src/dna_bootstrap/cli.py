"""`dna-bootstrap`: command line of the service. Serving comes with its issue; today: keys."""

from __future__ import annotations

import sys

from dna_core.ops.cli import run, service_parser


def main() -> None:
    parser, _ = service_parser("dna-bootstrap", "Bootstrap node of the DNA overlay.")
    sys.exit(run(parser))
