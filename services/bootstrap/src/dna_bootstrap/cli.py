"""`dna-bootstrap`: a well-known entry point of the DNA overlay.

`dna-bootstrap run --config bootstrap.toml` joins (or seeds) the overlay and serves
routing on UDP, records on gRPC (with health and reflection), and /healthz,
/readyz, /metrics, /status over HTTP, until SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

from dna_core.ops.cli import run, service_parser
from dna_core.ops.config import load_config
from dna_core.ops.service import add_config_commands, add_run_command, serve
from dna_core.overlay import OverlayServer, OverlayServiceConfig, config_warnings
from dna_core.wire import common_pb2

ENV_PREFIX = "DNA_BOOTSTRAP"


def _run(args: argparse.Namespace) -> None:
    config = load_config(OverlayServiceConfig, args.config, env_prefix=ENV_PREFIX)
    serve(OverlayServer(config, role=common_pb2.NODE_ROLE_BOOTSTRAP), config.log_level)


def main() -> None:
    parser, sub = service_parser("dna-bootstrap", "Bootstrap node of the DNA overlay.")
    add_run_command(sub, _run, ENV_PREFIX)
    add_config_commands(sub, OverlayServiceConfig, ENV_PREFIX, config_warnings)
    sys.exit(run(parser))
