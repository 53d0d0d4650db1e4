"""`dna-stun`: command line of the service. Serving comes with its issue; today: keys."""

from __future__ import annotations

import sys

from dna_core.ops.cli import run, service_parser


def main() -> None:
    parser, _ = service_parser(
        "dna-stun", "STUN/TURN relay of the DNA network (not served yet: node keys only)."
    )
    sys.exit(run(parser))
