"""`dna-storage-node`: an overlay member holding replicated, encrypted mailboxes.

`dna-storage-node run --config storage.toml` serves routing on UDP, records and
mailboxes on gRPC (with health and reflection), and /healthz, /readyz, /metrics,
/status over HTTP, until SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

from dna_core.ops.cli import run, service_parser
from dna_core.ops.config import load_config
from dna_core.ops.service import add_config_commands, add_run_command, serve
from dna_core.overlay import config_warnings

from dna_storage.node import StorageNode, StorageNodeConfig

ENV_PREFIX = "DNA_STORAGE"


def _run(args: argparse.Namespace) -> None:
    config = load_config(StorageNodeConfig, args.config, env_prefix=ENV_PREFIX)
    serve(StorageNode(config), config.log_level)


def main() -> None:
    parser, sub = service_parser("dna-storage-node", "Storage node of the DNA network.")
    add_run_command(sub, _run, ENV_PREFIX)
    add_config_commands(sub, StorageNodeConfig, ENV_PREFIX, config_warnings)
    sys.exit(run(parser))
