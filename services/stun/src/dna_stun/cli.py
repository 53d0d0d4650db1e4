"""`dna-stun`: the STUN/TURN relay of the DNA network.

`dna-stun run --config stun.toml` serves STUN Binding and TURN relaying on UDP and /healthz,
/readyz, /metrics, /status over HTTP, until SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

from dna_core.ops.cli import run, service_parser
from dna_core.ops.config import load_config
from dna_core.ops.service import add_config_commands, add_run_command, serve

from dna_stun.config import ENV_PREFIX, StunServiceConfig, config_warnings
from dna_stun.service import StunServer


def _run(args: argparse.Namespace) -> None:
    config = load_config(StunServiceConfig, args.config, env_prefix=ENV_PREFIX)
    serve(StunServer(config), config.log_level)


def main() -> None:
    # No keygen: the relay is no overlay member and has no node key.
    parser, sub = service_parser("dna-stun", "STUN/TURN relay of the DNA network.", node_key=False)
    add_run_command(sub, _run, ENV_PREFIX)
    add_config_commands(sub, StunServiceConfig, ENV_PREFIX, config_warnings)
    sys.exit(run(parser))
