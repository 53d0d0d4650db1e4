"""`dna-storage-node`: command line of the service. Serving comes with its issue; today: keys."""

from __future__ import annotations

import sys

from dna_core.ops.cli import run, service_parser


def main() -> None:
    parser, _ = service_parser("dna-storage-node", "Storage node of the DNA network.")
    sys.exit(run(parser))
